"""benchmarks/study.py and benchmarks/why_sparse.py: which lr they pick, when the grid widens, which runs they
queue, and the tables' arithmetic, on logs written here by hand (no training): the references are the numbers
put into those logs, worked by hand."""
import argparse
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import horizon  # noqa: E402
import study  # noqa: E402
import why_sparse  # noqa: E402

pytestmark = pytest.mark.slow  # the benchmark scripts end to end: not in the one-minute check

SWEEP = {  # final val loss per lr: full's best is inside the grid, lowrank's and sltrain's at its top edge
    "full": {1e-4: 3.0, 3e-4: 2.0, 1e-3: 1.5, 3e-3: 1.7, 1e-2: 2.5},
    "lowrank": {1e-4: 3.5, 3e-4: 2.7, 1e-3: 2.1, 3e-3: 1.9, 1e-2: 1.8, 3e-2: 1.6, 1e-1: float("nan")},
    "sltrain": {1e-4: 3.4, 3e-4: 2.6, 1e-3: 2.0, 3e-3: 1.6, 1e-2: 1.4, 3e-2: 1.9},
}
SEEDS = {"full": (1e-3, [1.0, 1.1, 1.2]), "lowrank": (3e-2, [2.0, 2.1, 2.2]), "sltrain": (1e-2, [1.5, 1.5, 1.5])}


def write(folder, method, lr, seed, steps, val, **setting):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, study.name_of(study.Task(method, lr, seed, steps, **setting)) + ".jsonl"), "w") as f:
        f.write(json.dumps({"type": "config", "lr": lr}) + "\n")
        f.write(json.dumps({"type": "eval", "step": steps, "val_loss": val}) + "\n")


def write_study(folder, skip=None, diverged=None):
    """The sweep (40 steps) and seed (60 steps) logs of SWEEP and SEEDS; a (method, seed) to leave out or to
    give an inf final loss. Returns the study's args for them."""
    for m, finals in SWEEP.items():
        for lr, val in finals.items():
            write(folder, m, lr, 0, 40, val)
    for m, (lr, vals) in SEEDS.items():
        for seed, val in zip(study.SEEDS, vals):
            if (m, seed) != skip:
                write(folder, m, lr, seed, 60, float("inf") if (m, seed) == diverged else val)
    return argparse.Namespace(sweep_steps=40, seed_steps=60, results=str(folder), jobs=1, longer=0)


