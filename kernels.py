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
  Triton route (this file): never form W or G:
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
of entry e is a contiguous run of TILE_T tokens (a full cache line in bf16 for TILE_T=64).
The transposes are made TOKEN_CHUNK tokens at a time and freed at once. Loads are converted to
fp32 (fp64 for fp64 inputs) before any arithmetic, accumulation is fp32, every edge is masked.

Cost per layer and micro-batch, counting multiply-adds (1 MAC = 2 FLOPs):
  dense nn.Linear fwd+bwd:   3 T in out                       tensor cores
  dense route:               3 T in out + 4 in out r          tensor cores (+ densify passes)
  Triton route:              3 T r (in + out)                 tensor cores
                           + 3 T nnz = 3 delta T in out       CUDA cores, gathered operands
Bytes: each sparse product gathers T*nnz operand elements (2 bytes each in bf16), one MAC per
element, with no reuse in registers; so the sparse kernels are bound by the gather bandwidth
of L1/L2 (~1 MAC per 2 bytes), not by arithmetic. With f = (sustained sparse FLOP/s) /
(dense bf16 matmul FLOP/s), the ratios to dense nn.Linear are
  dense route  1 + 4r / (3T)        Triton route  r (in+out)/(in out) + delta / f
At T = 8192 (break-even f is the f at which the Triton route equals dense nn.Linear):
  | layer               | in:out     | gathered/product | dense route | low-rank | break-even f | at f=.02 / .04 |
  | 1b q/k/v/o          | 2048:2048  |  2.1 GB          | 1.08        | 0.50     | 0.060        | 2.00 / 1.25    |
  | 1b gate, up, down   | 2048:5461  |  5.5 GB          | 1.08        | 0.34     | 0.046        | 1.84 / 1.09    |
  | 7b q/k/v/o          | 4096:4096  | 13.7 GB          | 1.17        | 0.50     | 0.100        | 3.00 / 1.75    |
  | 7b gate, up, down   | 4096:11008 | 36.9 GB          | 1.17        | 0.34     | 0.076        | 2.84 / 1.59    |
An H100 matmul sustains ~650 bf16 TFLOP/s; gathers served at L2 speed (~5-10 TB/s) give ~5-10 TFLOP/s (f
~ .01), at L1 speed (~20-30 TB/s) ~20-30 TFLOP/s (f ~ .04). Tensor cores cannot rescue it: a dense tile
of S at 3-5% density costs the whole tile product, so tl.dot on densified tiles gives f ~ delta at best
(each sparse product as dear as a dense one, a ratio of low-rank + 1 > 1). The model therefore predicts
the Triton route beats dense nn.Linear at training shapes only if the sparse kernels sustain f >=
.05-.10; it wins at small T (decoding, small micro-batches), where the dense route's 4 in out r densify
cost dominates. `python benchmarks/kernel_bench.py` measures f; set sltrain.SPARSE_SPEED from it.
Memory: nothing of size (out, in), ever. Saved for backward besides the inputs: z = x A^T
(T, r). Workspace: TOKEN_CHUNK (in + out) transposed elements, dz (T, r), dvalues in fp32.
At T = 8192, bf16: 7b gate/up 31 + 17 MB vs the dense weight's 90 MB; 7b q/k/v/o 17 + 17 vs
34 MB; 1b q/k/v/o 8 + 8 vs 8 MB (there z alone is as large as W).

Routes: sltrain.route(x, layer) alone picks a layer's route (by the cost model above on CUDA; the
dense route on CPU, where tests force the Triton one through TRITON_INTERPRET=1). sltrain imports this
module the first time a layer takes the Triton route and calls layer_forward(x, layer), which reads the
layer's A, B, values, indices and scale; this module imports nothing of the project.

