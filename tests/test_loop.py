"""train.py's loop against independent references: the gradient that reaches optimizer.step (float64
recomputation of the full batch, clipped by hand), the schedule (its closed form), the batches (the
token stream itself), and which optimizer owns each parameter (the docs)."""
import copy
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import train
from data.loader import TokenData
from model import CONFIGS, LLaMA
from optim import AdamW8bit, PerLayerOptimizer
from sltrain import SLLinear, swap_linears

SMALL = ["--model", "tiny", "--seq-len", "64", "--eval-tokens", "1024", "--log-every", "1"]


def run_one_step(monkeypatch, data_dir, out_dir, device, *flags):
    """Run train.py for one step on `device` in fp32; return (on the CPU) the initial weights, every
    micro-batch it drew, and the gradients as optimizer.step() received them."""
    seen = dict(batches=[], grads=None, init=None)
    real_build, real_batch = train.build_optimizer, TokenData.random_batch

    def build(model, args):
        seen["init"] = {k: v.cpu().clone() for k, v in model.state_dict().items()}
        opt = real_build(model, args)
        real_step = opt.step

        def step(*a, **k):
            seen["grads"] = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
            return real_step(*a, **k)
        opt.step = step
        return opt

    def batch(self, step, *a, **k):
        x, y = real_batch(self, step, *a, **k)
        if step == 0:  # not the batch read ahead for step 1
            seen["batches"].append((x.cpu(), y.cpu()))
        return x, y

    monkeypatch.setattr(train, "build_optimizer", build)
    monkeypatch.setattr(TokenData, "random_batch", batch)
    train.main(SMALL + ["--data", data_dir, "--out-dir", str(out_dir), "--max-steps", "1", "--device", device,
                        "--dtype", "float32", *flags])
    monkeypatch.undo()
    return seen


def float64_full_batch_grads(seen, method="sltrain", vocab=257, seq_len=64):
    """The gradient of the mean loss over all micro-batches at once, in float64, from a model built
    here from model.py and the initial weights (not through train.py's loop)."""
    cfg = replace(CONFIGS["tiny"], vocab_size=vocab, max_seq_len=seq_len)
    model = swap_linears(LLaMA(cfg), method, cfg.rank, cfg.delta, cfg.alpha).init_weights(0)
    model.load_state_dict(seen["init"])
    model.double()
    x = torch.cat([b[0] for b in seen["batches"]])
    y = torch.cat([b[1] for b in seen["batches"]])
    _, loss = model(x, y)
    loss.backward()
    seen["loss"] = loss.item()
    return {n: p.grad for n, p in model.named_parameters()}


def total_norm(grads):
    return math.sqrt(sum(g.double().pow(2).sum().item() for g in grads.values()))


@pytest.mark.slow  # train.py runs
@pytest.mark.parametrize("batch,accum", [(4, 1), (2, 2), (1, 4)])
def test_accumulated_gradient_is_the_full_batch_gradient(monkeypatch, data_dir, tmp_path, device, batch, accum):
    """K micro-batches of B sequences give the gradient of one batch of K*B (a mean, not a sum)."""
    seen = run_one_step(monkeypatch, data_dir, tmp_path, device, "--batch-size", str(batch), "--grad-accum", str(accum))
    assert len(seen["batches"]) == accum and all(b[0].shape == (batch, 64) for b in seen["batches"])
    ref = float64_full_batch_grads(seen)
    assert seen["grads"].keys() == ref.keys()
    for name, g in seen["grads"].items():
        torch.testing.assert_close(g.double(), ref[name], rtol=1e-4, atol=1e-7, msg=name)
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["loss"] for r in logged if r["type"] == "train"] == pytest.approx([seen["loss"]], rel=1e-5)


@pytest.mark.slow  # train.py runs
@pytest.mark.parametrize("clip", [0.05, 1e3])
def test_gradient_reaching_the_optimizer_is_clipped(monkeypatch, data_dir, tmp_path, device, clip):
    """--grad-clip c: the step sees g * min(1, c / |g|), with |g| the global norm of the full batch."""
    seen = run_one_step(monkeypatch, data_dir, tmp_path, device, "--batch-size", "2", "--grad-accum", "2",
                        "--grad-clip", str(clip))
    ref = float64_full_batch_grads(seen)
    norm = total_norm(ref)
    assert 0.05 < norm < 1e3  # so the two clips are one active and one inactive
    factor = min(1.0, clip / norm)
    for name, g in seen["grads"].items():
        torch.testing.assert_close(g.double(), ref[name] * factor, rtol=1e-4, atol=1e-8, msg=name)
    assert total_norm(seen["grads"]) <= min(clip, norm) * (1 + 1e-5)


