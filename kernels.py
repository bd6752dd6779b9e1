"""
Triton kernels for SLTrain's sparse plus low-rank layer, y = x W^T with W = scale * B A + S.

Shapes: x (T, in) with T tokens, A (r, in), B (out, r), S (out, in) with nnz = delta*out*in
entries on a fixed support; `values` (nnz,) holds S at `indices` (sorted flat row-major
positions i*in + j). Gradients, with dy = dL/dy (T, out):

    dx = dy W = scale * (dy B) A + dy S              (T, in)
    dA = scale * B^T dy^T x = (scale dy B)^T x      (r, in)
    dB = scale * dy^T x A^T = scale dy^T (x A^T)    (out, r)
    dvalues[e] = (dy^T x)[i_e, j_e] = sum_t dy[t, i_e] x[t, j_e]    for entry e = (i_e, j_e)

Two routes compute the same thing.
  Dense route (sltrain.SLLinearFunction, the public code's way): densify W, one dense matmul;
  backward re-densifies and forms the dense G = dy^T x (out, in) to read dA, dB, dvalues.
  Factorized route (this file): never form W or G:
      forward   z = x A^T (T, r);  y = scale * z B^T  +  x S^T
      backward  dz = scale * dy B (T, r);  dx = dz A + dy S;  dA = dz^T x;  dB = scale * dy^T z;
                dvalues = (dy^T x) sampled at the support.
  The four low-rank products are cuBLAS matmuls. The three sparse products are the kernels:
      spmm_kernel    out += src M^T for a sparse M in CSR form:  y += x S^T  (M = S)
                                                                 dx += dy S  (M = S^T)
      sddmm_kernel   dvalues[e] += sum_t dy^T[i_e, t] x^T[j_e, t]    (a sampled dense product)

Layout (SupportLayout, built once per layer; 4 bytes per nnz plus 4 (in + out + 2)):
  `indices` is row-major sorted, so it already is S in CSR order: row i owns entries
  row_ptr[i]:row_ptr[i+1] and `values` needs no permutation. S^T in CSR order is the same
  entries sorted by column: col_order (nnz,) lists entry positions column by column (rows
  ascending) and col_ptr (in+1,) delimits the columns. Kernels decode i = idx // in and
  j = idx % in from `indices` itself, so no extra row/column arrays are stored.
Gathers run along tokens: the kernels read x^T (in, T) and dy^T (out, T), so the operand row
of entry e is a contiguous run of BLOCK_T tokens (a full cache line in bf16 for BLOCK_T=64).
The transposes are made TOKEN_CHUNK tokens at a time and freed at once. Loads are converted to
fp32 (fp64 for fp64 inputs) before any arithmetic, accumulation is fp32, every edge is masked.

Cost per layer and micro-batch, counting multiply-adds (1 MAC = 2 FLOPs):
  dense nn.Linear fwd+bwd:   3 T in out                       tensor cores
  dense route:               3 T in out + 4 in out r          tensor cores (+ densify passes)
  factorized route:          3 T r (in + out)                 tensor cores
                           + 3 T nnz = 3 delta T in out       CUDA cores, gathered operands
Bytes: each sparse product gathers T*nnz operand elements (2 bytes each in bf16), one MAC per
element, with no reuse in registers; so the sparse kernels are bound by the gather bandwidth
of L1/L2 (~1 MAC per 2 bytes), not by arithmetic. With f = (sustained sparse FLOP/s) /
(dense bf16 matmul FLOP/s), the ratios to dense nn.Linear are
  dense route  1 + 4r / (3T)        factorized route  r (in+out)/(in out) + delta / f
At T = 8192 (break-even f is the f at which the factorized route equals dense nn.Linear):
  | layer               | in:out     | gathered/product | dense route | low-rank | break-even f | at f=.02 / .04 |
  | 1b q/k/v/o          | 2048:2048  |  2.1 GB          | 1.08        | 0.50     | 0.060        | 2.00 / 1.25    |
  | 1b gate, up, down   | 2048:5461  |  5.5 GB          | 1.08        | 0.34     | 0.046        | 1.84 / 1.09    |
  | 7b q/k/v/o          | 4096:4096  | 13.7 GB          | 1.17        | 0.50     | 0.100        | 3.00 / 1.75    |
  | 7b gate, up, down   | 4096:11008 | 36.9 GB          | 1.17        | 0.34     | 0.076        | 2.84 / 1.59    |
An H100 matmul sustains ~650 bf16 TFLOP/s; gathers served at L2 speed (~5-10 TB/s) give ~5-10 TFLOP/s (f
~ .01), at L1 speed (~20-30 TB/s) ~20-30 TFLOP/s (f ~ .04). Tensor cores cannot rescue it: a dense tile
of S at 3-5% density costs the whole tile product, so tl.dot on densified tiles gives f ~ delta at best
(each sparse product as dear as a dense one, a ratio of low-rank + 1 > 1). The model therefore predicts
the factorized route beats dense nn.Linear at training shapes only if the sparse kernels sustain f >=
.05-.10; it wins at small T (decoding, small micro-batches), where the dense route's 4 in out r densify
cost dominates. `python kernels.py --bench` measures f; set sltrain.SPARSE_SPEED from it.
Memory: nothing of size (out, in), ever. Saved for backward besides the inputs: z = x A^T
(T, r). Workspace: TOKEN_CHUNK (in + out) transposed elements, dz (T, r), dvalues in fp32.
At T = 8192, bf16: 7b gate/up 31 + 17 MB vs the dense weight's 90 MB; 7b q/k/v/o 17 + 17 vs
34 MB; 1b q/k/v/o 8 + 8 vs 8 MB (there z alone is as large as W).

Routes: sltrain.route(x, layer) alone picks a layer's route (by the cost model above on CUDA; the
dense route on CPU, where tests force the Triton one through TRITON_INTERPRET=1). This module imports
sltrain.py, never the reverse: importing it installs layer_forward as sltrain.triton_forward.
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from model import CONFIGS
import sltrain


@dataclass(frozen=True)
class Blocks:
    BLOCK_ROWS: int = 32  # rows of the sparse matrix per program (out for y and dvalues, in for dx)
    BLOCK_T: int = 64  # tokens per gathered row segment
    TOKENS_PER_PROGRAM: int = 256  # tokens one sddmm program reduces over (a multiple of BLOCK_T)
    TOKEN_CHUNK: int = 1024  # tokens transposed at a time: bounds the workspace
    num_warps: int = 4


# -----------------------------------------------------------------------------
# the support, laid out once


class SupportLayout:
    """CSR of S (row_ptr) and of S^T (col_ptr, col_order), derived from sorted flat `indices`."""

    def __init__(self, indices, out_features, in_features):
        idx = indices.long()
        rows, cols = idx // in_features, idx % in_features
        zero = torch.zeros(1, dtype=torch.long, device=idx.device)
        # entries of row i: [row_ptr[i], row_ptr[i+1]); `indices` is sorted, so rows are contiguous
        self.row_ptr = torch.cat([zero, torch.bincount(rows, minlength=out_features).cumsum(0)]).int()  # (out+1,)
        # S^T: entries sorted by column, rows ascending inside a column (stable sort of a row-major list)
        self.col_order = torch.argsort(cols, stable=True).int()  # (nnz,) positions into indices/values
        self.col_ptr = torch.cat([zero, torch.bincount(cols, minlength=in_features).cumsum(0)]).int()  # (in+1,)
        self.out_features, self.in_features, self.nnz = out_features, in_features, idx.numel()


# -----------------------------------------------------------------------------
# kernels
#
# Registers (`python kernels.py --compile-report`, sm_90, bf16, default Blocks). A program's tile is
# BLOCK_ROWS x BLOCK_T = 32 x 64 cells over 4 warps, 16 cells per thread: an fp32 accumulator or
# product each, plus the gathered element. If the start of a gathered row may be anywhere (a row
# stride of T tokens, T not a multiple of 16: Triton specializes launches only on multiples of 16),
# every cell needs its own 64-bit address and its own 2-byte load: 157 registers (spmm, dx) and 233
# (sddmm), so 3 and 2 blocks (12 and 8 of 64 warps) fit on an SM, for kernels that wait on
# gathers. The launchers therefore pad every transposed row to a multiple of 16 elements
# (_transposed) and the kernels tell the compiler (tl.multiple_of): a thread's 8 consecutive
# tokens then share one 64-bit address (offsets 0, 2, .., 14 bytes in the instruction). 72
# registers (spmm) and 64 (sddmm): 7 and 8 blocks, 28 and 32 resident warps. The loads stay 2-byte
# ones: the token mask t < T has no known alignment (masking at a multiple of BLOCK_T over
# zero-padded rows would let them become 16-byte vectors, at about the same register count).


@triton.jit
def spmm_kernel(out_ptr, src_t_ptr, values_ptr, indices_ptr, ptr_ptr, order_ptr,
                T, n_rows, n_in, stride_out, stride_src,
                TRANSPOSED: tl.constexpr, ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[t, g] += sum_{e in row g of M} M_e * src^T[c_e, t], for BLOCK_ROWS rows g x BLOCK_T tokens t.

    M = S  (TRANSPOSED=False): g = row i of S, c_e = its column j_e,  src^T = x^T:  y  += x S^T
    M = S^T (TRANSPOSED=True): g = column j,   c_e = its row i_e,     src^T = dy^T: dx += dy S
    out (T, n_rows) holds the low-rank part already; src_t (n_cols, T) is token-contiguous, its
    stride_src a multiple of 16 (see _transposed).
    """
    g = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,) rows of M
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) tokens
    g_ok, t_ok = g < n_rows, t < T
    start = tl.load(ptr_ptr + g, mask=g_ok, other=0)  # row g of M is entries start..end-1
    end = tl.load(ptr_ptr + g + 1, mask=g_ok, other=0)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_T), ACC)
    for k in range(0, tl.max(end - start, axis=0)):  # the k-th entry of every row at once
        live = start + k < end  # rows with fewer than k+1 entries sit this step out
        if TRANSPOSED:
            e = tl.load(order_ptr + start + k, mask=live, other=0)  # S^T's k-th entry -> position in S
            c = tl.load(indices_ptr + e, mask=live, other=0) // n_in  # its row i_e
        else:
            e = start + k
            c = tl.load(indices_ptr + e, mask=live, other=0) % n_in  # its column j_e
        m = tl.load(values_ptr + e, mask=live, other=0).to(ACC)  # (BLOCK_ROWS,) M_e
        row = tl.multiple_of(c.to(tl.int64) * stride_src, 16)  # (BLOCK_ROWS,) row starts, 16-aligned
        src = tl.load(src_t_ptr + row[:, None] + t[None, :],
                      mask=live[:, None] & t_ok[None, :], other=0).to(ACC)  # (BLOCK_ROWS, BLOCK_T) gathered rows
        acc += m[:, None] * src
    out = out_ptr + t[None, :].to(tl.int64) * stride_out + g[:, None]  # out[t, g] seen as (BLOCK_ROWS, BLOCK_T)
    mask = g_ok[:, None] & t_ok[None, :]
    total = tl.load(out, mask=mask, other=0).to(ACC) + acc
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sddmm_kernel(dvalues_ptr, dy_t_ptr, x_t_ptr, indices_ptr, row_ptr_ptr,
                 T, n_out, n_in, stride_dy, stride_x,
                 ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, TOKENS_PER_PROGRAM: tl.constexpr):
    """dvalues[e] += sum_t dy^T[i_e, t] x^T[j_e, t] over this program's TOKENS_PER_PROGRAM tokens,
    for the entries of BLOCK_ROWS rows i of S. Programs over other token ranges add atomically, with relaxed
    ordering: only the sum counts, nothing reads dvalues before the kernel ends (acq_rel fences every add)."""
    i = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (BLOCK_ROWS,) rows of S
    t_first = tl.program_id(1) * TOKENS_PER_PROGRAM
    i_ok = i < n_out
    start = tl.load(row_ptr_ptr + i, mask=i_ok, other=0)
    end = tl.load(row_ptr_ptr + i + 1, mask=i_ok, other=0)
    dy_rows = dy_t_ptr + tl.multiple_of(i.to(tl.int64) * stride_dy, 16)[:, None]  # strides: see _transposed
    for k in range(0, tl.max(end - start, axis=0)):  # the k-th entry of every row at once
        e = start + k
        live = e < end
        j = tl.load(indices_ptr + e, mask=live, other=0) % n_in  # (BLOCK_ROWS,) its column
        x_rows = x_t_ptr + tl.multiple_of(j.to(tl.int64) * stride_x, 16)[:, None]
        acc = tl.zeros((BLOCK_ROWS,), ACC)
        for t0 in range(0, TOKENS_PER_PROGRAM, BLOCK_T):
            t = t_first + t0 + tl.arange(0, BLOCK_T)
            mask = live[:, None] & (t < T)[None, :]
            dy = tl.load(dy_rows + t[None, :], mask=mask, other=0).to(ACC)  # (BLOCK_ROWS, BLOCK_T), cache-hot across k
            x = tl.load(x_rows + t[None, :], mask=mask, other=0).to(ACC)  # (BLOCK_ROWS, BLOCK_T) gathered
            acc += tl.sum(dy * x, axis=1)
        tl.atomic_add(dvalues_ptr + e, acc, mask=live, sem="relaxed")