The file also holds the fused update of optim.AdamW8bit (the last section), so all Triton is here. Why
the kernels use the registers they do, the compile report (benchmarks/compile_report.py) and the bench
that measures f (benchmarks/kernel_bench.py): docs/kernels.md.
"""
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Tiles:
    """How the sparse kernels tile their work; the defaults are the ones docs/kernels.md's register
    note measures. A program (one CTA on the GPU) computes a TILE_ROWS x TILE_T tile."""
    TILE_ROWS: int = 32  # rows of the sparse matrix per program (out for y and dvalues, in for dx)
    TILE_T: int = 64  # tokens per gathered row segment
    TOKENS_PER_PROGRAM: int = 256  # tokens one sddmm program reduces over (a multiple of TILE_T)
    TOKEN_CHUNK: int = 1024  # tokens transposed at a time: bounds the workspace
    num_warps: int = 4


# -----------------------------------------------------------------------------
# the support, laid out once


def csr_ptr(flat, n_rows, n_cols):
    """Row offsets (n_rows + 1,) of a sparse matrix whose flat row-major positions `flat` are sorted: row i
    owns entries ptr[i]:ptr[i+1]."""
    counts = torch.bincount(torch.div(flat, n_cols, rounding_mode="floor"), minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class SupportLayout:
    """CSR of S (row_ptr) and of S^T (col_ptr, col_order), derived from sorted flat `indices`."""

    def __init__(self, indices, out_features, in_features):
        idx = indices.long()
        rows, cols = idx // in_features, idx % in_features
        self.row_ptr = csr_ptr(idx, out_features, in_features).int()  # (out+1,)
        # S^T: entries sorted by column, rows ascending inside a column (stable sort of a row-major list)
        self.col_order = torch.argsort(cols, stable=True).int()  # (nnz,) positions into indices/values
        # S's column pointers are the row pointers of S^T, whose flat positions are j * out + i
        self.col_ptr = csr_ptr(cols * out_features + rows, in_features, out_features).int()  # (in+1,)
        self.out_features, self.in_features, self.nnz = out_features, in_features, idx.numel()


# -----------------------------------------------------------------------------
# kernels (docs/kernels.md: their registers and occupancy)


@triton.jit
def spmm_kernel(out_ptr, src_t_ptr, values_ptr, indices_ptr, ptr_ptr, order_ptr,
                T, n_rows, n_in, stride_out, stride_src,
                TRANSPOSED: tl.constexpr, ACC: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_T: tl.constexpr):
    """out[t, g] += sum_{e in row g of M} M_e * src^T[c_e, t], for TILE_ROWS rows g x TILE_T tokens t.

    M = S  (TRANSPOSED=False): g = row i of S, c_e = its column j_e,  src^T = x^T:  y  += x S^T
    M = S^T (TRANSPOSED=True): g = column j,   c_e = its row i_e,     src^T = dy^T: dx += dy S
    out (T, n_rows) holds the low-rank part already; src_t (n_cols, T) is token-contiguous, its
    stride_src a multiple of 16 (see _transposed).
    """
    g = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)  # (TILE_ROWS,) rows of M
    t = tl.program_id(1) * TILE_T + tl.arange(0, TILE_T)  # (TILE_T,) tokens
    g_ok, t_ok = g < n_rows, t < T
    start = tl.load(ptr_ptr + g, mask=g_ok, other=0)  # row g of M is entries start..end-1
    end = tl.load(ptr_ptr + g + 1, mask=g_ok, other=0)
    acc = tl.zeros((TILE_ROWS, TILE_T), ACC)
    for k in range(0, tl.max(end - start, axis=0)):  # the k-th entry of every row at once
        live = start + k < end  # rows with fewer than k+1 entries sit this step out
        if TRANSPOSED:
            e = tl.load(order_ptr + start + k, mask=live, other=0)  # S^T's k-th entry -> position in S
            c = tl.load(indices_ptr + e, mask=live, other=0) // n_in  # its row i_e
        else:
            e = start + k
            c = tl.load(indices_ptr + e, mask=live, other=0) % n_in  # its column j_e
        m = tl.load(values_ptr + e, mask=live, other=0).to(ACC)  # (TILE_ROWS,) M_e
        row = tl.multiple_of(c.to(tl.int64) * stride_src, 16)  # (TILE_ROWS,) row starts, 16-aligned
        src = tl.load(src_t_ptr + row[:, None] + t[None, :],
                      mask=live[:, None] & t_ok[None, :], other=0).to(ACC)  # (TILE_ROWS, TILE_T) gathered rows
        acc += m[:, None] * src
    out = out_ptr + t[None, :].to(tl.int64) * stride_out + g[:, None]  # out[t, g] seen as (TILE_ROWS, TILE_T)
    mask = g_ok[:, None] & t_ok[None, :]
    total = tl.load(out, mask=mask, other=0).to(ACC) + acc
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sddmm_kernel(dvalues_ptr, dy_t_ptr, x_t_ptr, indices_ptr, row_ptr_ptr,
                 T, n_out, n_in, stride_dy, stride_x,
                 ACC: tl.constexpr, TILE_ROWS: tl.constexpr, TILE_T: tl.constexpr, TOKENS_PER_PROGRAM: tl.constexpr):
    """dvalues[e] += sum_t dy^T[i_e, t] x^T[j_e, t] over this program's TOKENS_PER_PROGRAM tokens,
    for the entries of TILE_ROWS rows i of S. Programs over other token ranges add atomically, with relaxed
    ordering: only the sum counts, and nothing reads dvalues before the kernel ends (Triton's default,
    acq_rel, would fence every add)."""
    i = tl.program_id(0) * TILE_ROWS + tl.arange(0, TILE_ROWS)  # (TILE_ROWS,) rows of S
    t_first = tl.program_id(1) * TOKENS_PER_PROGRAM
    i_ok = i < n_out
    start = tl.load(row_ptr_ptr + i, mask=i_ok, other=0)
    end = tl.load(row_ptr_ptr + i + 1, mask=i_ok, other=0)
    dy_rows = dy_t_ptr + tl.multiple_of(i.to(tl.int64) * stride_dy, 16)[:, None]  # strides: see _transposed
    for k in range(0, tl.max(end - start, axis=0)):  # the k-th entry of every row at once
        e = start + k
        live = e < end
        j = tl.load(indices_ptr + e, mask=live, other=0) % n_in  # (TILE_ROWS,) its column
        x_rows = x_t_ptr + tl.multiple_of(j.to(tl.int64) * stride_x, 16)[:, None]
        acc = tl.zeros((TILE_ROWS,), ACC)
        for t0 in range(0, TOKENS_PER_PROGRAM, TILE_T):
            t = t_first + t0 + tl.arange(0, TILE_T)
            mask = live[:, None] & (t < T)[None, :]
            dy = tl.load(dy_rows + t[None, :], mask=mask, other=0).to(ACC)  # (TILE_ROWS, TILE_T), cache-hot across k
            x = tl.load(x_rows + t[None, :], mask=mask, other=0).to(ACC)  # (TILE_ROWS, TILE_T) gathered
            acc += tl.sum(dy * x, axis=1)
        tl.atomic_add(dvalues_ptr + e, acc, mask=live, sem="relaxed")


# -----------------------------------------------------------------------------
# launchers: token chunks, transposes, grids


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _transposed(a):
    """a (Tc, n) -> a^T (n, Tc), a view whose rows start every multiple of 16 elements (the rows
    are padded), as the kernels promise the compiler (docs/kernels.md: why it matters for registers)."""
    Tc, n = a.shape
    padded = torch.empty(n, -(-Tc // 16) * 16, dtype=a.dtype, device=a.device)
    padded[:, :Tc].copy_(a.t())
    return padded[:, :Tc]


def sparse_matmul(out, src, values, indices, ptr, order, n_in, tiles):
    """out += src M^T in place (see spmm_kernel); out (T, n_rows), src (T, n_cols)."""
    T, n_rows = out.shape
    for t0 in range(0, T, tiles.TOKEN_CHUNK):
        out_c = out[t0:t0 + tiles.TOKEN_CHUNK]  # (Tc, n_rows) view
        src_t = _transposed(src[t0:t0 + tiles.TOKEN_CHUNK])  # (n_cols, Tc), freed after the launch
        grid = (triton.cdiv(n_rows, tiles.TILE_ROWS), triton.cdiv(out_c.shape[0], tiles.TILE_T))
        spmm_kernel[grid](out_c, src_t, values, indices, ptr, ptr if order is None else order,
                          out_c.shape[0], n_rows, n_in, out_c.stride(0), src_t.stride(0),
                          TRANSPOSED=order is not None, ACC=_acc(out.dtype),
                          TILE_ROWS=tiles.TILE_ROWS, TILE_T=tiles.TILE_T, num_warps=tiles.num_warps)


def sampled_dense(dy, x, indices, row_ptr, n_in, tiles, dtype):
    """dvalues[e] = (dy^T x)[i_e, j_e] (see sddmm_kernel), accumulated in `dtype` (fp32 or fp64)."""
    (T, n_out), nnz = dy.shape, indices.numel()
    dvalues = torch.zeros(nnz, dtype=dtype, device=dy.device)
    assert tiles.TOKENS_PER_PROGRAM % tiles.TILE_T == 0
    for t0 in range(0, T, tiles.TOKEN_CHUNK):
        dy_t = _transposed(dy[t0:t0 + tiles.TOKEN_CHUNK])  # (out, Tc)
        x_t = _transposed(x[t0:t0 + tiles.TOKEN_CHUNK])  # (in, Tc)
        grid = (triton.cdiv(n_out, tiles.TILE_ROWS), triton.cdiv(dy_t.shape[1], tiles.TOKENS_PER_PROGRAM))
        sddmm_kernel[grid](dvalues, dy_t, x_t, indices, row_ptr, dy_t.shape[1], n_out, n_in,
                           dy_t.stride(0), x_t.stride(0), ACC=_acc(dtype), TILE_ROWS=tiles.TILE_ROWS,
                           TILE_T=tiles.TILE_T, TOKENS_PER_PROGRAM=tiles.TOKENS_PER_PROGRAM,
                           num_warps=tiles.num_warps)
    return dvalues


# -----------------------------------------------------------------------------
# the Triton route as an autograd function, and the entry point


class SLLinearTriton(torch.autograd.Function):
    """y = scale * (x A^T) B^T + x S^T, never forming W; saves (x, A, B, values, indices, z = x A^T)."""

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scale, layout, tiles):
        # autocast: compute in its dtype with autocast off inside, as SLLinearFunction does
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (T, in)
            z = x2 @ A.to(dtype).t()  # (T, r)
            y = (z * scale) @ B.to(dtype).t()  # (T, out), the low-rank part
            if layout.nnz and x2.shape[0]:
                sparse_matmul(y, x2, values, indices, layout.row_ptr, None, layout.in_features, tiles)  # y += x S^T
        ctx.save_for_backward(x2, A, B, values, indices, z)
        ctx.scale, ctx.layout, ctx.tiles, ctx.x_shape = scale, layout, tiles, x.shape
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, A, B, values, indices, z = ctx.saved_tensors
        scale, layout, tiles = ctx.scale, ctx.layout, ctx.tiles
        dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (T, out)
        A_, B_ = A.to(x2.dtype), B.to(x2.dtype)
        sparse = layout.nnz and x2.shape[0]
        dz = (dy2 @ B_).mul_(scale)  # (T, r) = scale * dy B
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = dz @ A_  # (T, in), the low-rank part
            if sparse:  # dx += dy S, S read column by column
                sparse_matmul(dx, dy2, values, indices, layout.col_ptr, layout.col_order, layout.in_features, tiles)
            dx = dx.reshape(ctx.x_shape)
        dA = (dz.t() @ x2).to(A.dtype)  # (r, in)
        dB = (dy2.t() @ z).mul_(scale).to(B.dtype)  # (out, r)
        if ctx.needs_input_grad[3]:
            acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
            dvalues = (sampled_dense(dy2, x2, indices, layout.row_ptr, layout.in_features, tiles, acc) if sparse
                       else torch.zeros_like(values, dtype=acc)).to(values.dtype)
        return dx, dA, dB, dvalues, None, None, None, None


def sl_linear(x, A, B, values, indices, scale, layout=None, tiles=None):
    """y = x (scale * B A + S)^T for x (..., in) by the Triton route, differentiable in x, A, B
    and values. layout: the layer's SupportLayout (built here when None)."""
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton route on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
    layout = layout if layout is not None else SupportLayout(indices, B.shape[0], A.shape[1])
    return SLLinearTriton.apply(x, A, B, values, indices, scale, layout, tiles or Tiles())


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


