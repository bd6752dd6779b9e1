"""
The optimizer: AdamW with 8-bit group-wise quantized moments (AdamW8bit), the code book its moments are
rounded to, and per-layer updates (PerLayerOptimizer). Plain PyTorch; the fused update for CUDA tensors is
kernels.adamw8bit_update_, and the PyTorch path here is its oracle.

AdamW8bit stores Adam's two moments m and v as one byte per element: each quantization group of 256
elements keeps an fp32 absmax, and every element the index of the nearest value of a
256-entry code book (the "dynamic" map of Dettmers et al., derived below), scaled by its
group's absmax. Every step dequantizes to fp32, runs the ordinary AdamW update, and quantizes again,
so the state costs 2 + 8/256 = 2.03 bytes per parameter instead of 8.

bf16 weights: the update runs in fp32 and is written back with stochastic rounding (round up or
down at random, with probability by distance: unbiased). Rounding to the nearest bf16 drops every
update below half an ulp: an RMSNorm gain at 1.0 never moves for lr < ~2e-3. Measured on the tiny
model (benchmarks/bf16_weights.py, results/bf16_weights.md; lr 1e-3, 200 steps), final val loss
against fp32 weights: nearest +2.16% (every gain stuck at 1.0), stochastic +0.05% at 0 extra
bytes, a bf16 Kahan compensation buffer +0.01% at 2 B/param, an fp32 master copy +0.01% at
4 B/param. Stochastic rounding costs nothing and is within noise of the others: it is the one here.
The random bits come from torch's global RNG, which checkpoints save, so resume stays exact.

Non-finite gradients: a tensor whose gradient holds a NaN or Inf is skipped whole: its
parameter, moments and step count stay as they were and state["skipped"] counts it (summed in
`optimizer.skipped`). The decision is a flag on the device, never read by the host per tensor:
the update runs and every write keeps the old value where the flag is set (torch.where, or masked
stores in the kernel). Under FSDP2 a tensor's flag is the OR over its shards on every rank (one
all-reduce), so all ranks skip the same tensors. The step and skip counts are booked once per
step for all tensors (`book_skips`: one host sync), by step(), by PerLayerOptimizer, or by
train.py with the step's loss (one read from the device per step).
"""
import math

import torch
import torch.nn.functional as F

try:
    import kernels  # all Triton lives there: the fused AdamW8bit update for CUDA tensors
except ModuleNotFoundError as e:
    if e.name != "triton":  # no triton package: the PyTorch path everywhere; anything else is a bug
        raise
    kernels = None

# -----------------------------------------------------------------------------
# the code book
#
# The 8-bit code book of AdamW8bit's moments: 256 values, and rounding fp32 numbers to them.
# A moment is stored in quantization groups of QGROUP = 256 elements: each group keeps its fp32 absmax,
# each element the byte of the nearest code-book value to (element / absmax).
#
# The dynamic code book, derived. Read a byte as [sign] [E zeros] [a one] [F fraction bits]:
# the run of E leading zeros (E = 0..6) is a base-10 exponent, the magnitude's decade
# [0.1, 1] * 10^-E; the F = 6 - E bits left over cut that decade into 2^F equal bins and the
# value is the bin's midpoint:
#     +-10^-E * (0.1 + 0.9 * (k + 1/2) / 2^F),    k = 0 .. 2^F - 1.
# Large magnitudes get fine steps, small ones keep their order of magnitude: 7 decades from
# 8 bits. The top decade has 64 values per sign, each lower decade half as many, down to a
# single one at 0.55e-6: 2 * 127 values, plus the all-zero byte for 0 and the spare
# "negative zero" byte for 1.0, so a group's absmax itself is exact. The largest negative value
# is the midpoint of the last bin, -(1 - 0.45/64) = -0.99297. v >= 0 needs no sign: the sign
# bit becomes one more fraction bit (F = 7 - E, 128 values in the top decade, twice the
# resolution), and the byte that would open an eighth decade is spent on 1.0 instead. Rounding
# to the nearest value errs by at most half a top-decade bin: 0.45/64 = 0.00703 (signed) and
# 0.45/128 = 0.00352 (unsigned) times absmax. 0 maps to exactly 0.

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


