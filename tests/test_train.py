"""train.py end to end on the tiny size: the loss falls, resume is exact, bad input stops clearly."""
import json
import os

import pytest
import torch

from run import memory
import train
from data.loader import TokenData

pytestmark = pytest.mark.slow  # end-to-end training runs: not in the one-minute check

SMALL = ["--model", "tiny", "--batch-size", "4", "--seq-len", "64", "--eval-tokens", "2048", "--log-every", "1"]


def read_log(out_dir):
    return read_log_file(os.path.join(out_dir, "log.jsonl"))


def read_log_file(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def run(data_dir, out_dir, *extra):
    train.main(SMALL + ["--data", data_dir, "--out-dir", str(out_dir), *extra])
    return read_log(out_dir)


def losses(records):
    return {r["step"]: r["loss"] for r in records if r["type"] == "train"}


@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain"])
def test_a_few_steps_lower_the_loss(data_dir, tmp_path, method):
    records = run(data_dir, tmp_path, "--method", method, "--max-steps", "25", "--lr", "3e-3")
    assert records[0]["type"] == "config" and records[0]["method"] == method  # the log starts with the config
    train_losses = losses(records)
    first, last = train_losses[1], sum(train_losses[s] for s in (23, 24, 25)) / 3
    assert first > 5.0  # ln(257) = 5.55 at init
    assert last < first - 1.0, (first, last)
    evals = [r for r in records if r["type"] == "eval"]
    assert evals and evals[-1]["step"] == 25 and evals[-1]["val_loss"] < first - 1.0


@pytest.mark.parametrize("extra", [[], ["--param-dtype", "bfloat16"]], ids=["fp32", "bf16-stochastic-rounding"])
def test_resume_equals_uninterrupted_run(data_dir, tmp_path, monkeypatch, extra):
    # bitwise needs deterministic kernels: the CPU's (a GPU's atomics reorder float sums); bf16 weights
    # round with torch's RNG, which the checkpoint must carry
    flags = ["--max-steps", "8", "--eval-every", "4", "--device", "cpu", *extra]
    full = losses(run(data_dir, tmp_path / "a", *flags))

    # simulate a crash while step 7 is being trained: steps 5 and 6 are logged, the checkpoint is step 4's
    real_batch = TokenData.random_batch

    def crash_at_step_7(self, step, *args, **kwargs):
        if step == 6:  # 0-based: the batch of step 7
            raise KeyboardInterrupt
        return real_batch(self, step, *args, **kwargs)

    monkeypatch.setattr(TokenData, "random_batch", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        run(data_dir, tmp_path / "b", *flags)
    monkeypatch.setattr(TokenData, "random_batch", real_batch)
    records = run(data_dir, tmp_path / "b", *flags, "--resume")
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == list(range(1, 9))  # steps 5 and 6 were trained twice but are logged once
    assert losses(records) == full  # bitwise: same batches, same weights, same optimizer state


def test_dry_run_prints_json_last(capsys):
    train.main(["--model", "7b", "--method", "sltrain", "--vocab-size", "32000", "--dry-run"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    est = json.loads(last)
    assert abs(est["params_total"] / 1e6 - 3145) < 5 and est["params_trainable"] == est["params_total"]


# the paper's estimated memory in GB (REFERENCE §3: bf16 weights, bf16 Adam moments, int64 indices)
PAPER_MEMORY_GB = {"full": (0.35, 0.80, 2.21, 8.03), "sltrain": (0.27, 0.60, 1.24, 4.16),
                   "lowrank": (0.26, 0.56, 1.11, 3.66)}


@pytest.mark.parametrize("method", list(PAPER_MEMORY_GB))
def test_memory_estimate_is_the_papers_table(method):
    for size, paper in zip(("60m", "130m", "350m", "1b"), PAPER_MEMORY_GB[method]):
        args = train.get_args(["--model", size, "--method", method])
        assert round(memory.paper_estimate(train.build_model(args, 32000))["est_memory_gb"], 2) == paper, size


@pytest.mark.parametrize("method", ["full", "lowrank", "sltrain"])
def test_default_lr_is_the_studys_best_for_tiny_and_the_papers_for_its_sizes(method):
    # tiny: the lowest final val loss of the committed lr sweep (benchmarks/study.py); paper sizes: SLTrain's 3e-3
    study = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results", "study")
    finals = {}
    for name in os.listdir(study):
        if name.startswith(f"{method}-lr") and name.endswith("-seed0-steps400.jsonl"):
            records = read_log_file(os.path.join(study, name))
            evals = [r for r in records if r["type"] == "eval" and r["step"] == 400]
            finals[evals[-1]["val_loss"]] = next(r for r in records if r["type"] == "config")["lr"]
    assert len(finals) >= 5 and train.get_args(["--method", method]).lr == finals[min(finals)]
    for size in ("60m", "130m", "350m", "1b", "7b"):
        assert train.get_args(["--model", size, "--method", method]).lr == 3e-3
    assert train.get_args(["--method", method, "--lr", "2e-4"]).lr == 2e-4


def test_unknown_model_lists_valid_names(capsys):
    with pytest.raises(SystemExit):
        train.main(["--model", "13b", "--dry-run"])
    err = capsys.readouterr().err
    assert "13b" in err and all(name in err for name in ("tiny", "60m", "130m", "350m", "1b", "7b"))


def test_impossible_rank_is_refused(capsys):
    with pytest.raises(SystemExit):  # one line naming the flag and the valid range, no ValueError traceback
        train.main(["--model", "tiny", "--rank", "4096", "--dry-run"])
    assert capsys.readouterr().err.startswith("error: --rank 4096: must be in [1, 128] for --model tiny")


def test_missing_and_corrupt_data(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="no prepared data"):
        train.main(SMALL + ["--data", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o")])
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "val.bin"):
        (broken / name).write_bytes(open(os.path.join(data_dir, name), "rb").read())
    (broken / "train.bin").write_bytes(open(os.path.join(data_dir, "train.bin"), "rb").read()[:1000])
    with pytest.raises(SystemExit, match="corrupt"):
        train.main(SMALL + ["--data", str(broken), "--out-dir", str(tmp_path / "o")])


def test_corrupt_and_mismatched_checkpoints(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max-steps", "2")
    with pytest.raises(SystemExit, match="another run.*--method sltrain"):
        run(data_dir, tmp_path, "--max-steps", "4", "--method", "lowrank", "--resume")
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])  # a torn file, as a crash mid-write would leave
    with pytest.raises(SystemExit, match="unreadable"):
        run(data_dir, tmp_path, "--max-steps", "4", "--resume")
    with pytest.raises(SystemExit, match="no checkpoint"):
        run(data_dir, tmp_path / "fresh", "--max-steps", "4", "--resume")


def test_a_fresh_start_never_overwrites_a_run(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max-steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run.*--resume"):
        run(data_dir, tmp_path, "--max-steps", "2")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="another run.*--optimizer adamw"):  # the state's layout differs
        run(data_dir, tmp_path, "--max-steps", "4", "--optimizer", "adamw8bit", "--resume")


def test_empty_val_split_is_reported(data_dir, tmp_path):
    broken = tmp_path / "noval"
    broken.mkdir()
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    json.dump({**meta, "val_tokens": 0}, open(broken / "meta.json", "w"))
    (broken / "train.bin").write_bytes(open(os.path.join(data_dir, "train.bin"), "rb").read())
    (broken / "val.bin").write_bytes(b"")
    with pytest.raises(SystemExit, match="val split .* is empty"):
        train.main(SMALL + ["--data", str(broken), "--out-dir", str(tmp_path / "o")])


def test_checkpoint_write_is_atomic(data_dir, tmp_path, monkeypatch):
    run(data_dir, tmp_path, "--max-steps", "2")
    ckpt = tmp_path / "ckpt.pt"
    before = ckpt.read_bytes()

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError):
        run(data_dir, tmp_path, "--max-steps", "4", "--resume")
    assert ckpt.read_bytes() == before  # the old checkpoint survived the failed write


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max-steps", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="loss is (nan|inf).*--resume"):
        run(data_dir, tmp_path / "x", "--max-steps", "6", "--lr", "1e30")
    with pytest.raises(SystemExit, match="loss is (nan|inf).*untouched"):
        run(data_dir, tmp_path, "--max-steps", "6", "--lr", "1e30", "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before  # broken weights never overwrite it


def test_first_run_prepares_the_offline_default(tmp_path, monkeypatch):
    default = str(tmp_path / "stdlib")
    monkeypatch.setattr(train, "DEFAULT_DATA", default)
    run(default, tmp_path / "o", "--max-steps", "1")
    meta = json.load(open(os.path.join(default, "meta.json")))
    assert meta["source"] == "stdlib" and meta["vocab_size"] == 257


def test_per_layer_through_train_py_equals_global_step(data_dir, tmp_path):
    """Per-layer AdamW (hooks, with 2 accumulated micro-steps) gives bitwise the global AdamW run."""
    flags = ["--max-steps", "4", "--grad-accum", "2", "--eval-every", "4", "--device", "cpu"]  # bitwise: see above
    assert losses(run(data_dir, tmp_path / "global", *flags)) == \
        losses(run(data_dir, tmp_path / "per-layer", *flags, "--per-layer"))


def test_adamw8bit_trains(data_dir, tmp_path):
    records = run(data_dir, tmp_path, "--max-steps", "25", "--optimizer", "adamw8bit", "--per-layer")
    assert records[0]["optimizer"] == "adamw8bit" and records[0]["per_layer"] is True  # logged in the config
    train_losses = losses(records)
    assert sum(train_losses[s] for s in (23, 24, 25)) / 3 < train_losses[1] - 1.0


def test_clipping_with_per_layer_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--per-layer", "--grad-clip", "1.0"])
    assert "--grad-clip" in capsys.readouterr().err


def test_activation_checkpointing_gives_the_same_losses_with_less_saved(data_dir, tmp_path):
    flags = ["--max-steps", "3", "--eval-every", "3", "--device", "cpu"]  # bitwise: see test_resume_equals_...
    models = {}
    for name, extra in (("plain", []), ("ac", ["--activation-checkpointing"])):
        models[name] = train.main(SMALL + ["--data", data_dir, "--out-dir", str(tmp_path / name), *flags, *extra])
    assert losses(read_log(tmp_path / "plain")) == losses(read_log(tmp_path / "ac"))  # recomputation is exact

    def saved_bytes(model):
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            ids = torch.zeros(2, 64, dtype=torch.long, device=model.lm_head.weight.device)
            model(ids, ids)
        return sum(total)
    assert saved_bytes(models["ac"]) < 0.5 * saved_bytes(models["plain"])  # only block inputs are kept


def test_a_checkpoints_build_names_the_runs_own_rank_delta_and_alpha():
    """The build kept in checkpoints (and the log's config) says the rank, delta and alpha the layers have,
    not the size's defaults (tiny: 32, 0.03, 8), in model_config as in sl."""
    args = train.get_args(["--model", "tiny", "--method", "sltrain", "--rank", "16", "--delta", "0.1", "--alpha", "4"])
    build = train.build_model(args, 257).build
    assert {k: build["model_config"][k] for k in ("rank", "delta", "alpha")} == dict(rank=16, delta=0.1, alpha=4.0)
    assert {k: build["sl"][k] for k in ("rank", "delta", "alpha")} == dict(rank=16, delta=0.1, alpha=4.0)


# -----------------------------------------------------------------------------
# S's own lr (--sparse-lr-ratio), the norms of S and scale * B A, what an eval read


@pytest.mark.parametrize("extra", [(), ("--optimizer", "adamw8bit"), ("--optimizer", "adamw8bit", "--per-layer")],
                         ids=["adamw", "adamw8bit", "adamw8bit-per-layer"])
def test_sparse_lr_ratio_steps_S_values_at_their_own_lr(data_dir, tmp_path, extra):
    """Adam's first step moves each weight by lr * g / (|g| + eps), about lr in size (reference: Adam's
    update rule). With --sparse-lr-ratio 0.25 S's values move 0.25 x lr, the factors A and B the whole lr,
    under torch AdamW, AdamW8bit and per-layer updates alike; the log and the checkpoint record it."""
    lr, ratio = 1e-3, 0.25
    model = train.main(SMALL + ["--data", data_dir, "--out-dir", str(tmp_path), "--max-steps", "1", "--warmup", "0",
                                "--lr", str(lr), "--sparse-lr-ratio", str(ratio), *extra])
    args = train.get_args(SMALL + ["--max-steps", "1"])
    start = train.build_model(args, 257).to_empty(device="cpu").init_weights(seed=0)
    moved = {n: (p.detach() - dict(start.named_parameters())[n].detach()).abs() for n, p in model.named_parameters()}
    for name, step in moved.items():
        if name.endswith(".A"):  # B = 0 at step 0, so dA = scale * B^T G = 0: A first moves at step 2
            continue
        want = lr * ratio if name.endswith(".values") else lr
        big = step[step > 0.5 * step.max()]  # entries whose gradient was far above eps: |step| ~ lr
        assert big.median().item() == pytest.approx(want, rel=0.05), name
    assert read_log(tmp_path)[0]["sparse_lr_ratio"] == ratio
    assert torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=False)["config"]["sparse_lr_ratio"] == ratio


def test_sparse_lr_ratio_is_refused_without_S_and_must_match_on_resume(data_dir, tmp_path, capsys):
    for method in ("full", "lowrank"):
        with pytest.raises(SystemExit):
            train.get_args(["--method", method, "--sparse-lr-ratio", "0.1"])
        assert f"--sparse-lr-ratio with --method {method}:" in capsys.readouterr().err
        assert train.get_args(["--method", method, "--sparse-lr-ratio", "1"]).sparse_lr_ratio == 1  # rerun.py pins it
    with pytest.raises(SystemExit):
        train.get_args(["--delta", "0", "--sparse-lr-ratio", "0.1"])
    assert "--method sltrain --delta 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.get_args(["--sparse-lr-ratio", "0"])
    assert "--sparse-lr-ratio 0.0: must be > 0" in capsys.readouterr().err
    run(data_dir, tmp_path, "--max-steps", "2", "--stop-at-step", "1", "--sparse-lr-ratio", "0.5")
    with pytest.raises(SystemExit) as e:
        run(data_dir, tmp_path, "--max-steps", "2", "--resume")
    assert "--sparse-lr-ratio 0.5 (now 1.0)" in str(e.value)


def test_evals_log_the_norms_of_S_and_the_low_rank_part(data_dir, tmp_path):
    """Each eval record holds, per layer type, the mean over blocks of ||S||_F and ||scale * B A||_F, which
    equal a float64 recomputation from the dense parts; the config record says what an eval reads."""
    run(data_dir, tmp_path, "--max-steps", "2", "--eval-every", "2", "--lr", "1e-2")
    records = read_log(tmp_path)
    model = train.main(SMALL + ["--data", data_dir, "--out-dir", str(tmp_path / "again"), "--max-steps", "2",
                                "--eval-every", "2", "--lr", "1e-2"])
    norms = [r for r in records if r["type"] == "eval"][-1]["norms_S_BA"]
    assert sorted(norms) == sorted(["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down"])
    for kind, (s, low_rank) in norms.items():
        layers = [m for n, m in model.named_modules() if n.endswith(kind)]
        S = [torch.zeros(m.out_features * m.in_features, dtype=torch.float64).index_add_(
            0, m.indices.long(), m.values.double()) for m in layers]
        BA = [m.scale * m.B.double() @ m.A.double() for m in layers]
        assert s == pytest.approx(sum(x.norm().item() for x in S) / len(S), rel=1e-9)
        assert low_rank == pytest.approx(sum(x.norm().item() for x in BA) / len(BA), rel=1e-6)
        assert low_rank > 0  # B left 0 after two steps
    config = records[0]
    assert config["eval_windows"] == 2048 // 64 and config["eval_target_tokens"] == 2048
    assert config["eval_share_spanned"] > 0.99 and 0 < config["eval_share_read"] < 1


def test_train_records_hold_the_mean_loss_since_the_last(data_dir, tmp_path):
    """loss_mean: the mean of the per-step losses since the previous record (a --log-every 1 run's, the
    same steps on the same batches)."""
    every = losses(run(data_dir, tmp_path / "one", "--max-steps", "6", "--log-every", "1"))
    records = [r for r in run(data_dir, tmp_path / "three", "--max-steps", "6", "--log-every", "3") if r["type"] == "train"]
    assert [(r["step"], r["steps_in_mean"]) for r in records] == [(3, 3), (6, 3)]
    for r in records:
        assert r["loss_mean"] == pytest.approx(sum(every[s] for s in range(r["step"] - 2, r["step"] + 1)) / 3, rel=1e-12)