# -----------------------------------------------------------------------------
# the schedule


def test_lr_schedule_closed_form():
    """Linear warmup to lr over `warmup` steps, cosine to 0.1 * lr at max_steps (REFERENCE §2)."""
    args = train.get_args(["--lr", "2e-3", "--max-steps", "1000", "--warmup", "100"])
    lr, W, M = 2e-3, 100, 1000
    expect = {
        0: lr / W,  # the first step already moves (step 0 of W)
        W - 1: lr,  # end of warmup
        W: lr,  # the cosine starts at its peak
        (W + M) // 2: 0.55 * lr,  # half way down the cosine: 0.1 + 0.9 * 0.5
        M - 1: lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (M - 1 - W) / (M - W)))),  # the last step
        M: 0.1 * lr,  # where the cosine ends: 0.1 x lr, not 0
    }
    for step, value in expect.items():
        assert train.lr_at(step, args) == pytest.approx(value, rel=1e-12), step
    assert all(train.lr_at(s, args) >= 0.1 * lr * (1 - 1e-12) for s in range(W, M + 1))  # after warmup


@pytest.mark.slow  # a training run
def test_logged_lr_follows_the_schedule(data_dir, tmp_path):
    train.main(SMALL + ["--data", data_dir, "--out-dir", str(tmp_path), "--batch-size", "1", "--max-steps", "6",
                        "--warmup", "2", "--lr", "1e-3", "--eval-every", "6"])
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    lrs = {r["step"]: r["lr"] for r in logged if r["type"] == "train"}
    # record of step s is the lr used for it: step s - 1 counted from 0
    ref = {1: 5e-4, 2: 1e-3, 6: 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 3 / 4)))}
    for s, value in ref.items():
        assert lrs[s] == pytest.approx(value, rel=1e-12)


# -----------------------------------------------------------------------------
# batches: targets are the inputs shifted by one token of the stream


def test_batches_are_windows_of_the_stream_shifted_by_one(data_dir):
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    data = TokenData(data_dir, "train", meta)
    stream = torch.from_numpy(np.asarray(data.tokens).astype(np.int64))
    for step in range(3):
        x, y = data.random_batch(step, 0, 4, 32, seed=5, device="cpu")
        assert x.shape == y.shape == (4, 32)
        assert torch.equal(y[:, :-1], x[:, 1:]) and not torch.equal(x, y)
        for row_x, row_y in zip(x, y):  # each row is a window of the stream, the target one token on
            start = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(data.tokens, 32)
                                       .__eq__(row_x.numpy()).all(1))[0])
            assert torch.equal(row_y, stream[start + 1:start + 33])
    # a pure function of (seed, step, micro-step), different for each: resume re-draws, training never repeats
    draw = lambda step, micro, seed: data.random_batch(step, micro, 4, 32, seed=seed, device="cpu")[0]  # noqa: E731
    assert torch.equal(draw(3, 1, 5), draw(3, 1, 5))
    assert not any(torch.equal(draw(3, 1, 5), other) for other in (draw(4, 1, 5), draw(3, 0, 5), draw(3, 1, 6)))
    val = TokenData(data_dir, "val", meta)
    vstream = torch.from_numpy(np.asarray(val.tokens).astype(np.int64))
    starts = val.eval_starts(4 * 32, 32)
    rows = [(x[j], y[j]) for x, y in val.eval_batches(4 * 32, 4, 32, "cpu") for j in range(x.shape[0])]
    assert len(rows) == len(starts) == 4
    for s, (x, y) in zip(starts, rows):
        assert torch.equal(x, vstream[s:s + 32]) and torch.equal(y, vstream[s + 1:s + 33])


