"""benchmarks/study.py: which lr it picks, when it widens the grid, and the table's arithmetic, on logs
written here by hand (no training): the references are the numbers put into those logs, worked by hand."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import study  # noqa: E402

SWEEP = {  # final val loss per lr: full's best is inside the grid, lowrank's and sltrain's at its top edge
    "full": {1e-4: 3.0, 3e-4: 2.0, 1e-3: 1.5, 3e-3: 1.7, 1e-2: 2.5},
    "lowrank": {1e-4: 3.5, 3e-4: 2.7, 1e-3: 2.1, 3e-3: 1.9, 1e-2: 1.8, 3e-2: 1.6, 1e-1: float("nan")},
    "sltrain": {1e-4: 3.4, 3e-4: 2.6, 1e-3: 2.0, 3e-3: 1.6, 1e-2: 1.4, 3e-2: 1.9},
}
SEEDS = {"full": (1e-3, [1.0, 1.1, 1.2]), "lowrank": (3e-2, [2.0, 2.1, 2.2]), "sltrain": (1e-2, [1.5, 1.5, 1.5])}


def write(folder, method, lr, seed, steps, val):
    with open(os.path.join(folder, study.name_of(method, lr, seed, steps) + ".jsonl"), "w") as f:
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
    write(tmp_path, "lowrank", 3e-2, 0, 80, 0.1)  # only full and sltrain run longer: never read
    sweep, seeds, longer = study.collect(args, do_runs=False)  # --plot finds the 80-step runs by their names
    assert sorted(longer) == ["full", "sltrain"] and args.longer == 80
    study.report(args, sweep, seeds, longer)
    table = (tmp_path / "table.md").read_text()
    assert "sltrain - full, seeds 0, 1, 2: +0.5000, +0.4000, +0.3000" in table  # 1.5-1.0, 1.5-1.1, 1.5-1.2
    assert "| 80 | 0.9000 | 0.9500 | +0.0500 |" in table


def test_missing_and_diverged_seeds_pair_by_seed(tmp_path):
    args = write_study(tmp_path, skip=("sltrain", 1), diverged=("lowrank", 2))  # sltrain's seed 1 not run yet
    sweep, seeds, longer = study.collect(args, do_runs=False)
    study.report(args, sweep, seeds, longer)
    table = (tmp_path / "table.md").read_text()
    assert "| sltrain | 0.01 | 1.5000 | - | 1.5000 | 1.5000 +- 0.0000 |" in table
    assert "| lowrank | 0.03 | 2.0000 | 2.1000 | inf | - |" in table  # a diverged seed: no mean
    assert "sltrain - full, seeds 0, 2: +0.5000, +0.3000" in table  # seed 2 with seed 2, not with seed 1
    assert "gap closed" not in table  # seed 1 lacks sltrain, seed 2's lowrank diverged: no gap with a spread
