"""model.py against references: causal masking, RoPE vs complex rotation, parameter counts vs
the paper's table (REFERENCE §3), and meta-device construction."""
from dataclasses import replace

import pytest
import torch

from model import CONFIGS, LLaMA, Rotary, count_params
from sltrain import METHODS, SLLinear, swap_linears

# the paper's parameter counts in millions at vocab 32000 (REFERENCE §3), rounded to integers
PAPER_PARAMS = {
    "full": {"60m": 58, "130m": 134, "350m": 368, "1b": 1339, "7b": 6738},
    "lowrank": {"60m": 43, "130m": 94, "350m": 185, "1b": 609, "7b": 2821},
    "sltrain": {"60m": 44, "130m": 97, "350m": 194, "1b": 646, "7b": 3145},
}


def build(name, method, vocab=32000, device="meta", seed=0, **overrides):
    cfg = replace(CONFIGS[name], vocab_size=vocab, **overrides)
    with torch.device("meta"):
        model = swap_linears(LLaMA(cfg), method, cfg.rank, cfg.delta, cfg.alpha, seed=seed)
    if device != "meta":
        model.to_empty(device=device)
        model.init_weights(seed)
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["60m", "130m", "350m", "1b", "7b"])
def test_param_counts_match_paper(name, method):
    model = build(name, method)
    total, trainable = count_params(model)
    assert total == trainable
    assert all(p.is_meta for p in model.parameters())  # counting 7b allocated nothing
    ref = PAPER_PARAMS[method][name] * 1e6
    # within 1%, or within the paper's rounding to whole millions (60m sltrain: 43.53M -> "44")
    assert abs(total - ref) <= max(0.01 * ref, 0.5e6), f"{name} {method}: {total / 1e6:.2f}M vs {ref / 1e6:.0f}M"


@pytest.mark.parametrize("method", METHODS)
def test_causal_masking(method):
    torch.manual_seed(0)
    model = build("tiny", method, vocab=97, device="cpu", max_seq_len=32)
    with torch.no_grad():  # make B nonzero so the low-rank path is exercised too
        for m in model.modules():
            if isinstance(m, SLLinear):
                m.B.normal_(0, 0.02)
    idx = torch.randint(0, 97, (2, 32))
    changed = idx.clone()
    changed[:, 20:] = torch.randint(0, 97, (2, 12))
    logits, _ = model(idx)
    logits2, _ = model(changed)
    torch.testing.assert_close(logits[:, :20], logits2[:, :20], rtol=0, atol=1e-5)
    assert (logits[:, 20:] - logits2[:, 20:]).abs().max() > 1e-3  # the future did change something


