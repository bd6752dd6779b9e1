"""
The 8-bit code book of AdamW8bit's moments (optim.py): 256 values, and rounding fp32 numbers to them.
A moment is stored in quantization groups of QGROUP = 256 elements: each group keeps its fp32 absmax,
each element the byte of the nearest code-book value to (element / absmax).

The dynamic code book, derived. Read a byte as [sign] [E zeros] [a one] [F fraction bits]:
the run of E leading zeros (E = 0..6) is a base-10 exponent, the magnitude's decade
[0.1, 1] * 10^-E; the F = 6 - E bits left over cut that decade into 2^F equal bins and the
value is the bin's midpoint:
    +-10^-E * (0.1 + 0.9 * (k + 1/2) / 2^F),    k = 0 .. 2^F - 1.
Large magnitudes get fine steps, small ones keep their order of magnitude: 7 decades from
8 bits. The top decade has 64 values per sign, each lower decade half as many, down to a
single one at 0.55e-6: 2 * 127 values, plus the all-zero byte for 0 and the spare
"negative zero" byte for 1.0, so a group's absmax itself is exact. The largest negative value
is the midpoint of the last bin, -(1 - 0.45/64) = -0.99297. v >= 0 needs no sign: the sign
bit becomes one more fraction bit (F = 7 - E, 128 values in the top decade, twice the
resolution), and the byte that would open an eighth decade is spent on 1.0 instead. Rounding
to the nearest value errs by at most half a top-decade bin: 0.45/64 = 0.00703 (signed) and
0.45/128 = 0.00352 (unsigned) times absmax. 0 maps to exactly 0.
"""
import math

import torch
import torch.nn.functional as F

QGROUP = 256  # elements per quantization group, each with its own fp32 absmax


def dynamic_code(signed):
    """The 256 values of the dynamic code book (derived in the module docstring), sorted, fp32."""
    values = [0.0, 1.0]
    for E in range(7):
        bins = 2 ** ((6 if signed else 7) - E)
        mags = [10.0**-E * (0.1 + 0.9 * (k + 0.5) / bins) for k in range(bins)]
        values += mags + ([-x for x in mags] if signed else [])
    return torch.tensor(sorted(values), dtype=torch.float64).float()


class Codebook:
    """One code book (256 sorted fp32 values) and the tables that round fp32 numbers to it.

    Rounding to nearest means counting the thresholds t_j (midpoints between neighbouring
    values) that lie below x. A binary search per element is slow on CPU, so we bucket x by
    the top 16 bits of its fp32 pattern (sign, exponent, 7 mantissa bits). Thresholds lie a
    bin apart, at least 0.0070 in the finest decade (unsigned, [0.1, 1]), where a bucket is
    at most 2^-8 = 0.0039 wide; lower decades shrink both alike. So a bucket holds at most
    one threshold (asserted below), and
        index(x) = count[bucket] + (x > first_threshold[bucket]),
    two table lookups and a compare, the same on CPU and in the Triton kernel.
    """

    def __init__(self, signed):
        self.signed = signed
        self.values = dynamic_code(signed)  # (256,)
        exact = (self.values[:-1].double() + self.values[1:].double()) / 2  # exact midpoints
        # Largest fp32 <= the midpoint, so "x > t" in fp32 is "x is nearer the upper value";
        # an exact tie goes to the lower value (as a brute-force argmin would).
        t = exact.float()
        t = torch.where(t.double() > exact, torch.nextafter(t, torch.tensor(-math.inf)), t)
        self.thresholds = torch.cat([t, torch.tensor([math.inf])])  # (256,), +inf: nothing above 1.0
        top16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32)  # bucket b holds fp32 patterns (b << 16) | low16
        ends = torch.stack([top16 << 16, (top16 << 16) | 0xFFFF]).view(torch.float32)
        lo, hi = ends.amin(0), ends.amax(0)
        count = torch.bucketize(lo.nan_to_num(0.0), t)  # thresholds < the bucket's smallest value
        finite = lo.isfinite() & hi.isfinite()
        assert (torch.bucketize(hi[finite], t) - count[finite]).max() <= 1, "a bucket holds two thresholds"
        self.lut_count = count.to(torch.uint8)  # (65536,)
        self.lut_threshold = self.thresholds[count]  # (65536,)
        self.zero = int((self.values == 0).nonzero())  # the code of 0, for fresh state
        # For v: decode the 0 code as the largest value that rounds to it (half the first bin).
        # A true v below that is stored as 0; decoding it as 0 would divide m by eps alone.
        self.values_floored = self.values.clone()
        self.values_floored[self.zero] = 0.0 if signed else self.thresholds[self.zero]

    def to(self, device):
        for name in ("values", "values_floored", "thresholds", "lut_count", "lut_threshold"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def quantize_(self, x, codes, absmax):
        """x (L,) fp32 -> codes (L,) uint8 and absmax (ceil(L/256),) fp32, written in place. Clobbers x."""
        xb = _groups(x)  # (L/256, 256)
        if self.signed:
            torch.maximum(xb.amax(dim=1), xb.amin(dim=1).neg_(), out=absmax)
        else:  # v >= 0
            torch.amax(xb, dim=1, out=absmax)
        xb.div_(torch.where(absmax > 0, absmax, 1.0)[:, None])  # now in [-1, 1]
        bucket = (xb.view(torch.int32) >> 16).add_(1 << 15).view(-1)  # top 16 bits, as 0..65535
        index = self.lut_count.index_select(0, bucket)
        index += xb.view(-1) > self.lut_threshold.index_select(0, bucket)
        codes.copy_(index[: codes.numel()])

    def dequantize(self, codes, absmax, floored=False):
        """codes (L,) uint8, absmax (ceil(L/256),) -> (L,) fp32 values * absmax of their group;
        floored: the 0 code decodes as the top of its bin (see values_floored)."""
        x = (self.values_floored if floored else self.values).index_select(0, codes.int())
        return _groups(x).mul_(absmax[:, None]).view(-1)[: codes.numel()]


def _groups(x):
    """(L,) -> (ceil(L/256), 256), zero-padding the last group (a copy only when L % 256 != 0)."""
    pad = -x.numel() % QGROUP
    return (F.pad(x, (0, pad)) if pad else x).view(-1, QGROUP)
