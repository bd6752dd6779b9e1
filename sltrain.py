"""
SLTrain: sparse plus low-rank linear layers (Han et al., arXiv 2406.02214).

Every linear layer inside the transformer blocks is re-parameterised as

    W = scale * B @ A + S,        scale = alpha / rank
    A: (rank, in)    init U(-1/sqrt(in), 1/sqrt(in))
    B: (out, rank)   init zeros, so W = S at step 0
    S: (out, in)     sparse with a FIXED random support of nnz = floor(delta * out * in)
                     entries drawn uniformly without replacement; only the nnz `values`
                     are trained, init U(-1/sqrt(in), 1/sqrt(in)).

The support is stored as sorted, unique, flat row-major positions (`indices`, position
i * in + j is entry (i, j)). It is drawn from a generator seeded by the layer's own `seed`,
so the same seed gives the same support on every rank, on every device and after a resume;
it is also saved in the state dict, so a checkpoint carries it.

delta = 0 gives the `lowrank` baseline; `full` keeps plain dense nn.Linear layers. The baseline
cannot start from B = 0: with no S, every block's q, k, v and MLP hidden state are 0, which is a
stationary point (all block gradients vanish: dB = scale * (dy^T x) A^T with x = 0 or dy = 0), so
only embeddings and lm_head would ever train. With delta = 0, B starts U(-1/sqrt(rank), 1/sqrt(rank)),
nn.Linear's default for a (out, rank) weight. With delta > 0, S breaks the symmetry and B = 0.

Two routes compute a layer in training: the dense route here (SLLinearFunction: rebuild W, one
matmul), and the Triton route of kernels.py (x A^T, then B, plus sparse kernels; W never formed).
route(x, layer) is the one place that picks between them. kernels.py is imported only when a layer
first takes that route, so a machine without triton trains on the dense route.
Decoding has a third way, csr_forward at the end: the factors and S as a torch CSR tensor.
"""
import functools
import math
import os
import warnings

import torch
import torch.nn as nn

METHODS = ("full", "lowrank", "sltrain")
BLOCK_LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down")
ROUTE = os.environ.get("SLTRAIN_ROUTE", "auto")  # "auto" | "dense" | "triton"
SPARSE_SPEED = 0.02  # sparse-kernel FLOP/s over dense matmul FLOP/s (a guess; benchmarks/kernel_bench.py measures it)


def random_support(numel, nnz, generator):
    """`nnz` distinct positions in [0, numel), uniform over all subsets, sorted (int64).

    A full randperm of a 7b layer (45M positions) takes seconds, so for small delta we draw
    with replacement and deduplicate: the distinct values of i.i.d. uniform draws form a
    uniformly random subset of their size, and a uniformly random nnz-subset of that is a
    uniformly random nnz-subset of [0, numel).
    """
    if nnz == 0:
        return torch.empty(0, dtype=torch.long)
    if 4 * nnz > numel:  # dense enough that a permutation is cheaper than rejection
        return torch.randperm(numel, generator=generator)[:nnz].sort().values
    support = torch.empty(0, dtype=torch.long)
    while support.numel() < nnz:
        extra = nnz - support.numel() + nnz // 32 + 16  # a little slack for collisions
        support = torch.cat([support, torch.randint(numel, (extra,), generator=generator)]).unique()
    keep = torch.randperm(support.numel(), generator=generator)[:nnz]
    return support[keep].sort().values


def row_ptr(indices, out_features, in_features):
    """S's CSR row offsets (out+1,), in `indices`' dtype: row i owns entries row_ptr[i]:row_ptr[i+1]
    of `indices` and `values`, which are contiguous because `indices` is row-major sorted."""
    counts = torch.bincount(torch.div(indices, in_features, rounding_mode="floor"), minlength=out_features)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(indices.dtype)


def densify(A, B, values, indices, scale):
    """W = scale * B @ A + S as a dense (out, in) tensor in A's dtype."""
    W = (B @ A).mul_(scale)  # (out, in)
    W.view(-1).index_add_(0, indices, values.to(W.dtype))
    return W