def write_split(folder, tokens):
    """A val split of these tokens (and a one-token train split) as data/prepare.py lays it out."""
    os.makedirs(folder, exist_ok=True)
    np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, "val.bin"))
    np.zeros(64, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
    meta = dict(dtype="uint16", vocab_size=257, val_tokens=len(tokens), train_tokens=64)
    json.dump(meta, open(os.path.join(folder, "meta.json"), "w"))
    return meta


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_windows_span_the_whole_split(tmp_path, world):
    """A val split written in document order has a head unlike its tail: here 10,000 tokens of 1 then 10,000
    of 2. The eval windows spread over the whole split, so half the evaluated targets come from each half
    (the first-N reading would see only 1s); first window at the head, last at the tail, evenly spaced; ranks
    split the windows without overlap; a split shorter than --eval-tokens is read whole, once."""
    meta = write_split(tmp_path, [1] * 10_000 + [2] * 10_000)
    val = TokenData(str(tmp_path), "val", meta)
    read = [y for r in range(world) for _, y in val.eval_batches(64 * 32, 8, 32, "cpu", r, world)]
    targets = torch.cat([y.flatten() for y in read])
    assert len(targets) == 63 * 32 if world == 3 else 64 * 32  # a multiple of the ranks: equal work each
    assert (targets == 2).float().mean().item() == pytest.approx(0.5, abs=0.02)
    plan = val.eval_plan(64 * 32, 32, world)
    assert plan["eval_share_spanned"] == 1.0 and plan["val_split_tokens"] == 20_000
    assert plan["eval_windows"] == len(targets) // 32
    gaps = np.diff(val.eval_starts(64 * 32, 32, world))
    assert val.eval_starts(64 * 32, 32, world)[0] == 0 and gaps.max() - gaps.min() <= 1
    assert val.eval_starts(64 * 32, 32, world)[-1] == 20_000 - 33  # the last whole window ends the split
    small = TokenData(str(write_split(tmp_path / "small", list(range(200))) and tmp_path / "small"), "val",
                      dict(meta, val_tokens=200))
    whole = [x for x, _ in small.eval_batches(10_000, 4, 32, "cpu")]
    assert sum(len(x) for x in whole) == 6  # 200 tokens hold 6 whole windows of 33: all of them, none twice
    assert len({int(r[0]) for x in whole for r in x}) == 6


def test_training_batches_are_read_one_ahead_and_equal_bit_for_bit(data_dir, monkeypatch):
    """train.py takes its micro-batches from TokenData.batches: exactly random_batch(step, micro) in
    order, bit for bit, each handed out only once the next one has been read (its copy to a GPU
    started, from pinned memory with non_blocking: no host sync) ."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    data = TokenData(data_dir, "train", meta)
    reads, moves, real_batch, real_to = [], [], TokenData.random_batch, torch.Tensor.to
    monkeypatch.setattr(TokenData, "random_batch", lambda self, step, micro, *a, **k: reads.append((step, micro))
                        or real_batch(self, step, micro, *a, **k))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moves.append(k.get("non_blocking"))
                        or real_to(self, *a, **k))
    batches = data.batches(3, 2, 4, 32, seed=5, device="cpu")
    for step, micro in [(3, 0), (3, 1), (4, 0), (4, 1), (5, 0)]:
        x, y = next(batches)
        following = (step, micro + 1) if micro == 0 else (step + 1, 0)
        assert reads[-1] == following  # read ahead
        monkeypatch.setattr(torch.Tensor, "to", real_to)
        want = real_batch(data, step, micro, 4, 32, 5, "cpu")
        monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moves.append(k.get("non_blocking"))
                            or real_to(self, *a, **k))
        assert torch.equal(x, want[0]) and torch.equal(y, want[1]) and x.dtype == torch.int64
    assert moves and all(moves)  # every move to the device is non_blocking


def test_eval_counts_tokens_on_the_host(data_dir, monkeypatch):
    """A count made into a device tensor per batch (torch.tensor(n, device=...)) is a copy from
    pageable memory: a host sync per eval batch. The count stays a Python int until the end."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    val = TokenData(data_dir, "val", meta)
    args = train.get_args(["--model", "tiny", "--seq-len", "32", "--eval-tokens", str(6 * 32), "--batch-size", "2",
                           "--device", "cpu"])
    model = train.build_model(args, meta["vocab_size"]).to_empty(device="cpu").init_weights(seed=0)
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: pytest.fail("torch.tensor in validation_loss") if "device" in k
                        else real_tensor(*a, **k))
    loss = train.validation_loss(model, val, args, torch.autocast("cpu", enabled=False), 0, 1)
    monkeypatch.undo()
    with torch.no_grad():  # the mean over 6 windows of 32 tokens, batch by batch here
        want = sum(model(x, y)[1].double() * y.numel() for x, y in val.eval_batches(6 * 32, 2, 32, "cpu")) / (6 * 32)
    assert loss == want.item()