# -----------------------------------------------------------------------------
# launchers: token chunks, transposes, grids


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _transposed(a):
    """a (Tc, n) -> a^T (n, Tc), a view whose rows start every multiple of 16 elements (the rows
    are padded), as the kernels promise the compiler (see the register note above the kernels)."""
    Tc, n = a.shape
    padded = torch.empty(n, -(-Tc // 16) * 16, dtype=a.dtype, device=a.device)
    padded[:, :Tc].copy_(a.t())
    return padded[:, :Tc]


def sparse_matmul(out, src, values, indices, ptr, order, n_in, blocks):
    """out += src M^T in place (see spmm_kernel); out (T, n_rows), src (T, n_cols)."""
    T, n_rows = out.shape
    for t0 in range(0, T, blocks.TOKEN_CHUNK):
        out_c = out[t0:t0 + blocks.TOKEN_CHUNK]  # (Tc, n_rows) view
        src_t = _transposed(src[t0:t0 + blocks.TOKEN_CHUNK])  # (n_cols, Tc), freed after the launch
        grid = (triton.cdiv(n_rows, blocks.BLOCK_ROWS), triton.cdiv(out_c.shape[0], blocks.BLOCK_T))
        spmm_kernel[grid](out_c, src_t, values, indices, ptr, ptr if order is None else order,
                          out_c.shape[0], n_rows, n_in, out_c.stride(0), src_t.stride(0),
                          TRANSPOSED=order is not None, ACC=_acc(out.dtype),
                          BLOCK_ROWS=blocks.BLOCK_ROWS, BLOCK_T=blocks.BLOCK_T, num_warps=blocks.num_warps)


def sampled_dense(dy, x, indices, row_ptr, n_in, blocks, dtype):
    """dvalues[e] = (dy^T x)[i_e, j_e] (see sddmm_kernel), accumulated in `dtype` (fp32 or fp64)."""
    (T, n_out), nnz = dy.shape, indices.numel()
    dvalues = torch.zeros(nnz, dtype=dtype, device=dy.device)
    assert blocks.TOKENS_PER_PROGRAM % blocks.BLOCK_T == 0
    for t0 in range(0, T, blocks.TOKEN_CHUNK):
        dy_t = _transposed(dy[t0:t0 + blocks.TOKEN_CHUNK])  # (out, Tc)
        x_t = _transposed(x[t0:t0 + blocks.TOKEN_CHUNK])  # (in, Tc)
        grid = (triton.cdiv(n_out, blocks.BLOCK_ROWS), triton.cdiv(dy_t.shape[1], blocks.TOKENS_PER_PROGRAM))
        sddmm_kernel[grid](dvalues, dy_t, x_t, indices, row_ptr, dy_t.shape[1], n_out, n_in,
                           dy_t.stride(0), x_t.stride(0), ACC=_acc(dtype), BLOCK_ROWS=blocks.BLOCK_ROWS,
                           BLOCK_T=blocks.BLOCK_T, TOKENS_PER_PROGRAM=blocks.TOKENS_PER_PROGRAM,
                           num_warps=blocks.num_warps)
    return dvalues


# -----------------------------------------------------------------------------
# the factorized route as an autograd function, and the entry point


class SLLinearTriton(torch.autograd.Function):
    """y = scale * (x A^T) B^T + x S^T, never forming W; saves (x, A, B, values, indices, z = x A^T)."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scale, layout, blocks):
        # autocast: compute in its dtype with autocast off inside, as SLLinearFunction does
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
            z = x2 @ A.to(dtype).t()  # (T, r)
            y = (z * scale) @ B.to(dtype).t()  # (T, out), the low-rank part
            if layout.nnz and x2.shape[0]:
                sparse_matmul(y, x2, values, indices, layout.row_ptr, None, layout.in_features, blocks)  # y += x S^T
        ctx.save_for_backward(x2, A, B, values, indices, z)
        ctx.scale, ctx.layout, ctx.blocks, ctx.x_shape = scale, layout, blocks, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, A, B, values, indices, z = ctx.saved_tensors
        scale, layout, blocks = ctx.scale, ctx.layout, ctx.blocks
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (T, out)
        A_, B_ = A.to(x2.dtype), B.to(x2.dtype)
        sparse = layout.nnz and x2.shape[0]
        dz = (dy2 @ B_).mul_(scale)  # (T, r) = scale * dy B
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = dz @ A_  # (T, in), the low-rank part
            if sparse:  # dx += dy S, S read column by column
                sparse_matmul(dx, dy2, values, indices, layout.col_ptr, layout.col_order, layout.in_features, blocks)
            dx = dx.reshape(ctx.x_shape)
        dA = (dz.t() @ x2).to(A.dtype)  # (r, in)
        dB = (dy2.t() @ z).mul_(scale).to(B.dtype)  # (out, r)
        if ctx.needs_input_grad[3]:
            acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
            dvalues = (sampled_dense(dy2, x2, indices, layout.row_ptr, layout.in_features, blocks, acc) if sparse
                       else torch.zeros_like(values, dtype=acc)).to(values.dtype)
        return dx, dA, dB, dvalues, None, None, None, None


def sl_linear(x, A, B, values, indices, scale, layout=None, blocks=None):
    """y = x (scale * B A + S)^T for x (..., in) by the factorized route, differentiable in x, A, B
    and values. layout: the layer's SupportLayout (built here when None)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton route on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
    layout = layout if layout is not None else SupportLayout(indices, B.shape[0], A.shape[1])
    return SLLinearTriton.apply(x, A, B, values, indices, scale, layout, blocks or Blocks())


def support_layout(layer):
    """The layer's SupportLayout, built on the first Triton-route call and kept on the layer until
    `indices` is rewritten (reset_parameters, load_state_dict) or moved."""
    key = (layer.indices.device, layer.indices.data_ptr(), layer.indices._version)
    if getattr(layer, "_layout_key", None) != key:  # plain attributes: never saved, never moved
        layer._layout = SupportLayout(layer.indices, layer.out_features, layer.in_features)
        layer._layout_key = key
    return layer._layout


def layer_forward(x, layer):
    """SLLinear's Triton route: layer(x) calls it when sltrain.route(x, layer) says "triton"."""
    return sl_linear(x, layer.A, layer.B, layer.values, layer.indices, layer.scale, layout=support_layout(layer))


sltrain.triton_forward = layer_forward  # importing this module gives every SLLinear its Triton route


# -----------------------------------------------------------------------------
# compile report: python kernels.py --compile-report (no GPU needed, no TRITON_INTERPRET)

SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # A100, H100; both: 65,536 registers, 64 warps, 32 blocks


def occupancy(registers, shared_bytes, num_warps, arch):
    """Resident warps per SM over the 64 possible. Resident blocks are limited by registers
    (allocated per warp in units of 256), shared memory (CUDA reserves 1 KB more per block),
    warps (64) and blocks (32)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(65536 // (per_warp * num_warps), SHARED_PER_SM[arch] // (shared_bytes + 1024), 64 // num_warps, 32)
    return blocks * num_warps / 64


def launches():
    """(name, dtype, kernel, pointer types, constexprs, num_warps) for every Triton kernel of the
    project, for each dtype the code launches it with, at its default tiles. Integer arguments are
    i32; indices and pointers into them are int32 (out * in < 2^31 at every paper shape)."""
    import inspect
    import optim
    b, index = Blocks(), dict(indices_ptr="*i32", ptr_ptr="*i32", order_ptr="*i32", row_ptr_ptr="*i32")
    # dtype: activations (and values): bf16 params, bf16 autocast over fp32 params, fp32, fp64 (tests)
    for dtype, act, values in (("bf16", "bf16", "bf16"), ("bf16/fp32", "bf16", "fp32"),
                               ("fp32", "fp32", "fp32"), ("fp64", "fp64", "fp64")):
        acc = tl.float64 if act == "fp64" else tl.float32
        for name, transposed in (("spmm_kernel[y]", False), ("spmm_kernel[dx]", True)):
            yield (name, dtype, spmm_kernel, dict(index, out_ptr="*" + act, src_t_ptr="*" + act, values_ptr="*" + values),
                   dict(TRANSPOSED=transposed, ACC=acc, BLOCK_ROWS=b.BLOCK_ROWS, BLOCK_T=b.BLOCK_T), b.num_warps)
        if act == values:  # sddmm reads no values: autocast launches it as bf16
            yield ("sddmm_kernel", dtype, sddmm_kernel,
                   dict(index, dvalues_ptr="*fp64" if act == "fp64" else "*fp32", dy_t_ptr="*" + act, x_t_ptr="*" + act),
                   dict(ACC=acc, BLOCK_ROWS=b.BLOCK_ROWS, BLOCK_T=b.BLOCK_T, TOKENS_PER_PROGRAM=b.TOKENS_PER_PROGRAM),
                   b.num_warps)
    blocks = inspect.signature(optim.adamw8bit_triton_).parameters["blocks"].default
    for p in ("bf16", "fp32"):  # codes and lookup counts are uint8; tables, absmax and scalars fp32
        types = {a: ("*u8" if "codes" in a or "count" in a else "*fp32") if a.endswith("_ptr") else "fp32"
                 for a in optim._adamw8bit_kernel.arg_names}
        types.update(p_ptr="*" + p, g_ptr="*" + p, seed_ptr="*i32", skip_ptr="*i32", n="i32")
        yield ("_adamw8bit_kernel", p, optim._adamw8bit_kernel, types,
               dict(QBLOCK=optim.BLOCK, BLOCKS=blocks, STOCHASTIC=p == "bf16"),  # bf16 weights round stochastically
               4)  # the launcher passes no num_warps: Triton's default


def compile_report(archs=(80, 90)):
    """Compile every launch ahead of time for each arch and yield its resources: registers and
    static shared memory from cuobjdump on the cubin, spill bytes from ptxas's own log."""
    from triton.backends.compiler import GPUTarget
    triton.knobs.compilation.always_compile = True  # ptxas runs (and logs) even when Triton has it cached
    triton.knobs.nvidia.dump_ptxas_log = True  # printed to stdout: the one place spill bytes appear
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for name, dtype, fn, types, constexprs, num_warps in launches():
        signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
        # tensors from torch's allocator are 16-byte aligned and Triton specializes launches on it
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if signature[a][0] == "*"}
        for arch in archs:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                k = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, aligned),
                                   target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
            assert "spill stores" in log.getvalue(), "ptxas printed no spill report"
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(k.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
            res = {key: int(n) for key, n in re.findall(r"(\w+):(\d+)", usage.split("Function")[-1])}
            shared = res["SHARED"] + k.metadata.shared  # static + the dynamic amount each launch asks for
            yield dict(kernel=name, arch=arch, dtype=dtype, registers=res["REG"],
                       spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())),
                       shared_bytes=shared, occupancy=occupancy(res["REG"], shared, num_warps, arch))