class SLLinearFunction(torch.autograd.Function):
    """y = x W^T with W = scale * B A + S, saving only (x, A, B, values, indices).

    This is the plain PyTorch "dense route": W is rebuilt in forward and again in backward
    and never kept between them, so no (out, in) tensor lives across the step. It is the CPU
    path and the oracle the Triton kernels (kernels.py) are tested against. With the dense
    gradient G = dy^T x (out, in):
        dx = dy W,   dA = scale * B^T G,   dB = scale * G A^T,   dvalues = G[support].
    """

    @staticmethod
    def forward(ctx, x, A, B, values, indices, scale):
        # Under autocast, compute in the autocast dtype (as F.linear would), with autocast off
        # inside so every op here has one explicit dtype; backward reuses the same dtype.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(dtype)
            W = densify(A.to(dtype), B.to(dtype), values, indices, scale)  # (out, in), freed on return
            y = x @ W.t()
        ctx.save_for_backward(x, A, B, values, indices)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, values, indices = ctx.saved_tensors
        scale, dtype = ctx.scale, x.dtype
        A_, B_ = A.to(dtype), B.to(dtype)
        dy = dy.to(dtype)
        W = densify(A_, B_, values, indices, scale)  # recomputed, (out, in)
        dx = dy @ W  # (..., in)
        del W
        G = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        dA = (B_.t() @ G).mul_(scale)  # (rank, in)
        dB = (G @ A_.t()).mul_(scale)  # (out, rank)
        dvalues = G.view(-1)[indices]  # (nnz,)
        return dx, dA.to(A.dtype), dB.to(B.dtype), dvalues.to(values.dtype), None, None


# -----------------------------------------------------------------------------
# which route a layer takes


def choose_route(T, in_features, out_features, rank, nnz):
    """The cheaper route for T tokens by kernels.py's cost model, in tensor-core multiply-adds."""
    dense_cost = 3 * T * in_features * out_features + 4 * in_features * out_features * rank
    triton_cost = 3 * T * rank * (in_features + out_features) + 3 * T * nnz / SPARSE_SPEED
    return "triton" if triton_cost < dense_cost else "dense"


@functools.cache
def triton_route():
    """kernels.layer_forward, (x, layer) -> y, or None where the triton package is not installed.
    Imported on first use, not at the top: triton is optional for the dense route."""
    try:
        import kernels
    except ModuleNotFoundError as e:
        if e.name != "triton":  # a missing triton means no Triton route; anything else is a bug
            raise
        return None
    return kernels.layer_forward


def route(x, layer):
    """"dense" or "triton": the route layer(x) takes. ROUTE ("auto", or SLTRAIN_ROUTE) forces one;
    auto takes the Triton route only for CUDA tensors, with triton installed, when it is cheaper."""
    if ROUTE not in ("auto", "dense", "triton"):
        raise ValueError(f"SLTRAIN_ROUTE must be 'auto', 'dense' or 'triton', got {ROUTE!r}")
    if ROUTE == "triton" and triton_route() is None:
        raise RuntimeError("SLTRAIN_ROUTE=triton needs the triton package (kernels.py): pip install triton")
    if ROUTE != "auto":
        return ROUTE
    if not x.is_cuda or triton_route() is None:
        return "dense"
    T = x.numel() // x.shape[-1]
    return choose_route(T, layer.in_features, layer.out_features, layer.rank, layer.nnz)


def takes_triton(model, token_counts, cuda):
    """Whether route() sends some SLLinear of `model` to the Triton route at one of `token_counts`, on CUDA
    tensors or not: each layer it does builds its SupportLayout there (kernels.support_layout)."""
    if ROUTE != "auto":
        return ROUTE == "triton"
    return cuda and triton_route() is not None and any(
        choose_route(T, m.in_features, m.out_features, m.rank, m.nnz) == "triton"
        for T in token_counts for m in model.modules() if isinstance(m, SLLinear))


# -----------------------------------------------------------------------------
# the layer


def setting_errors(rank, delta, alpha, max_rank):
    """[(name, value, what a valid value is)] for each SL setting that breaks its rule; max_rank: the
    smallest side of the layers they are for. The one home of these rules: SLLinear and train.py's
    flags both ask here."""
    return [(name, value, rule) for ok, name, value, rule in (
        (1 <= rank <= max_rank, "rank", rank, f"must be in [1, {max_rank}]"),
        (0 <= delta < 1, "delta", delta, "the sparse density must be in [0, 1)"),
        (0 < alpha < math.inf, "alpha", alpha, "must be > 0 (scale = alpha / rank)")) if not ok]