CHUNK = 1 << 18  # elements per slice on a CPU (a multiple of QGROUP): 1 MB fp32 temporaries stay in cache
CHUNK_CUDA = 1 << 24  # on a GPU: 64 MB temporaries, few enough launches (AdamW on a 7b model: ~400 slices)


MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep fp32 state (their state is tiny anyway)


def state_bytes(numel, eight_bit):
    """Bytes of AdamW8bit's state for a tensor of numel elements: m and v as one byte each plus an fp32
    absmax per quantization group, or two fp32 moments (fp32_state, or below min_8bit_size)."""
    return 2 * (numel + 4 * math.ceil(numel / QGROUP)) if eight_bit else 8 * numel


# -----------------------------------------------------------------------------
# AdamW8bit


def adamw_update_(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step on fp32 tensors, in place, in torch.optim.AdamW's exact order of operations."""
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)  # decoupled weight decay
    m.lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))  # p -= lr m_hat / (sqrt(v_hat) + eps)


def stochastic_round(src, generator=None):
    """src (fp32) rounded to one of its two bf16 neighbours (returned as fp32), the upper one with
    probability (src - lower) / (upper - lower): unbiased, E[result] = src, so updates far below half a
    bf16 ulp still move the weight on average. A bf16 is the top 16 bits of an fp32: add 16 random bits
    below them (a carry rounds the magnitude up), then drop those bits; a bf16 cast of it is exact."""
    noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=generator)
    return noise.add_(src.view(torch.int32)).bitwise_and_(-65536).view(torch.float32)


def fp32_state_params(model):
    """The parameters train.py gives AdamW8bit's fp32 state: the token embedding and lm_head, the usual advice
    for embeddings (a row's gradient is zero for every token not in the batch, then large: 8-bit v loses it)."""
    return [model.tok_emb.weight, model.lm_head.weight]


def pending_flags(optimizers):
    """The non-finite flags (device tensors) of the tensors these AdamW8bit optimizers (or a PerLayerOptimizer's)
    updated since the last book_skips: a caller that reads other values from the device reads these with them."""
    return [flag for opt in _inner(optimizers) for _, flag in getattr(opt, "_pending", ())]


def book_skips(optimizers, flags=None):
    """Book the last step's skips of these AdamW8bit optimizers (or a PerLayerOptimizer's): a skipped tensor's
    step count goes back (its update was discarded), its skip count up. flags: pending_flags' values, read by
    the caller; else read here, one host sync for all the tensors."""
    optimizers = _inner(optimizers)
    pending = [item for opt in optimizers for item in getattr(opt, "_pending", ())]
    if pending and flags is None:
        flags = torch.stack([flag for _, flag in pending]).tolist()
    for (state, _), bad in zip(pending, flags or ()):
        state["step"] -= int(bad)
        state["skipped"] += int(bad)
    for opt in optimizers:
        if hasattr(opt, "_pending"):
            opt._pending.clear()


def _inner(optimizers):
    """One optimizer or a list -> a list, a PerLayerOptimizer standing for its per-parameter optimizers."""
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    return [o for opt in optimizers for o in (opt.optimizers.values() if isinstance(opt, PerLayerOptimizer) else [opt])]