# -----------------------------------------------------------------------------
# benchmark: python kernels.py --bench (a CUDA GPU only)

# the paper's sizes as model.py defines them: name -> (dim, ffn, rank, delta)
SHAPES = {name: (c.dim, c.ffn_dim, c.rank, c.delta) for name, c in CONFIGS.items() if name != "tiny"}


def bench(T=8192, dtype=torch.bfloat16):
    import torch.nn.functional as F
    from triton.testing import do_bench

    dense_tflops = []
    print(f"T={T} tokens, {dtype}, {torch.cuda.get_device_name()}; times in ms for dense nn.Linear, "
          f"ratios to it for the dense route (route) and the Triton path (triton); memory = peak extra MB of fwd+bwd")
    print(f"{'model':5} {'layer':8} {'in':>5} {'out':>5} | {'fwd ms':>6} {'route':>5} {'triton':>6} | "
          f"{'bwd ms':>6} {'route':>5} {'triton':>6} | {'f+b ms':>6} {'route':>5} {'triton':>6} | "
          f"{'mem MB':>6} {'route':>5} {'triton':>6} {'W MB':>5} | sparse TFLOP/s y dx dvalues | f")
    for model, (d, ffn, r, delta) in SHAPES.items():
        for layer, (n_in, n_out) in {"q/k/v/o": (d, d), "gate/up": (d, ffn), "down": (ffn, d)}.items():
            sl = sltrain.SLLinear(n_in, n_out, r, delta, alpha=8.0, seed=1).cuda().to(dtype)
            sl.B.data.normal_(0, 0.02)
            layout = SupportLayout(sl.indices, n_out, n_in)
            W = sl.dense_weight().detach().requires_grad_()
            x = torch.randn(T, n_in, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn(T, n_out, device="cuda", dtype=dtype)
            args = (sl.A, sl.B, sl.values, sl.indices, sl.scale)
            routes = {"dense": lambda: F.linear(x, W), "route": lambda: sltrain.SLLinearFunction.apply(x, *args),
                      "triton": lambda: sl_linear(x, *args, layout=layout)}
            row = {}
            for name, fn in routes.items():
                params = [x, W] if name == "dense" else [x, sl.A, sl.B, sl.values]

                def fwd_bwd():
                    for p in params:
                        p.grad = None
                    fn().backward(dy)
                fwd, both = do_bench(fn), do_bench(fwd_bwd)
                for p in params:
                    p.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd()
                torch.cuda.synchronize()
                row[name] = (fwd, both - fwd, both, (torch.cuda.max_memory_allocated() - base) / 1e6)
            dense_tflops.append(2 * T * n_in * n_out / row["dense"][0] / 1e9)
            blocks, x2, dy2 = Blocks(), x.detach(), dy
            flop = 2 * T * layout.nnz / 1e9  # per sparse product, in GFLOP (ms -> TFLOP/s)
            t_y = do_bench(lambda: sparse_matmul(torch.zeros_like(dy2), x2, sl.values, sl.indices, layout.row_ptr, None, n_in, blocks))
            t_dx = do_bench(lambda: sparse_matmul(torch.zeros_like(x2), dy2, sl.values, sl.indices, layout.col_ptr, layout.col_order, n_in, blocks))
            t_dv = do_bench(lambda: sampled_dense(dy2, x2, sl.indices, layout.row_ptr, n_in, blocks, torch.float32))
            sparse = [flop / t for t in (t_y, t_dx, t_dv)]
            f = (3 * flop / (t_y + t_dx + t_dv)) / dense_tflops[-1]
            cells = " | ".join(f"{row['dense'][c]:6.2f} {row['route'][c] / row['dense'][c]:5.2f} "
                               f"{row['triton'][c] / row['dense'][c]:6.2f}" for c in range(4))
            print(f"{model:5} {layer:8} {n_in:5} {n_out:5} | {cells} {W.numel() * W.element_size() / 1e6:5.1f} | "
                  f"{sparse[0]:6.1f} {sparse[1]:6.1f} {sparse[2]:6.1f} | {f:.3f}", flush=True)
    print(f"f = sparse-kernel TFLOP/s over dense nn.Linear forward TFLOP/s (median dense {sorted(dense_tflops)[len(dense_tflops) // 2]:.0f}); "
          f"set sltrain.SPARSE_SPEED (now {sltrain.SPARSE_SPEED}) to the value at your shapes so route 'auto' picks the faster route.")


if __name__ == "__main__":
    if sys.argv[1:] not in (["--compile-report"], ["--bench"]):
        sys.exit("usage: python kernels.py --compile-report | --bench")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernels.py compiles real kernels: unset TRITON_INTERPRET (interpreter timings are not kernel speed)")
    if sys.argv[1] == "--compile-report":
        for row in compile_report():
            print(json.dumps(row), flush=True)
    elif not torch.cuda.is_available():
        sys.exit("kernels.py --bench needs a CUDA GPU; none here, so nothing is measured")
    else:
        bench()