def test_best_lr_widened_grid_and_gap_closed(tmp_path):
    args = write_study(tmp_path)
    write(tmp_path, "full", 3e-3, 0, 60, 0.1)  # a seed run at a lr that is not full's best: never read

    sweep, seeds, longer = study.collect(args, do_runs=False)
    # lowrank: best at 1e-2 -> widened to 3e-2 (best again) -> 1e-1 (NaN, as a diverged eval: the worst);
    # sltrain stops at 3e-2
    assert sorted(sweep["lowrank"]) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert sorted(sweep["sltrain"]) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2] and sorted(sweep["full"]) == [
        1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert {m: lr for m, (lr, _) in seeds.items()} == {"full": 1e-3, "lowrank": 3e-2, "sltrain": 1e-2}

    finals = study.report(args, sweep, seeds, longer)
    assert finals == {m: dict(zip(study.SEEDS, vals)) for m, (_, vals) in SEEDS.items()}
    table = (tmp_path / "table.md").read_text()
    # by hand: (lowrank - sltrain) / (lowrank - full) = 0.5/1.0, 0.6/1.0, 0.7/1.0; mean 0.6, sd 0.1
    assert "seeds 0, 1, 2: 0.50, 0.60, 0.70; mean 0.60 +- 0.10" in table
    assert "| full | 0.001 | 1.0000 | 1.1000 | 1.2000 | 1.1000 +- 0.1000 |" in table
    assert "| lowrank | 3.5000 | 2.7000 | 2.1000 | 1.9000 | 1.8000 | 1.6000 | inf |" in table


def test_an_unfinished_sweep_has_no_best_lr(tmp_path):
    args = argparse.Namespace(sweep_steps=40, seed_steps=60, results=str(tmp_path), jobs=1, longer=0)
    for lr, val in SWEEP["sltrain"].items():
        if lr != 3e-2:  # best at the edge 1e-2, the next rung not run yet
            write(tmp_path, "sltrain", lr, 0, 40, val)
    write(tmp_path, "sltrain", 1e-2, 0, 60, 1.0)
    sweep, seeds, longer = study.collect(args, do_runs=False)
    assert "sltrain" not in seeds and len(sweep["sltrain"]) == 5


def test_paired_differences_and_the_longer_runs(tmp_path):
    args = write_study(tmp_path)
    write(tmp_path, "full", 1e-3, 0, 80, 0.90)
    write(tmp_path, "sltrain", 1e-2, 0, 80, 0.95)
    write(tmp_path, "lowrank", 1e-2, 0, 80, 0.1)  # not lowrank's best lr (3e-2): never read
    sweep, seeds, longer = study.collect(args, do_runs=False)  # --plot finds the 80-step runs by their names
    assert sorted(longer) == ["full", "sltrain"] and args.longer == 80
    study.report(args, sweep, seeds, longer)
    table = (tmp_path / "table.md").read_text()
    assert "sltrain - full, seeds 0, 1, 2: +0.5000, +0.4000, +0.3000" in table  # 1.5-1.0, 1.5-1.1, 1.5-1.2
    assert "| 80 | 0.9000 | - | 0.9500 | +0.0500 | - |" in table  # no lowrank run at 80 steps: no gap closed
    write(tmp_path, "lowrank", 3e-2, 0, 80, 1.15)
    sweep, seeds, longer = study.collect(args, do_runs=False)
    study.report(args, sweep, seeds, longer)
    # by hand: (1.15 - 0.95) / (1.15 - 0.90) = 0.20 / 0.25 = 0.80
    assert "| 80 | 0.9000 | 1.1500 | 0.9500 | +0.0500 | 0.80 |" in (tmp_path / "table.md").read_text()


def test_missing_and_diverged_seeds_pair_by_seed(tmp_path):
    args = write_study(tmp_path, skip=("sltrain", 1), diverged=("lowrank", 2))  # sltrain's seed 1 not run yet
    sweep, seeds, longer = study.collect(args, do_runs=False)
    study.report(args, sweep, seeds, longer)
    table = (tmp_path / "table.md").read_text()
    assert "| sltrain | 0.01 | 1.5000 | - | 1.5000 | 1.5000 +- 0.0000 |" in table
    assert "| lowrank | 0.03 | 2.0000 | 2.1000 | inf | - |" in table  # a diverged seed: no mean
    assert "sltrain - full, seeds 0, 2: +0.5000, +0.3000" in table  # seed 2 with seed 2, not with seed 1
    assert "gap closed" not in table  # seed 1 lacks sltrain, seed 2's lowrank diverged: no gap with a spread


def test_names_match_the_plain_train_commands():
    T = study.Task
    assert study.name_of(T("full", 1e-3, 0, 2400)) == "full-lr0.001-seed0-steps2400"
    assert study.name_of(T("sltrain", 1e-2, 0, 2400, rank=32, delta=0.01)) == "sltrain-r32-d0.01-lr0.01-seed0-steps2400"
    assert study.name_of(T("full", 3e-4, 2, 400, "tiny-narrow")) == "tiny-narrow-full-lr0.0003-seed2-steps400"


def test_a_kept_log_names_paths_relative_to_the_repository(tmp_path):
    """A run finished in its out-dir (the same command, run by hand) is copied into --results, not rerun,
    with the config's data, out_dir and argv paths inside the repository made relative; others kept."""
    root = study.ROOT
    out = os.path.join(root, "runs", "q22", "sltrain-r16-d0.03-lr0.01-seed0-steps6")
    config = {"type": "config", "data": os.path.join(root, "data", "stdlib"), "out_dir": out,
              "argv": [os.path.join(root, "train.py"), "--rank", "16", "--out-dir", out, "--data", "/elsewhere/x"],
              "data_meta": {"stdlib_path": "/usr/lib/python3.11"}}
    runs = tmp_path / "runs" / "sltrain-r16-d0.03-lr0.01-seed0-steps6"
    runs.mkdir(parents=True)
    with open(runs / "log.jsonl", "w") as f:
        f.write(json.dumps(config) + "\n" + json.dumps({"type": "eval", "step": 6, "val_loss": 2.5}) + "\n")
    args = argparse.Namespace(runs=str(tmp_path / "runs"), results=str(tmp_path / "results"))
    records = study.run(args, study.Task("sltrain", 1e-2, 0, 6, rank=16, delta=0.03))  # no train.py: 6 steps here
    kept = study.read_log(tmp_path / "results" / "sltrain-r16-d0.03-lr0.01-seed0-steps6.jsonl")
    assert records == kept and kept[1] == {"type": "eval", "step": 6, "val_loss": 2.5}
    assert kept[0]["data"] == "data/stdlib" and kept[0]["out_dir"] == "runs/q22/sltrain-r16-d0.03-lr0.01-seed0-steps6"
    assert kept[0]["argv"] == ["train.py", "--rank", "16", "--out-dir", "runs/q22/sltrain-r16-d0.03-lr0.01-seed0-steps6",
                               "--data", "/elsewhere/x"]
    assert kept[0]["data_meta"] == config["data_meta"]


# -----------------------------------------------------------------------------
# benchmarks/why_sparse.py: the ablation, the lr check and the dense verdict, on hand-written logs

ABLATION = {("sltrain", 32, 0.01): 1.7, ("sltrain", 32, 0.1): 1.3, ("sltrain", 16, 0.03): 1.8, ("sltrain", 64, 0.03): 1.2}
LR_CHECK = {  # seed 0, 40 steps, at 3e-3, 1e-2, 3e-2; the study's sweep gives lowrank and sltrain r32 d0.03
    ("sltrain", 32, 0.01): (1.9, 1.7, 2.1), ("sltrain", 32, 0.1): (1.5, 1.3, 1.7),
    ("sltrain", 16, 0.03): (2.0, 1.8, 2.2), ("sltrain", 64, 0.03): (1.4, 1.2, 1.5)}
DENSE_SWEEP = {1e-4: 3.0, 3e-4: 2.0, 1e-3: 1.4, 3e-3: 1.6, 1e-2: 2.2}


def write_why_sparse(folder, skip_dense_seed=None):
    """The study's logs (write_study, plus sltrain seed 0 at 80 steps), the ablation's and the dense model's;
    returns why_sparse's args for them (sweep 40, seeds 60, longer 80)."""
    write_study(os.path.join(folder, "study"))
    write(os.path.join(folder, "study"), "sltrain", 1e-2, 0, 80, 0.95)
    for (m, r, d), val in ABLATION.items():
        write(os.path.join(folder, "ablation"), m, 1e-2, 0, 60, val, rank=r, delta=d)
        for lr, v in zip((3e-3, 1e-2, 3e-2), LR_CHECK[(m, r, d)]):
            write(os.path.join(folder, "ablation"), m, lr, 0, 40, v, rank=r, delta=d)
    for lr, val in DENSE_SWEEP.items():
        write(os.path.join(folder, "dense"), "full", lr, 0, 40, val, model="tiny-narrow")
    for seed, val in zip(study.SEEDS, (1.4, 1.6, 1.5)):
        if seed != skip_dense_seed:
            write(os.path.join(folder, "dense"), "full", 1e-3, seed, 60, val, model="tiny-narrow")
    write(os.path.join(folder, "dense"), "full", 1e-3, 0, 80, 1.0, model="tiny-narrow")
    write(os.path.join(folder, "dense"), "sltrain", 3e-3, 0, 80, 0.9)  # the long-run check one lr rung lower
    return why_sparse.get_args(["--plot", "--sweep-steps", "40", "--seed-steps", "60", "--longer", "80",
                                "--results", str(folder)])


def test_why_sparse_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(why_sparse, "footprint", lambda *a: (1000, 1.0))  # its own test below
    args = write_why_sparse(tmp_path, skip_dense_seed=2)
    res = why_sparse.collect(args, do_runs=False)
    assert res["dense_lr"] == 1e-3 and res["dense"] == {0: 1.4, 1: 1.6}
    ablation, dense = why_sparse.report(args, res, {p[0]: why_sparse.footprint() for p in why_sparse.points(res)})
    assert ablation == (tmp_path / "ablation" / "table.md").read_text()
    assert "| sltrain r32 d0.1 | 1,000 | 1.00 | 1.3000 | 1.3000 (1) |" in ablation
    assert "| sltrain r32 d0.03 | 1,000 | 1.00 | 1.5000 | 1.5000 +- 0.0000 (3) |" in ablation  # the study's seeds
    assert "| full (tiny-narrow) | 1,000 | 1.00 | 1.4000 | 1.5000 +- 0.1414 (2) |" in ablation  # sd of 1.4, 1.6
    assert "| lowrank r32 | 1,000 | 1.00 | - | - |" in ablation  # the hand-made study ran lowrank's seeds at 3e-2
    # lr check, by hand from SWEEP and LR_CHECK: at 3e-3 sltrain r32 d0.03 (1.6) is third, at 1e-2 (1.4) fourth
    assert "| sltrain r32 d0.03 | 1.6000 | 1.4000 | 1.9000 |" in ablation
    assert ("order at lr 0.01 (best first): sltrain r64 d0.03, sltrain r32 d0.1, sltrain r32 d0.03, "
            "sltrain r32 d0.01, lowrank r32, sltrain r16 d0.03") in ablation
    # by hand: at 3e-3 lowrank (1.9, before d0.01 on the tie) and d0.01 swap: 1 of 15 pairs, tau 13/15; at 3e-2
    # lowrank (1.6) moves before d0.1, r32 d0.03 and d0.01: 3 pairs, tau 9/15
    assert ("the same order at every lr: no (Kendall's tau against lr 0.01, 1 = the same order, -1 = reversed: "
            "lr 0.003 0.87, lr 0.03 0.60)") in ablation
    # the verdict: sltrain 1.5 at every seed against 1.4, 1.6, -: +0.1, -0.1; mean 0, sd 0.1414; 80 steps 0.95 - 1.0
    assert "| 0.2M | 0 | 1.5000 | 1.4000 | +0.1000 |" in dense and "| 0.2M | 2 | 1.5000 | - | - |" in dense
    assert "| 0.2M | mean | | | +0.0000 +- 0.1414 (2 paired) |" in dense
    assert "| 0.3M | 0 | 0.9500 | 1.0000 | -0.0500 |" in dense
    assert "| 3.0000 | 2.0000 | 1.4000 | 1.6000 | 2.2000 |" in dense
    assert "one lr rung lower (0.003), seed 0: sltrain 0.9000, tiny-narrow 1.0000, sltrain - tiny-narrow -0.1000" in dense
    why_sparse.plot(args, res, {p[0]: (1000 * (i + 1), 1.0) for i, p in enumerate(why_sparse.points(res))})
    assert (tmp_path / "ablation" / "val_loss_vs_params.png").stat().st_size > 10_000


def test_why_sparse_same_order_at_every_lr(tmp_path, monkeypatch):
    monkeypatch.setattr(why_sparse, "footprint", lambda *a: (1000, 1.0))
    args = write_why_sparse(tmp_path)
    for (m, r, d), vals in LR_CHECK.items():  # shift each setting's 3e-3 and 3e-2 runs to keep the 1e-2 order
        for lr, v in zip((3e-3, 3e-2), (vals[1] + 0.6, vals[1] + 3.0)):
            write(os.path.join(tmp_path, "ablation"), m, lr, 0, 40, v, rank=r, delta=d)
    for m, v in (("lowrank", 1.8), ("sltrain", 1.4)):  # the study's 1e-2 runs are 1.8 and 1.4
        write(os.path.join(tmp_path, "study"), m, 3e-3, 0, 40, v + 0.6)
        write(os.path.join(tmp_path, "study"), m, 3e-2, 0, 40, v + 3.0)
    ablation, _ = why_sparse.report(args, why_sparse.collect(args, do_runs=False), {
        p[0]: (1, 1.0) for p in why_sparse.points(why_sparse.collect(args, do_runs=False))})
    assert "the same order at every lr: yes" in ablation


def test_why_sparse_queues_the_plain_train_runs(tmp_path, monkeypatch):
    """Run mode asks study.run for exactly the ablation, the lr check and the dense runs (names as train.py's
    out-dirs), never for the study's own runs."""
    asked = []

    def fake_run(args, task, threads=None):
        asked.append((os.path.basename(args.results), study.name_of(task)))
        return [{"type": "eval", "step": task.steps, "val_loss": abs(math.log10(task.lr) + 2.5)}]  # best 3e-3
    monkeypatch.setattr(study, "run", fake_run)
    args = why_sparse.get_args(["--results", str(tmp_path), "--runs", str(tmp_path / "runs"), "--jobs", "1"])
    why_sparse.collect(args, do_runs=True)
    assert {folder for folder, _ in asked} == {"ablation", "dense"}
    names = {name for _, name in asked}
    for r, d in ((32, 0.01), (32, 0.1), (16, 0.03), (64, 0.03)):
        assert f"sltrain-r{r}-d{d:g}-lr0.01-seed0-steps2400" in names
        assert {f"sltrain-r{r}-d{d:g}-lr{lr}-seed0-steps400" for lr in ("0.003", "0.01", "0.03")} <= names
    assert {f"tiny-narrow-full-lr{lr}-seed0-steps400" for lr in ("0.0001", "0.0003", "0.001", "0.003", "0.01")} <= names
    assert {f"tiny-narrow-full-lr0.003-seed{s}-steps2400" for s in (0, 1, 2)} <= names
    assert "tiny-narrow-full-lr0.003-seed0-steps4800" in names and "sltrain-lr0.003-seed0-steps4800" in names
    assert len(names) == 4 + 12 + 5 + 3 + 1 + 1


def test_footprint_is_the_papers_count():
    # by hand, tiny (dim 128, ffn 344, 4 blocks, vocab 257) at r 16, delta 0.03: embeddings 2 * 257 * 128, norms
    # 9 * 128, per block 4 attention layers 16 * (128 + 128) + floor(0.03 * 128 * 128) and 3 MLP layers
    # 16 * (128 + 344) + floor(0.03 * 128 * 344); memory 2 B + 4 B per (trainable) parameter, 8 B per nonzero
    nnz = 4 * (4 * math.floor(0.03 * 128 * 128) + 3 * math.floor(0.03 * 128 * 344))
    params = 2 * 257 * 128 + 9 * 128 + 4 * (4 * 16 * 256 + 3 * 16 * 472) + nnz
    assert why_sparse.footprint("tiny", "sltrain", 16, 0.03) == (params, pytest.approx((6 * params + 8 * nnz) / 1e6))
    # tiny-narrow (dim 88, ffn 232) full-rank is within 5% of tiny sltrain (r 32, delta 0.03)
    dense = 2 * 257 * 88 + 9 * 88 + 4 * (4 * 88 * 88 + 3 * 88 * 232)
    sltrain = 2 * 257 * 128 + 9 * 128 + 4 * (4 * 32 * 256 + 3 * 32 * 472) + nnz
    assert why_sparse.footprint("tiny-narrow", "full")[0] == dense and why_sparse.footprint("tiny", "sltrain")[0] == sltrain
    assert abs(dense / sltrain - 1) < 0.05


# -----------------------------------------------------------------------------
# benchmarks/horizon.py: confidence intervals, the train-batch loss, the lr bracket


def test_ci95_is_the_t_interval_of_the_mean():
    """mean +- t(0.975, n - 1) sd / sqrt(n) (REFERENCE: t = 4.30 for n = 3): the committed sltrain - tiny-narrow
    differences at 9.8M tokens, -0.0166, -0.0695, -0.0628 (mean -0.0496, sd 0.0288), give about [-0.12, +0.02]."""
    mean, sd, low, high = study.ci95([-0.0166, -0.0695, -0.0628])
    assert mean == pytest.approx(-0.0496, abs=1e-4) and sd == pytest.approx(0.0288, abs=1e-4)
    assert low == pytest.approx(-0.0496 - 4.303 * 0.0288 / math.sqrt(3), abs=2e-4) and low == pytest.approx(-0.12, abs=0.005)
    assert high == pytest.approx(0.02, abs=0.005)
    assert study.verdict(low, high) == "within noise"
    assert study.verdict(*study.ci95([-0.10, -0.11, -0.12])[2:]) == "lower"  # |mean| > 2.48 sd: excludes 0
    assert study.verdict(*study.ci95([0.5])[2:]) == "one seed: no CI"


def test_train_batch_loss_is_the_mean_over_the_last_tenth_of_the_steps():
    """Records of 20 steps logged every 5 (loss_mean: the interval's mean): the last 10% are steps 19-20, which
    no record holds alone (None); logged every step, it is their mean."""
    every = [dict(type="train", step=s, loss=s / 10, loss_mean=s / 10, steps_in_mean=1) for s in range(1, 21)]
    assert horizon.train_batch_loss(every, 20) == pytest.approx((1.9 + 2.0) / 2)
    fives = [dict(type="train", step=s, loss=0.0, loss_mean=float(s), steps_in_mean=5) for s in (5, 10, 15, 20)]
    assert horizon.train_batch_loss(fives, 20) is None  # step 20's record covers steps 16-20, not 19-20
    assert horizon.train_batch_loss(fives, 40) is None  # missing records
    assert horizon.train_batch_loss(fives, 50) is None


def test_horizon_brackets_the_400_step_best_without_failed_rungs(tmp_path, monkeypatch):
    """The rungs either side of the committed sweep's best, less those more than 1 nat worse (failed to train)."""
    for m, finals in SWEEP.items():
        for lr, val in finals.items():
            write(str(tmp_path), m, lr, 0, 400, 9.0 if lr == 3e-2 and m == "sltrain" else val)
    monkeypatch.setattr(horizon, "SWEEPS", dict(tiny=str(tmp_path)))
    args = horizon.get_args(["--results", str(tmp_path / "out")])
    assert horizon.bracket(args, "tiny", "full") == (1e-3, [3e-4, 1e-3, 3e-3])
    assert horizon.bracket(args, "tiny", "lowrank") == (3e-2, [1e-2, 3e-2])  # 1e-1 is nan: not a rung
    assert horizon.bracket(args, "tiny", "sltrain") == (1e-2, [3e-3, 1e-2])  # 3e-2 failed (9.0 against 1.4)


def test_horizon_widens_a_bracket_whose_best_is_its_edge(tmp_path, monkeypatch):
    """At --steps, full's best is the top rung of its bracket: one rung further (1e-2, which trained at 400 steps);
    sltrain's best is inside: nothing more; a next rung that failed at 400 steps is never run."""
    for m, finals in SWEEP.items():
        for lr, val in finals.items():
            write(str(tmp_path), m, lr, 0, 400, val)
    monkeypatch.setattr(horizon, "SWEEPS", dict(tiny=str(tmp_path)))
    args = horizon.get_args(["--steps", "60"])
    at = lambda v: [dict(type="eval", step=60, val_loss=v)]  # noqa: E731
    results = {"full": {3e-4: at(1.3), 1e-3: at(1.2), 3e-3: at(1.1)}, "sltrain": {3e-3: at(1.2), 1e-2: at(1.1), 3e-2: at(1.3)}}
    assert horizon.wider(args, results, "full", "tiny", "full") == 1e-2
    assert horizon.wider(args, results, "sltrain", "tiny", "sltrain") is None
    results["lowrank"] = {3e-2: at(1.2), 1e-1: at(1.0)}  # best at the top, and the rung past it...
    assert horizon.wider(args, results, "lowrank", "tiny", "lowrank") == 3e-1  # ...never ran at 400 steps: it may
    results["lowrank"] = {1e-2: at(1.1), 3e-2: at(1.0)}  # the rung past 3e-2, 1e-1, diverged at 400 steps
    assert horizon.wider(args, results, "lowrank", "tiny", "lowrank") is None
    results["full"][1e-2] = None  # queued, not finished: no best yet, nothing further
    assert horizon.wider(args, results, "full", "tiny", "full") is None


def test_horizon_headline_pairs_seeds_and_sizes_the_claims():
    """The README's headline from hand-made seeds (60 steps, logged every step): sltrain 1.0, 1.1, 1.2 against
    full 1.1, 1.3, 1.5 are differences -0.1, -0.2, -0.3: mean -0.2, sd 0.1, 95% CI -0.2 +- 4.303 x 0.1 / sqrt(3)
    = [-0.4484, +0.0484], within noise; against lowrank 2.0, 2.1, 2.2 (-1.0 each) lower with sd 0. The gap
    closed, (lowrank - sltrain) / (lowrank - full): 1.0 / 0.9, 1.0 / 0.8, 1.0 / 0.7."""
    def run(val):
        config = dict(type="config", eval_windows=8, seq_len=64, val_split_tokens=10_000, eval_share_read=0.0512)
        train = [dict(type="train", step=s, loss=val + 0.5, loss_mean=val + 0.5, steps_in_mean=1) for s in range(1, 61)]
        return [config, *train, dict(type="eval", step=60, val_loss=val)]
    vals = {"full": (1.1, 1.3, 1.5), "lowrank": (2.0, 2.1, 2.2), "sltrain": (1.0, 1.1, 1.2), "tiny-narrow": (1.0, 1.1, 1.2)}
    out = dict(best={label: 1e-2 for label in vals},
               seeds={(label, s): run(v) for label, vs in vals.items() for s, v in zip(horizon.SEEDS, vs)})
    text = horizon.headline(horizon.get_args(["--steps", "60"]), out, lambda model, method: 1.0)
    assert "8 windows of 64 tokens spread over the whole val split (10,000 tokens, 5% of it read)" in text
    assert "| full | 0.01 | 1.1000 / 1.3000 / 1.5000 | **1.3000 +- 0.2000** | 1.8000 +- 0.2000 | 1.00 MB |" in text
    line = next(x for x in text.splitlines() if x.startswith("- sltrain - full"))
    assert "val loss -0.2000 +- 0.1000, 95% CI [-0.4484, +0.0484], within noise" in line
    assert "train-batch loss -0.2000 +- 0.1000" in line
    assert "- sltrain - lowrank, paired by seed: val loss -1.0000 +- 0.0000, 95% CI [-1.0000, -1.0000], lower" in text
    closed = [1.0 / 0.9, 1.0 / 0.8, 1.0 / 0.7]
    assert f"sltrain closes: {sum(closed) / 3:.2f} +-" in text


def test_horizon_pairs_the_s_lr_run_with_the_committed_longer_runs_by_batch(tmp_path, monkeypatch):
    """Part 3 on hand-made logs (--longer 100, logged every 10 steps): the S-lr run's train loss is 1.0 at every
    logged step, the committed sltrain's 1.2 and full's 0.9; the last 10% is step 100 alone, the whole run
    steps 10-100: differences -0.2 and +0.1 there. Training equal to the committed code: the committed --steps
    twin and the bracket run log the same losses (3 of 3 equal); one changed loss is 2 of 3."""
    for m, finals in SWEEP.items():
        for lr, val in finals.items():
            write(str(tmp_path / "sweep"), m, lr, 0, 400, val)
    monkeypatch.setattr(horizon, "SWEEPS", {"tiny": str(tmp_path / "sweep"), "tiny-narrow": str(tmp_path / "sweep")})
    train = lambda loss, steps, every: [dict(type="train", step=s, loss=loss, loss_mean=loss, steps_in_mean=1)  # noqa
                                        for s in range(every, steps + 1, every)]
    config = dict(type="config", eval_windows=8, seq_len=64, val_split_tokens=10_000, eval_share_read=0.05)
    slr = [config, *train(1.0, 100, 10), dict(type="eval", step=100, val_loss=1.5, norms_S_BA={"attn.wq": [2.0, 4.0]})]
    out = dict(rungs_400={"full": 1e-3, "lowrank": 3e-2, "sltrain": 1e-2, "tiny-narrow": 1e-3},
               best={"full": 1e-3, "lowrank": 3e-2, "sltrain": 1e-2, "tiny-narrow": 1e-3},
               bracket={"full": {1e-3: train(2.0, 30, 10)}, "sltrain": {1e-2: train(2.0, 30, 10)}},
               twins={"full": train(2.0, 30, 10), "lowrank": None, "sltrain": [*train(2.0, 20, 10), *train(2.5, 30, 30)],
                      "tiny-narrow": None},
               committed={"full": [config, *train(0.9, 100, 10)], "lowrank": None, "sltrain": [config, *train(1.2, 100, 10)],
                          "tiny-narrow": None},
               seeds={}, sparse={("sltrain", horizon.SPARSE_RATIO, 0): slr}, longer={}, ablation={})
    args = horizon.get_args(["--steps", "30", "--longer", "100", "--results", str(tmp_path / "o")])
    text = horizon.report(args, out)
    assert "| 100 | 1.5000 | 0.500 |" in text  # ||S|| / ||scale B A|| = 2 / 4
    assert "equal at full 3/3, lowrank 0/0, sltrain 2/3, tiny-narrow 0/0 logged steps" in text
    assert "| sltrain (0.01) | not paired: 1 of 3 logged losses of its 30-step twin differ | | |" in text
    assert "| full (0.001) | 0.9000 | +0.1000 (1 steps) | +0.1000 (10 steps) |" in text
    out["twins"]["sltrain"] = train(2.0, 30, 10)  # the twin equal: paired
    assert "| sltrain (0.01) | 1.2000 | -0.2000 (1 steps) | -0.2000 (10 steps) |" in horizon.report(args, out)
    out["committed"]["sltrain"] = [dict(config, seed=1), *train(1.2, 100, 10)]  # another seed: other batches
    assert "| sltrain (0.01) | not paired: seed not the same | | |" in horizon.report(args, out)