def _local(t):
    """A DTensor's local shard (FSDP2), else the tensor itself: we update whatever this rank holds."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_rank(p):
    """Which shard of p this rank holds under FSDP2 (its coordinate on the mesh's sharding dimension,
    the last one), else None. Stochastic rounding folds it into its seed: shards draw independent
    noise, while copies of the same values (DDP replicas, HSDP's replicated shards) draw the same."""
    return p.device_mesh.get_coordinate()[-1] if hasattr(p, "device_mesh") else None


def nonfinite_flags(grads):
    """One device flag per gradient, 1.0 where it holds a NaN or Inf, with no host sync. An FSDP2
    gradient (a DTensor) is ORed over its shards on every rank, all of the list's with one all-reduce
    per process group, so every rank skips the same tensors."""
    bad = [(~_local(g).isfinite().all()).float() for g in grads]
    groups = {}
    for i, g in enumerate(grads):
        if hasattr(g, "device_mesh"):  # the shards' group (HSDP: a copy's; its copies hold the same gradient)
            groups.setdefault(g.device_mesh.get_group(g.device_mesh.ndim - 1), []).append(i)
    for group, index in groups.items():
        flags = torch.stack([bad[i] for i in index])
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=group)
        for i, flag in zip(index, flags.unbind()):
            bad[i] = flag
    return bad