@pytest.mark.parametrize("eval_tokens,batch", [(5 * 32, 2), (4 * 32, 4)])
def test_eval_is_the_mean_loss_over_every_val_token(data_dir, eval_tokens, batch):
    """The val loss is the mean over all tokens of the eval_tokens // seq_len windows spread over the split,
    a partial last batch included (a mean of batch means would weight it wrongly). Reference: float64,
    window by window, straight from the stream at evenly spaced starts."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    val = TokenData(data_dir, "val", meta)
    model = tiny_model("sltrain")
    args = train.get_args(["--eval-tokens", str(eval_tokens), "--batch-size", str(batch), "--seq-len", "32",
                           "--device", "cpu"])
    got = train.validation_loss(model, val, args, torch.autocast("cpu", enabled=False), rank=0, world=1)
    stream = torch.from_numpy(np.asarray(val.tokens).astype(np.int64))
    ref_model = copy.deepcopy(model).double()
    nll = []
    with torch.no_grad():
        n, last = eval_tokens // 32, len(stream) - 33
        for s in np.linspace(0, last, n):  # evenly spaced from the head to the last whole window
            s = int(s + 1e-9)
            logits, _ = ref_model(stream[None, s:s + 32])
            nll.append(torch.nn.functional.cross_entropy(logits[0], stream[s + 1:s + 33], reduction="none"))
    assert got == pytest.approx(torch.cat(nll).mean().item(), rel=1e-5)
    assert model.training  # evaluate() puts the model back in train mode


# -----------------------------------------------------------------------------
# the optimizer: one owner per parameter, the documented state kind, every parameter moves


def tiny_model(method):
    cfg = replace(CONFIGS["tiny"], vocab_size=257, max_seq_len=32)
    return swap_linears(LLaMA(cfg), method, cfg.rank, cfg.delta, cfg.alpha).init_weights(0)


def owners(opt):
    if isinstance(opt, PerLayerOptimizer):
        return [p for inner in opt.optimizers.values() for g in inner.param_groups for p in g["params"]]
    return [p for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain"])
@pytest.mark.parametrize("flags", [["--optimizer", "adamw"], ["--optimizer", "adamw8bit"],
                                   ["--optimizer", "adamw8bit", "--per-layer"]], ids=["adamw", "8bit", "8bit-per-layer"])
def test_every_parameter_has_one_optimizer_the_documented_state_and_moves(method, flags):
    args = train.get_args(["--method", method, "--lr", "1e-2", *flags])
    model = tiny_model(method)
    opt = train.build_optimizer(model, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [g for o in (opt.optimizers.values() if args.per_layer else [opt]) for g in o.param_groups]
    for g in groups:  # the paper's AdamW (REFERENCE §2): betas (0.9, 0.999), weight decay 0
        assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-2, (0.9, 0.999), 1e-8, 0.0)
    ids = [id(p) for p in owners(opt)]
    assert sorted(ids) == sorted(id(p) for p in trainable)  # each exactly once, nothing else

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # sltrain's A gets its first gradient once B (0 at init) has moved
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    frozen = [n for n, p in model.named_parameters() if p.numel() and torch.equal(p, before[n])]
    assert not frozen, frozen

    if args.optimizer != "adamw8bit":
        return
    # the documented state: fp32 moments for tok_emb and lm_head and for tensors under 4096 elements,
    # 8-bit codes for every other tensor
    inner = {p: o for o in (opt.optimizers.values() if args.per_layer else [opt]) for p in owners(o)}
    for name, p in model.named_parameters():
        state = inner[p].state[p]
        fp32 = name in ("tok_emb.weight", "lm_head.weight") or p.numel() < 4096
        assert isinstance(inner[p], AdamW8bit)
        assert ("exp_avg" in state) == fp32 and ("m_codes" in state) == (not fp32), name
        if fp32:
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        else:
            assert state["m_codes"].dtype == state["v_codes"].dtype == torch.uint8


# -----------------------------------------------------------------------------
# what only the method under test can learn


def markov_batch(generator, vocab=257, batch=16, seq=33):
    """Each token is followed by one of 2 fixed successors: a bigram a model must put in its blocks when
    the embeddings and lm_head cannot move."""
    successors = torch.randint(vocab, (vocab, 2), generator=torch.Generator().manual_seed(0))
    t = torch.randint(vocab, (batch,), generator=generator)
    rows = [t]
    for _ in range(seq - 1):
        t = successors[t, torch.randint(2, (batch,), generator=generator)]
        rows.append(t)
    return torch.stack(rows, 1)


@pytest.mark.slow  # a training run
@pytest.mark.parametrize("method", ["lowrank", "sltrain"])
def test_the_block_factors_alone_lower_the_loss(method):
    """Embeddings, lm_head and norms frozen: only A, B and the sparse values can lower the loss. A
    backward that drops any of their gradients (or the whole SL path) fails here, while a bigram model
    in the embeddings would not."""
    torch.manual_seed(0)
    model = tiny_model(method)
    for name, p in model.named_parameters():
        p.requires_grad_(isinstance(dict(model.named_modules())[name.rsplit(".", 1)[0]], SLLinear))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 3 * 7 * model.cfg.n_layers  # A, B, values of every block linear
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        xy = markov_batch(g)
        loss = model(xy[:, :-1], xy[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, (first, last)  # measured: 5.57 -> ~3.3 (lowrank) / ~3.6 (sltrain)


@pytest.mark.slow  # two training runs
def test_bf16_weights_learn_like_fp32_weights(data_dir, tmp_path):
    """--param-dtype bfloat16 at lr 1e-3 for 200 steps: the RMSNorm gains (1.0 at init, where half a
    bf16 ulp is 2e-3 down and 4e-3 up) move, and the final val loss is within 2% of fp32 weights'.
    Rounding each update to the nearest bf16 froze the gains at exactly 1.0."""
    flags = SMALL + ["--data", data_dir, "--batch-size", "4", "--grad-accum", "1", "--max-steps", "200",
                     "--lr", "1e-3", "--eval-every", "200", "--eval-tokens", "4096", "--device", "cpu"]
    final = {}
    for dtype in ("float32", "bfloat16"):
        model = train.main(flags + ["--param-dtype", dtype, "--out-dir", str(tmp_path / dtype)])
        final[dtype] = [json.loads(line) for line in open(tmp_path / dtype / "log.jsonl")][-1]["val_loss"]
    gains = torch.cat([m.weight.detach().flatten() for m in model.modules() if m.__class__.__name__ == "RMSNorm"])
    assert gains.dtype == torch.bfloat16 and (gains != 1).float().mean() > 0.5
    assert abs(final["bfloat16"] - final["float32"]) < 0.02 * final["float32"], final


def test_train_step_accumulates_the_mean_gradient_of_the_whole_batch():
    """train.train_step over 2 micro-batches of 2 sequences hands optimizer.step the gradient of the mean loss over
    all 4 (each micro-step's loss divided by their number): against a float64 copy of the model on the 4 at once.
    Fast and direct: the train.py runs that check the same are `slow`."""
    torch.manual_seed(0)
    model = tiny_model("sltrain")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SLLinear):
                m.B.normal_(std=0.02)  # B = 0 would leave A's gradient 0
    x = torch.randint(0, 257, (4, 32))
    y = torch.randint(0, 257, (4, 32))
    args = train.get_args(["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2",
                           "--device", "cpu"])
    seen = {}

    class Recorder:
        param_groups = []

        def step(self):
            seen.update({n: p.grad.double().clone() for n, p in model.named_parameters()})

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=set_to_none)

    stop = type("Stop", (), {"signum": 0})()
    loss, stopping = train.train_step(model, Recorder(), iter([(x[:2], y[:2]), (x[2:], y[2:])]), args,
                                      torch.autocast("cpu", enabled=False), 1, stop)
    reference = copy.deepcopy(model).double()
    ref_loss = reference(x, y)[1]
    ref_loss.backward()
    assert not stopping and loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_ranks_read_disjoint_rows_of_the_one_process_batch(data_dir):
    """With N ranks, rank r's batch is rows [r*B, (r+1)*B) of the batch one process draws with N*B sequences."""
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    data = TokenData(data_dir, "train", meta)
    whole = data.random_batch(5, 1, 6, 32, seed=3, device="cpu")
    parts = [data.random_batch(5, 1, 2, 32, seed=3, device="cpu", rank=r, world=3) for r in range(3)]
    assert torch.equal(torch.cat([x for x, _ in parts]), whole[0]) and torch.equal(torch.cat([y for _, y in parts]), whole[1])