# -----------------------------------------------------------------------------
# the fused AdamW8bit update (optim.py; CUDA): dequantize, update, requantize in one pass over memory

@triton.jit
def _quantize_tile(x, lut_count_ptr, lut_threshold_ptr):
    """x (GROUPS, 256) fp32 -> codes (GROUPS, 256) uint8, absmax (GROUPS,): optim.Codebook.quantize_."""
    absmax = tl.max(tl.abs(x), axis=1)
    x = tl.div_rn(x, tl.where(absmax > 0, absmax, 1.0)[:, None])
    bucket = (x.to(tl.int32, bitcast=True) >> 16) + 32768
    codes = tl.load(lut_count_ptr + bucket) + (x > tl.load(lut_threshold_ptr + bucket)).to(tl.uint8)
    return codes, absmax


@triton.jit
def _adamw8bit_kernel(p_ptr, g_ptr, m_codes_ptr, m_absmax_ptr, v_codes_ptr, v_absmax_ptr,
                      m_values_ptr, m_lut_count_ptr, m_lut_threshold_ptr,
                      v_values_ptr, v_lut_count_ptr, v_lut_threshold_ptr,
                      seed_ptr, skip_ptr, n, decay, one_minus_beta1, beta2, one_minus_beta2, eps, bias2_sqrt, step_size,
                      QGROUP: tl.constexpr, GROUPS: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Program i updates quantization groups i*GROUPS .. (i+1)*GROUPS - 1, a (GROUPS, QGROUP) tile."""
    rows = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)  # (GROUPS,) group indices
    offs = rows[:, None] * QGROUP + tl.arange(0, QGROUP)[None, :]  # (GROUPS, QGROUP)
    keep = tl.load(skip_ptr + 0 * rows) == 0  # (GROUPS,): a non-finite gradient in this tensor: write nothing
    mask, row_mask = (offs < n) & keep[:, None], (rows * QGROUP < n) & keep
    # load and dequantize; bf16 is converted to fp32 before any arithmetic
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_codes = tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    v_codes = tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(m_values_ptr + m_codes) * tl.load(m_absmax_ptr + rows, mask=row_mask, other=0.0)[:, None]
    v = tl.load(v_values_ptr + v_codes) * tl.load(v_absmax_ptr + rows, mask=row_mask, other=0.0)[:, None]
    # AdamW, as adamw_update_ (the scalars come from the host, rounded as torch rounds them)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    # IEEE round-to-nearest, as torch and the interpreter: compiled `sqrt` and `/` are approximate
    # (a few ulp, subnormals flushed to 0), and a v whose group absmax is subnormal would lose them
    denom = tl.div_rn(tl.sqrt_rn(v), bias2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    if STOCHASTIC:  # a bf16 weight: stochastic_round (16 random bits under the kept 16, then drop them)
        noise = (tl.randint(tl.load(seed_ptr), offs) & 0xFFFF).to(tl.int32)
        p = ((p.to(tl.int32, bitcast=True) + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    # requantize; padding lanes are 0 so they do not touch the absmax
    m_codes, m_absmax = _quantize_tile(tl.where(mask, m, 0.0), m_lut_count_ptr, m_lut_threshold_ptr)
    v_codes, v_absmax = _quantize_tile(tl.where(mask, v, 0.0), v_lut_count_ptr, v_lut_threshold_ptr)
    tl.store(m_codes_ptr + offs, m_codes, mask=mask)
    tl.store(v_codes_ptr + offs, v_codes, mask=mask)
    tl.store(m_absmax_ptr + rows, m_absmax, mask=row_mask)
    tl.store(v_absmax_ptr + rows, v_absmax, mask=row_mask)


def adamw8bit_update_(p, g, state, book_m, book_v, lr, beta1, beta2, eps, weight_decay, step, qgroup, groups=4,
                      skip=None, shard=None):
    """optim.AdamW8bit's update of one tensor in one kernel; the same arguments as its PyTorch path, whose
    state (m and v codes, one absmax per qgroup elements) and code books (optim.Codebook) it reads and
    writes. skip: a 0-dim device flag; when set, the kernel writes nothing. shard: optim.shard_rank(p),
    folded into the seed."""
    n = p.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, qgroup * groups),)
    # the rounding noise's seed, drawn on the device from torch's RNG (checkpointed; no host sync)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=p.device)
    if shard is not None:  # Philox streams of other seeds are independent: one per FSDP2 shard
        seed = (seed + shard * 0x3C6EF372) % (2**31 - 1)
    seed = seed.int()
    _adamw8bit_kernel[grid](p, g.contiguous(), state["m_codes"], state["m_absmax"], state["v_codes"], state["v_absmax"],
                            book_m.values, book_m.lut_count, book_m.lut_threshold,
                            book_v.values_floored, book_v.lut_count, book_v.lut_threshold,
                            seed, torch.zeros((), dtype=torch.int32, device=p.device) if skip is None else skip.int(),
                            n, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, (1 - beta2**step) ** 0.5,
                            lr / (1 - beta1**step), QGROUP=qgroup, GROUPS=groups, STOCHASTIC=p.dtype == torch.bfloat16)