# (device, signed) -> Codebook, shared by every AdamW8bit: per-layer updates make one optimizer per
# tensor (737 with 8-bit state at 7b), and a pair of books each (0.66 MB of tables) would add 0.49 GB
_BOOKS = {}


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are stored as 8-bit group-wise codes (see the module docstring).

    Per-group options (constructor values are the defaults):
      fp32_state:    keep plain fp32 moments for this group (train.py uses it for tok_emb and
                     lm_head, the usual advice for token embeddings; see below).
      min_8bit_size: tensors with fewer elements keep fp32 state (their state is tiny anyway).
    use_triton: None picks the fused Triton kernel for CUDA tensors when triton is installed.
    fp32 and bf16 parameters; the update always runs in fp32 and rounds to the parameter's dtype.

    Where 8-bit state hurts: v ~ g^2, so its 7 decades cover only 3.5 decades of gradient (m's
    cover 7). An element whose gradients are ~4e-4 of its group's largest has its v rounded to
    0 while its m survives. Decoded as 0, its next step would be m / (sqrt(1 - beta2) |g| + eps),
    up to m / eps (about 4,700 lr in the test) for an element whose gradient stops. So the update
    decodes v's 0 code as the largest value that rounds to it, 0.16e-6 * absmax (a floor; stored
    codes are unchanged): the true v lies below it, so the step is never larger than fp32 AdamW's
    would be, and it stays finite. Scales that vary between groups rather than inside them are
    harmless: that is what the per-group absmax is for.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 fp32_state=False, min_8bit_size=MIN_8BIT_SIZE, use_triton=None):
        if not lr >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps >= 0:
            raise ValueError(f"invalid AdamW8bit hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        fp32_state=fp32_state, min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        self.use_triton = use_triton
        self._pending = []  # (state, device flag) of this step's tensors, until book_skips()
        self.book_skips_in_step = True  # False: the caller books (PerLayerOptimizer, train.py's one read)
        self._noise = None  # the generator of this tensor's bf16 rounding noise (None: torch's RNG)

    def book(self, device, signed):
        key = (str(device), signed)
        if key not in _BOOKS:
            _BOOKS[key] = Codebook(signed).to(device)
        return _BOOKS[key]

    @property
    def skipped(self):
        """Tensor-steps skipped so far because of a non-finite gradient."""
        return sum(s.get("skipped", 0) for s in self.state.values())

    @torch.no_grad()
    def step(self, closure=None, nonfinite=None):
        """nonfinite: the gradients' flags from nonfinite_flags, when the caller has them already
        (PerLayerOptimizer reconciles a whole FSDP2 unit at once); else computed here."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(p, group) for group in self.param_groups for p in group["params"] if p.grad is not None]
        if nonfinite is None:
            nonfinite = nonfinite_flags([p.grad for p, _ in todo])
        for (p, group), flag in zip(todo, nonfinite):
            self._step_param(_local(p), _local(p.grad), self.state[p], group, flag.bool(), shard_rank(p))
        if self.book_skips_in_step:
            book_skips(self)
        return loss

    def _step_param(self, p, g, state, group, bad, shard=None):
        if not state:  # lazy init; a 0-element FSDP2 shard gets 0-element state
            state["step"], state["skipped"] = 0, 0
            if group["fp32_state"] or p.numel() < group["min_8bit_size"]:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            else:
                for name, signed in (("m", True), ("v", False)):
                    zero = self.book(p.device, signed).zero
                    state[f"{name}_codes"] = torch.full((p.numel(),), zero, dtype=torch.uint8, device=p.device)
                    state[f"{name}_absmax"] = torch.zeros(-(-p.numel() // QGROUP), device=p.device)
        state["step"] += 1  # taken back by book_skips() if `bad`
        self._pending.append((state, bad))
        beta1, beta2 = group["betas"]
        hyper = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"], state["step"])
        if "exp_avg" not in state and (self.use_triton or (self.use_triton is None and p.is_cuda and kernels is not None)):
            kernels.adamw8bit_update_(p, g, state, self.book(p.device, True), self.book(p.device, False), *hyper,
                                      qgroup=QGROUP, skip=bad, shard=shard)
            return
        self._noise = None  # bf16 rounding noise: torch's RNG, or under FSDP2 a stream of this shard's own
        if shard is not None and p.dtype == torch.bfloat16:  # seed drawn from the CPU RNG: no device sync
            seed = int(torch.randint(0, 2**62, ())) + shard
            self._noise = torch.Generator(p.device).manual_seed(seed)
        self._step_torch(p, g, state, hyper, bad)

    def _step_torch(self, p, g, state, hyper, bad):
        """The update in PyTorch, one L2-sized slice at a time (no full-size fp32 temporaries): fp32
        state is torch AdamW's math on the slice; 8-bit state is dequantized, updated, requantized.
        Every write is torch.where(bad, old, new): a skipped tensor keeps its values, no host sync."""
        book_m, book_v = self.book(p.device, True), self.book(p.device, False)
        p, g = p.view(-1), g.reshape(-1)
        chunk = CHUNK_CUDA if p.is_cuda else CHUNK
        keep = lambda old, new: old.copy_(torch.where(bad, old, new))  # noqa: E731
        for start in range(0, p.numel(), chunk):
            end = min(start + chunk, p.numel())
            groups = slice(start // QGROUP, -(-end // QGROUP))
            if "exp_avg" in state:
                m, v = state["exp_avg"].view(-1)[start:end].clone(), state["exp_avg_sq"].view(-1)[start:end].clone()
            else:
                m = book_m.dequantize(state["m_codes"][start:end], state["m_absmax"][groups])
                v = book_v.dequantize(state["v_codes"][start:end], state["v_absmax"][groups], floored=True)
            p32 = self.load_param(p, state, start, end)
            adamw_update_(p32, g[start:end].float(), m, v, *hyper)
            self.store_param(p, p32, state, start, end, bad)
            if "exp_avg" in state:
                keep(state["exp_avg"].view(-1)[start:end], m), keep(state["exp_avg_sq"].view(-1)[start:end], v)
                continue
            for x, book, name in ((m, book_m, "m"), (v, book_v, "v")):
                codes, absmax = torch.empty_like(state[f"{name}_codes"][start:end]), torch.empty_like(state[f"{name}_absmax"][groups])
                book.quantize_(x, codes, absmax)
                keep(state[f"{name}_codes"][start:end], codes), keep(state[f"{name}_absmax"][groups], absmax)

    def load_param(self, p, state, start, end):
        """The fp32 values the update starts from (a copy: the parameter changes only in store_param)."""
        return p[start:end].to(torch.float32, copy=True)

    def store_param(self, p, p32, state, start, end, bad):
        """Write the updated values back, unless `bad`: as they are for fp32, stochastically rounded
        for bf16."""
        old = p[start:end]
        old.copy_(torch.where(bad, old.float(), p32 if p.dtype == torch.float32 else
                                      stochastic_round(p32, self._noise)))

    def load_state_dict(self, state_dict):
        # torch would cast floating state to the parameter's dtype (right for its AdamW); here the
        # absmax and fp32 moments of a bf16 parameter stay fp32 and the codes uint8, as saved. Each
        # tensor moves once, to its parameter's device: a state loaded to the CPU costs exactly its
        # own size on the device, and one already there is taken as it is (as torch does), never
        # cast or copied on the way (a 7b state is GBs: a few transient copies would not fit).
        super().load_state_dict({**state_dict, "state": {}})  # checks the groups, takes their settings
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            if i in state_dict["state"]:
                device = _local(p).device
                self.state[p] = {k: v.to(device) if torch.is_tensor(v) else v
                                 for k, v in state_dict["state"][i].items()}


# -----------------------------------------------------------------------------
# per-layer updates
#
# Per-layer updates: each parameter steps inside backward, from its own post-accumulate-grad hook, as
# soon as its gradient is ready, and frees that gradient at once, so no full gradient buffer ever exists
# (the paper's 7b recipe). Any optimizer works per parameter; AdamW8bit's non-finite skips are reconciled
# once per FSDP2 unit and booked once per step.


def per_layer_conflict(grad_clip, data_parallel):
    """Why per-layer updates cannot run with these settings, or None (train.py's flags check it)."""
    if grad_clip > 0:
        return ("clipping needs the global gradient norm, but per-layer updates free each gradient as soon as its "
                "parameter is updated")
    if data_parallel:
        return "its hooks fire before DDP's gradient all-reduce (each rank would step on its own gradient)"
    return None


class PerLayerOptimizer:
    """One optimizer per parameter, stepped from a post-accumulate-grad hook that then frees the
    gradient, so no full gradient buffer ever exists. Use it where a torch optimizer goes:

        opt = PerLayerOptimizer(model.named_parameters(), lambda ps: AdamW8bit(ps, lr=lr), grad_accum_steps=k)
        for g in opt.param_groups: g["lr"] = schedule(step)   # BEFORE backward: the step runs inside it
        for micro in range(k): (loss / k).backward()           # the k-th backward steps every parameter
        opt.step()                                             # checks that it happened; updates nothing
        opt.zero_grad(set_to_none=True)                        # harmless: the gradients are gone already

    param_groups lists the inner optimizers' own group dicts, so one schedule writing g["lr"]
    drives every per-parameter optimizer, and each uses exactly the schedule's LR of that step.
    Gradient accumulation: a parameter's hook steps on every k-th backward and lets the gradient
    accumulate in between, which keeps a full gradient buffer alive across the micro-steps: with
    k > 1 per-layer updates save no memory over a global optimizer (they stay correct).
    Global grad-norm clipping needs every gradient at once and cannot work: clip_grad_norm_ raises.
    Under DDP the hooks would fire before the all-reduce: do not combine them. Under FSDP2 they
    fire on this rank's reduced shard, which AdamW8bit updates as it is.

    units: lists of parameter names whose gradients arrive together, FSDP2's units (one reduce-
    scatter each, whose hooks then run back to back). A unit's parameters step when its last one
    arrives, after one all-reduce of the whole unit's non-finite flags (nonfinite_flags): a
    collective per unit (~33 per step at 7b), not per parameter (~740), each launched on FSDP2's
    reduce-scatter stream. Without units every parameter steps at once in its own hook.
    """

    def __init__(self, params, make_optimizer, grad_accum_steps=1, units=None):
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(params)]
        self.params = {name: p for name, p in named if p.requires_grad}
        dist = torch.distributed
        if (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and not all(hasattr(p, "to_local") for p in self.params.values())):  # plain tensors on many ranks: DDP
            raise RuntimeError(f"per-layer updates do not work under DDP: {per_layer_conflict(0, True)}. Use FSDP2 "
                               f"(fully_shard) or a global optimizer.")
        self.optimizers = {name: make_optimizer([p]) for name, p in self.params.items()}
        for opt in self.optimizers.values():  # AdamW8bit's skip counts: booked once per step, in step()
            opt.book_skips_in_step = False
        self.book_skips_in_step = True  # False: the caller books them (train.py, with the step's loss)
        self.grad_accum_steps = grad_accum_steps
        self._of = {p: self.optimizers[name] for name, p in self.params.items()}
        self._backwards = {p: 0 for p in self._of}  # backward passes accumulated since p's last step
        units = [[n for n in unit if n in self.params] for unit in units or []]
        in_units = {n for unit in units for n in unit}
        units = [unit for unit in units if unit] + [[n] for n in self.params if n not in in_units]
        self._unit = {}  # parameter -> the list of its unit's parameters
        for unit in units:
            members = [self.params[n] for n in unit]
            for p in members:
                self._unit[p] = members
        self._ready = {}  # id of a unit -> its parameters whose gradient is complete, not yet stepped
        self._stepped = 0  # parameters stepped since the last step() call
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._of]

    @property
    def param_groups(self):
        # Looked up on every access: an inner load_state_dict replaces its group dicts, and a
        # list captured once would go stale (the schedule would stop reaching the optimizers).
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @torch.no_grad()
    def _hook(self, p):
        self._backwards[p] += 1
        if self._backwards[p] < self.grad_accum_steps:
            return  # not the last micro-step: leave the gradient to accumulate
        self._backwards[p] = 0
        unit = self._unit[p]
        ready = self._ready.setdefault(id(unit), [])
        ready.append(p)
        if len(ready) == len(unit):
            self._step_unit(self._ready.pop(id(unit)))

    def _step_unit(self, params):
        """Step these parameters, with one reconciliation of their non-finite flags, and free their gradients."""
        eight_bit = [p for p in params if isinstance(self._of[p], AdamW8bit)]
        flags = dict(zip(eight_bit, nonfinite_flags([p.grad for p in eight_bit])))
        for p in params:
            self._of[p].step(nonfinite=[flags[p]]) if p in flags else self._of[p].step()
            p.grad = None
        self._stepped += len(params)

    def step(self):
        """The updates already ran inside backward; raise if they did not all complete."""
        partial = [name for name, p in self.params.items() if self._backwards[p]]
        if partial:
            raise RuntimeError(f"{len(partial)} parameters (first: {partial[0]}) saw a number of backward passes that "
                               f"is not a multiple of grad_accum_steps={self.grad_accum_steps}; call step() only "
                               f"after the last micro-step")
        for unit in list(self._ready.values()):  # a unit some of whose parameters got no gradient
            self._step_unit(unit)  # (the same on every rank: FSDP2 reduces the same parameters everywhere)
        self._ready.clear()
        if self._stepped == 0:
            raise RuntimeError("no parameter was updated since the last step(): no backward ran, or remove() was called")
        self._stepped = 0
        if self.book_skips_in_step:
            book_skips(self)

    @property
    def skipped(self):
        """Per-parameter updates skipped for a non-finite gradient (AdamW8bit's count; 0 for others)."""
        return sum(getattr(opt, "skipped", 0) for opt in self.optimizers.values())

    def zero_grad(self, set_to_none=True):
        for p in self.params.values():
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def clip_grad_norm_(self, max_norm):
        raise RuntimeError(f"global grad-norm clipping (max_norm={max_norm}) cannot work: "
                           f"{per_layer_conflict(max_norm, False)}. Turn off clipping or per-layer updates.")

    def state_dict(self):
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict):
        saved = state_dict["optimizers"]
        if saved.keys() != self.optimizers.keys():
            raise ValueError(f"checkpoint holds optimizers for {len(saved)} parameters, this model has "
                             f"{len(self.optimizers)} (or their names differ)")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])

    def remove(self):
        """Unregister the hooks: backward no longer steps anything."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