class SLLinear(nn.Module):
    def __init__(self, in_features, out_features, rank, delta, alpha, seed=0):
        super().__init__()
        for name, value, rule in setting_errors(rank, delta, alpha, min(in_features, out_features))[:1]:
            raise ValueError(f"{name} {value}: {rule} for a {in_features} -> {out_features} layer")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.delta, self.alpha, self.seed = rank, delta, alpha, seed
        self.scale = alpha / rank
        self.nnz = math.floor(delta * out_features * in_features)
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.empty(out_features, rank))
        self.values = nn.Parameter(torch.empty(self.nnz))
        index_dtype = torch.int32 if out_features * in_features < 2**31 else torch.int64
        self.register_buffer("indices", torch.empty(self.nnz, dtype=index_dtype))
        if self.A.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Draw the support from this layer's seed; A, values ~ U(+-1/sqrt(in)); B = 0 (or, with no
        sparse part, U(+-1/sqrt(rank)): see the module docstring)."""
        bound = 1.0 / math.sqrt(self.in_features)
        g = torch.Generator().manual_seed(self.seed)
        support = random_support(self.out_features * self.in_features, self.nnz, g)
        self.indices.copy_(support.to(self.indices.dtype))
        self.A.uniform_(-bound, bound)
        if self.nnz:
            self.B.zero_()
        else:
            self.B.uniform_(-1.0 / math.sqrt(self.rank), 1.0 / math.sqrt(self.rank))
        self.values.uniform_(-bound, bound)

    def dense_weight(self):
        """W = scale * B @ A + S, the (out, in) weight this layer represents."""
        return densify(self.A, self.B, self.values, self.indices, self.scale)

    @torch.no_grad()
    def part_norms(self, full=lambda t: t):
        """(||S||_F, ||scale * B A||_F): how large each part of W is. B A is never formed:
        ||B A||_F^2 = trace(B^T B A A^T), the sum of (B^T B) * (A A^T), two (rank, rank) products.
        full: how to get a whole tensor from a sharded one (train.py's, under FSDP2)."""
        A, B, values = (full(t).double() for t in (self.A, self.B, self.values))
        low_rank = self.scale * ((B.t() @ B) * (A @ A.t())).sum().clamp_min(0).sqrt()
        return values.norm().item(), low_rank.item()

    def forward(self, x):
        if route(x, self) == "triton":
            return triton_route()(x, self)
        return SLLinearFunction.apply(x, self.A, self.B, self.values, self.indices, self.scale)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"delta={self.delta}, alpha={self.alpha}, nnz={self.nnz}")


# -----------------------------------------------------------------------------
# the swap that puts SL layers into a model


def swap_linears(model, method, rank=None, delta=None, alpha=None, seed=0):
    """Replace the seven linear layers of every block (q, k, v, o, gate, up, down).

    method: 'full' keeps dense nn.Linear; 'lowrank' is SLLinear with delta = 0; 'sltrain' is
    SLLinear with the given delta. Embeddings, norms and lm_head stay dense. Works on the meta
    device (call model.init_weights afterwards). Layer k gets support seed `seed * 100_003 + k`,
    k counting layers in model order, so supports differ between layers and repeat across runs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "full":
        return model
    delta = 0.0 if method == "lowrank" else delta
    k = 0
    for block in model.blocks:
        for name in BLOCK_LINEARS:
            parent_name, child_name = name.split(".")
            parent = getattr(block, parent_name)
            old = getattr(parent, child_name)
            with torch.device(old.weight.device):
                new = SLLinear(old.in_features, old.out_features, rank, delta, alpha, seed=seed * 100_003 + k)
            setattr(parent, child_name, new)
            k += 1
    return model


# -----------------------------------------------------------------------------
# decoding from the factors and S in CSR form


@torch.no_grad()
def csr_forward(layer, x):
    """y = scale * (x A^T) B^T + x S^T for an SLLinear `layer`, without forming the dense W.

    Decoding reads every weight once per token, so its speed is the bytes it reads: A and B
    (rank * (in + out) values) plus S in CSR form (nnz values, nnz column indices and out + 1 row
    offsets) instead of the out * in values of a merged W: 0.44 (gate, up, down) to 0.60 (q, k, v,
    o) of the bytes at the 7b shapes, fp32 with int32 indices. The CSR tensor comes straight from
    `indices`, which are already row-major sorted, and is cached on the layer (a plain attribute:
    never saved) until the values or the support change. On the CPU it holds fp32 values: torch's
    CPU sparse product has no bf16 kernel.
    x: (..., in) -> (..., out). Inference only: no autograd.
    """
    key = (layer.values.data_ptr(), layer.values._version, layer.indices.data_ptr(), layer.indices._version)
    if getattr(layer, "_csr_key", None) != key:
        n_in, n_out = layer.in_features, layer.out_features
        with warnings.catch_warnings():  # torch flags its CSR tensors as beta on first use
            warnings.simplefilter("ignore")
            values = layer.values.detach().float() if layer.values.is_cpu else layer.values.detach()
            layer._csr = torch.sparse_csr_tensor(row_ptr(layer.indices, n_out, n_in), layer.indices % n_in, values,
                                                 (n_out, n_in), check_invariants=False)
        layer._csr_key = key
    x2 = x.reshape(-1, layer.in_features)  # (N, in)
    y = (x2 @ layer.A.t()) @ layer.B.t()  # (N, r) then (N, out): the low-rank product, never B @ A
    sparse = layer._csr @ x2.t().to(layer._csr.dtype)  # S x^T: (out, in) @ (in, N) -> (out, N)
    y = y.mul_(layer.scale).add_(sparse.t().to(y.dtype))  # (N, out)
    return y.reshape(*x.shape[:-1], layer.out_features)
