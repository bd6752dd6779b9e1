"""
AdamW with 8-bit group-wise quantized moments.

AdamW8bit stores Adam's two moments m and v as one byte per element: each quantization group of 256
elements keeps an fp32 absmax, and every element the index of the nearest value of a
256-entry code book (the "dynamic" map of Dettmers et al., derived in codebook.py), scaled by its
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
step for all tensors (`book_skips`: one host sync), by step(), by per_layer.PerLayerOptimizer, or by
train.py with the step's loss (one read from the device per step).
"""
import math

import torch

from codebook import QGROUP, Codebook

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

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
    """The non-finite flags (device tensors) of the tensors these AdamW8bit optimizers updated since the
    last book_skips: a caller that reads other values from the device reads these with them."""
    return [flag for opt in optimizers for _, flag in getattr(opt, "_pending", ())]


def book_skips(optimizers, flags=None):
    """Book the last step's skips of these AdamW8bit optimizers: a skipped tensor's step count goes back
    (its update was discarded), its skip count up. flags: pending_flags' values, read by the caller;
    else read here, one host sync for all the tensors."""
    pending = [item for opt in optimizers for item in getattr(opt, "_pending", ())]
    if pending and flags is None:
        flags = torch.stack([flag for _, flag in pending]).tolist()
    for (state, _), bad in zip(pending, flags or ()):
        state["step"] -= int(bad)
        state["skipped"] += int(bad)
    for opt in optimizers:
        if hasattr(opt, "_pending"):
            opt._pending.clear()


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
        if hasattr(g, "device_mesh"):
            groups.setdefault(g.device_mesh.get_group(), []).append(i)
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
            book_skips([self])
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
        if "exp_avg" not in state and (self.use_triton or (self.use_triton is None and p.is_cuda and triton is not None)):
            adamw8bit_triton_(p, g, state, self.book(p.device, True), self.book(p.device, False), *hyper, skip=bad,
                              shard=shard)
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
# the fused Triton update (CUDA): dequantize, update, requantize in one pass over memory

if triton is not None:

    @triton.jit
    def _quantize_tile(x, lut_count_ptr, lut_threshold_ptr):
        """x (GROUPS, 256) fp32 -> codes (GROUPS, 256) uint8, absmax (GROUPS,): Codebook.quantize_."""
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


def adamw8bit_triton_(p, g, state, book_m, book_v, lr, beta1, beta2, eps, weight_decay, step, groups=4, skip=None,
                      shard=None):
    """The fused kernel over one tensor; same arguments as AdamW8bit's PyTorch path. skip: a 0-dim
    device flag; when set, the kernel writes nothing. shard: shard_rank(p), folded into the seed."""
    n = p.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, QGROUP * groups),)
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
                            lr / (1 - beta1**step), QGROUP=QGROUP, GROUPS=groups, STOCHASTIC=p.dtype == torch.bfloat16)
