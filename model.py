"""
LLaMA as the SLTrain paper trains it, in plain PyTorch: token embedding, blocks of
RMSNorm -> causal self-attention with RoPE -> RMSNorm -> SwiGLU MLP, a final RMSNorm and an
untied lm_head. No biases. The LLaMA classes know nothing of SLTrain or parallelism: sltrain.py swaps
the block linears (build_model, at the end, builds a run's model that way), train.py wraps the model.

Build any size on the meta device (free), then materialise and initialise:
    with torch.device("meta"): model = LLaMA(CONFIGS["7b"])
    model.to_empty(device="cuda"); model.init_weights(seed=0)

Decoding (sample.py) keeps each layer's keys and values in a KVCache, so a new token costs one
token's work: model.setup_cache(), then model(prompt, start_pos=0), model(next_id, start_pos=T), ...

ModelConfig also carries SLTrain's settings (rank, alpha, delta): in CONFIGS the paper's per size, train.py's
defaults for --rank, --alpha and --delta; in a checkpoint's build, the run's own. The model never reads them.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sltrain import swap_linears


@dataclass
class ModelConfig:
    dim: int
    ffn_dim: int
    n_heads: int
    n_layers: int
    vocab_size: int = 32000
    max_seq_len: int = 1024
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # the paper's SLTrain settings for this size: train.py's defaults (the model never reads them)
    rank: int = 128
    alpha: float = 32.0
    delta: float = 0.03


# The paper's sizes (arXiv 2406.02214, GaLore configs), plus `tiny` for CPU work and tests, and
# `tiny-narrow`, a dense model within 5% of tiny sltrain's parameter count with the byte-level vocab
# (`train.py --dry-run` prints both; ffn the multiple of 8 nearest 8/3 dim, as tiny's), the baseline that
# benchmarks/why_sparse.py trains full-rank.
CONFIGS = {
    "tiny": ModelConfig(dim=128, ffn_dim=344, n_heads=4, n_layers=4, rank=32, alpha=8.0, delta=0.03),
    "tiny-narrow": ModelConfig(dim=88, ffn_dim=232, n_heads=4, n_layers=4, rank=32, alpha=8.0, delta=0.03),
    "60m": ModelConfig(dim=512, ffn_dim=1376, n_heads=8, n_layers=8, rank=128, alpha=32.0, delta=0.03),
    "130m": ModelConfig(dim=768, ffn_dim=2048, n_heads=12, n_layers=12, rank=256, alpha=16.0, delta=0.03),
    "350m": ModelConfig(dim=1024, ffn_dim=2736, n_heads=16, n_layers=24, rank=256, alpha=16.0, delta=0.03),
    "1b": ModelConfig(dim=2048, ffn_dim=5461, n_heads=32, n_layers=24, rank=512, alpha=8.0, delta=0.03),
    "7b": ModelConfig(dim=4096, ffn_dim=11008, n_heads=32, n_layers=32, rank=1024, alpha=8.0, delta=0.05),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        # normalise in fp32 for stability, return in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).type_as(x)


class Rotary(nn.Module):
    """RoPE: rotate each (even, odd) pair of a head's channels by position * theta^(-2i/d)."""

    def __init__(self, head_dim, max_seq_len, theta):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)

    def reset_parameters(self):
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, x, start=0):  # x: (B, H, T, hd) at positions start .. start + T - 1
        T = x.shape[-2]
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]  # (T, hd/2)
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, hd/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.cache = None  # a KVCache while decoding (LLaMA.setup_cache); a plain attribute, never saved

    def forward(self, x, start_pos=None):
        """start_pos None: the whole sequence, causal (training). An int: x holds the positions
        start_pos .. start_pos + T - 1, and the keys and values of the earlier ones come from the cache."""
        B, T, C = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = self.rotary(q, start_pos or 0), self.rotary(k, start_pos or 0)  # (B, H, T, hd)
        if start_pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = self.cache.update(start_pos, k, v)  # (B, H, start_pos + T, hd)
            # query t sits at position start_pos + t and sees keys 0 .. start_pos + t. SDPA's is_causal
            # aligns the mask to the top left, which is wrong once keys outnumber queries; one new
            # token (T = 1) sees every key and needs no mask at all.
            mask = None
            if T > 1:
                mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(start_pos)  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class KVCache:
    """The keys and values of every position decoded so far, so that a new token computes only its
    own: the per-token cost of the linears no longer grows with the length (attention still reads
    all earlier keys, one dot product each). Buffers are (B, H, max_len, hd), allocated on first use
    in the dtype and device of the keys."""

    def __init__(self, max_len):
        self.max_len, self.k, self.v = max_len, None, None

    def update(self, start, k, v):
        """Store k, v (B, H, T, hd) at positions start .. start + T - 1; return keys and values of
        positions 0 .. start + T - 1."""
        B, H, T, hd = k.shape
        if start + T > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; positions up to {start + T} asked")
        if self.k is None or self.k.shape[0] != B or self.k.dtype != k.dtype:
            self.k = k.new_zeros(B, H, self.max_len, hd)
            self.v = v.new_zeros(B, H, self.max_len, hd)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        return self.k[:, :, :start + T], self.v[:, :, :start + T]


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w_gate = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, start_pos=None):
        x = x + self.attn(self.attn_norm(x), start_pos)
        return x + self.mlp(self.mlp_norm(x))