def test_rotary_matches_complex_rotation():
    hd, T = 16, 11
    rot = Rotary(hd, max_seq_len=T, theta=10000.0)
    rot.reset_parameters()
    x = torch.randn(2, 3, T, hd, dtype=torch.float64)
    # reference: pair channels (2i, 2i+1) as a complex number and multiply by e^{i t theta^{-2i/hd}}
    freqs = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freqs  # (T, hd/2)
    ref = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * torch.polar(
        torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(rot(x.float()).double(), ref, rtol=1e-5, atol=1e-5)


def attention_inputs(monkeypatch, model, idx):
    """Per block: the attention's input x and the q, k it hands to scaled_dot_product_attention."""
    xs, qks = [], []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: qks.append((q, k)) or real(q, k, v, *a, **kw))
    hooks = [b.attn.register_forward_pre_hook(lambda m, args: xs.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    monkeypatch.undo()
    return xs, qks


def complex_rope(x, theta):
    """x (B, H, T, hd) float64: channel pairs (2i, 2i+1) as complex numbers times e^{i t theta^(-2i/hd)}."""
    T, hd = x.shape[-2:]
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(z).flatten(-2)


@pytest.mark.parametrize("method", ["full", "sltrain"])
def test_rope_rotates_q_and_k_inside_the_model(monkeypatch, method):
    model = build("tiny", method, vocab=97, device="cpu", max_seq_len=24)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    xs, qks = attention_inputs(monkeypatch, model, idx)
    assert len(xs) == len(qks) == model.cfg.n_layers
    for block, x, (q, k) in zip(model.blocks, xs, qks):
        H, hd = block.attn.n_heads, block.attn.head_dim
        with torch.no_grad():
            for w, got in ((block.attn.wq, q), (block.attn.wk, k)):
                raw = w(x).view(2, 24, H, hd).transpose(1, 2)  # (B, H, T, hd) before RoPE
                torch.testing.assert_close(got.double(), complex_rope(raw, model.cfg.rope_theta), rtol=1e-5, atol=1e-5)


def test_attention_scores_depend_only_on_relative_position(monkeypatch):
    """Tokens repeating with period P give the first block periodic q and k before RoPE; with both
    rotated, the score of (i, j) equals that of (i + P, j + P). Rotating only one of them breaks it."""
    P, T = 5, 20
    model = build("tiny", "sltrain", vocab=97, device="cpu", max_seq_len=T)
    idx = torch.randint(0, 97, (1, P), generator=torch.Generator().manual_seed(1)).repeat(1, T // P)
    _, qks = attention_inputs(monkeypatch, model, idx)
    q, k = qks[0]
    scores = (q.double() @ k.double().transpose(-1, -2))[0]  # (H, T, T)
    torch.testing.assert_close(scores[:, P:, P:], scores[:, :-P, :-P], rtol=1e-5, atol=1e-6)
    assert (scores[:, P:, P:] - scores[:, P:, :-P]).abs().max() > 1e-3  # and they do depend on i - j


def reference_weight(layer):
    """A block linear's dense weight in float64; SL layers rebuilt from (row, col) pairs."""
    if not isinstance(layer, SLLinear):
        return layer.weight.detach().double()
    idx = layer.indices.long()
    S = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    S[idx // layer.in_features, idx % layer.in_features] = layer.values.detach().double()
    return layer.alpha / layer.rank * layer.B.detach().double() @ layer.A.detach().double() + S  # scale = alpha / r


def reference_logits(model, idx):
    """LLaMA written out in float64 from the paper's definition (RMSNorm eps 1e-6, RoPE theta 1e4 on
    interleaved pairs, causal softmax attention, SwiGLU, untied head), reading only the weights."""
    def rms(x, w):
        return x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.detach().double()

    B, T = idx.shape
    x = model.tok_emb.weight.detach().double()[idx]  # (B, T, C)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for block in model.blocks:
        a = block.attn
        h = rms(x, block.attn_norm.weight)
        q, k, v = ((h @ reference_weight(w).t()).view(B, T, a.n_heads, -1).transpose(1, 2) for w in (a.wq, a.wk, a.wv))
        q, k = complex_rope(q, 10000.0), complex_rope(k, 10000.0)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~causal, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + y @ reference_weight(a.wo).t()
        h = rms(x, block.mlp_norm.weight)
        m = block.mlp
        gate, up = h @ reference_weight(m.w_gate).t(), h @ reference_weight(m.w_up).t()
        x = x + (gate * torch.sigmoid(gate) * up) @ reference_weight(m.w_down).t()
    return rms(x, model.norm.weight) @ model.lm_head.weight.detach().double().t()


@pytest.mark.parametrize("method", METHODS)
def test_forward_matches_a_float64_llama_written_out(method, device):
    """The model on the test device (a GPU where there is one) against the float64 reference on the CPU."""
    model = build("tiny", method, vocab=97, device="cpu", max_seq_len=24)
    with torch.no_grad():  # nonzero B and non-unit norm gains, so every term counts
        for name, p in model.named_parameters():
            if name.endswith(".B") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model.to(device)(idx.to(device))
    torch.testing.assert_close(logits.double().cpu(), reference_logits(model.cpu(), idx), rtol=1e-4, atol=1e-5)


def test_loss_is_cross_entropy_and_init_matches_paper():
    model = build("tiny", "sltrain", vocab=97, device="cpu", max_seq_len=16)
    idx = torch.randint(0, 97, (3, 16))
    targets = torch.randint(0, 97, (3, 16))
    logits, loss = model(idx, targets)
    z = logits.double().reshape(-1, 97)  # reference: mean of logsumexp(z) - z[target], in float64
    ref = (z.exp().sum(1).log() - z[torch.arange(z.shape[0]), targets.reshape(-1)]).mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5  # near-uniform at init
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    sl = model.blocks[0].mlp.w_up
    assert isinstance(sl, SLLinear) and torch.all(sl.B == 0)  # W = S at step 0
    bound = 1 / sl.in_features ** 0.5
    assert sl.A.abs().max() <= bound and sl.values.abs().max() <= bound
    assert sl.A.abs().max() > 0.9 * bound  # uniform over the whole range, not a narrower init


def test_sequence_longer_than_max_raises():
    model = build("tiny", "full", vocab=97, device="cpu", max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("method", METHODS)
def test_no_parameter_is_dead_after_one_update(method):
    """With delta = 0 and B = 0 every block would sit at a stationary point forever (the low-rank
    baseline would train only its embeddings). With B = 0 and S != 0 (sltrain), A's first gradient
    is scale * B^T G = 0 by design, and nonzero once B has moved: so look after one update."""
    model = build("tiny", method, vocab=97, device="cpu", max_seq_len=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 97, (2, 16))
    for _ in range(2):
        opt.zero_grad()
        model(idx, idx)[1].backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.numel() and not p.grad.abs().max() > 0]
    assert not dead, dead