class LLaMA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @torch.no_grad()
    def init_weights(self, seed=0):
        """Initialise every parameter and buffer, module by module in a fixed order from one seed."""
        torch.manual_seed(seed)
        for module in self.modules():
            if module is not self:
                init_module(module)
        return self

    def setup_cache(self, enabled=True):
        """Give every attention layer an empty KV cache of max_seq_len positions (or remove them).
        Then forward(idx, start_pos=p) treats idx as the positions p, p + 1, ... of the sequence."""
        for block in self.blocks:
            block.attn.cache = KVCache(self.cfg.max_seq_len) if enabled else None

    def forward(self, idx, targets=None, start_pos=None):
        """idx: (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets.
        start_pos: decode with the KV cache (setup_cache), idx being positions start_pos and on."""
        if (start_pos or 0) + idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {(start_pos or 0) + idx.shape[1]} exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, start_pos)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


@torch.no_grad()
def init_module(module):
    """One module's own tensors: dense weights N(0, 0.02), norms 1, RoPE tables, and SL layers by
    their reset_parameters (support from the layer's seed). Children are left alone."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif hasattr(module, "reset_parameters"):
        module.reset_parameters()


def count_params(model):
    """(total, trainable) parameter counts; works on the meta device."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def autocast(device, dtype):
    """The context a forward runs in: bf16 autocast on `device`, or nothing for fp32 (fp16 would need a
    loss scaler, so it is not offered)."""
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


@torch.no_grad()
def evaluate(model, batches, autocast, device):
    """(sum of the next-token losses over every target token of `batches`, as a float64 device tensor;
    the number of tokens, a host int: counting on the host never waits for the device)."""
    model.eval()
    loss_sum, n_tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in batches:
        with autocast:
            _, loss = model(x, y)
        loss_sum += loss.double() * y.numel()
        n_tokens += y.numel()
    model.train()
    return loss_sum, n_tokens


def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows past 709.78


# -----------------------------------------------------------------------------
# a run's model


def build_model(model_config, sl, param_dtype="float32"):
    """The model on the meta device (no memory): LLaMA with its block linears swapped for sl["method"]'s
    layers (sltrain.swap_linears: method, rank, delta, alpha, seed), weights in param_dtype. A checkpoint's
    `build` holds these three arguments, so every reader of a run rebuilds its model with them."""
    with torch.device("meta"):
        model = swap_linears(LLaMA(ModelConfig(**model_config)), **sl)
    for p in model.parameters():  # parameters only: the RoPE tables stay fp32
        p.data = p.data.to(getattr(torch, param_dtype))
    return model
