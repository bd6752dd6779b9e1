"""
The evidence at its horizon: every model's lr checked at 2,400 steps, 3 seeds at each best, S's own lr,
under the eval that reads windows across the whole val split. Tiny model, offline data, CPU, as study.py.

    python benchmarks/horizon.py             # every run below, in priority order: queued, resumed, skipped when done
    python benchmarks/horizon.py --plot      # the tables and PNGs from the committed logs only

1. lr at the horizon: tiny full, lowrank, sltrain and tiny-narrow (full) at their 400-step best lr (the
   committed sweeps in benchmarks/results/study/ and dense/) and one rung either side, seed 0, --steps steps.
   A rung whose 400-step run failed (non-finite, or more than 1 nat above that sweep's best) is skipped.
2. seeds 0, 1, 2 at each model's --steps best lr.
3. S's own lr: sltrain seed 0 for --longer steps at its best lr with --sparse-lr-ratio 0.1 (S's values at a
   tenth of the factors' lr), beside each of the four at --longer steps, seed 0, at their best lr.
4. seeds 1 and 2 at --longer steps for sltrain (both S lrs) and tiny-narrow.
5. the ablation's seed-0 cells (benchmarks/why_sparse.py's settings) at --steps steps, sltrain's best lr.
Logs go to benchmarks/results/horizon/ (study.run: a finished log there is skipped, a finished one in its
out-dir under --runs copied). Each log's config records the commit it ran at and what its evals read.
"""
import argparse
import math
import os
import sys
import time

import study
from study import LADDER, ROOT, Task, final_val, read_log, run_all

# (label, model, method): the four models compared; tiny-narrow is the dense model of tiny sltrain's size
MODELS = (("full", "tiny", "full"), ("lowrank", "tiny", "lowrank"), ("sltrain", "tiny", "sltrain"),
          ("tiny-narrow", "tiny-narrow", "full"))
SWEEPS = dict(tiny=os.path.join(ROOT, "benchmarks", "results", "study"),
              **{"tiny-narrow": os.path.join(ROOT, "benchmarks", "results", "dense")})
FAILED = 1.0  # nats above a sweep's best: that rung did not train (3e-2: 3.7 against 1.3-1.5 at 400 steps)
SPARSE_RATIO = 0.1
SEEDS = (0, 1, 2)
ABLATION = ((32, 0.01), (32, 0.1), (16, 0.03), (64, 0.03))  # why_sparse.py's settings besides tiny's own


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2400, help="steps of an lr-check and seed run (default: 2400)")
    p.add_argument("--longer", type=int, default=4800, help="steps of the S-lr runs (default: 4800)")
    p.add_argument("--sweep-steps", type=int, default=400, help="steps of the committed sweeps (default: 400)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "horizon"), help="out-dirs of the runs")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "horizon"),
                   help="finished runs' logs and the tables (default: benchmarks/results/horizon)")
    p.add_argument("--plot", action="store_true", help="only the tables and plots, from the logs in --results")
    p.add_argument("--until", type=int, default=5, choices=range(1, 6), help="stop after this part (default: 5)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores/jobs threads (default: 2)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")
    args = p.parse_args(argv)
    for name in ("steps", "longer", "sweep_steps", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def sweep_400(args, model, method):
    """{lr: final val loss} of the committed --sweep-steps sweep of one model (old eval: used to pick rungs only)."""
    found = {}
    for lr in LADDER:
        path = os.path.join(SWEEPS[model], study.name_of(Task(method, lr, 0, args.sweep_steps, model)) + ".jsonl")
        if os.path.exists(path) and final_val(read_log(path), args.sweep_steps) is not None:
            found[lr] = final_val(read_log(path), args.sweep_steps)
    if not found:
        sys.exit(f"error: no {args.sweep_steps}-step sweep of {model} {method} in {SWEEPS[model]}: run "
                 f"benchmarks/study.py (or why_sparse.py for tiny-narrow) first")
    return found


def bracket(args, model, method):
    """The 400-step best lr and the rung either side, without rungs that failed at 400 steps."""
    sweep = sweep_400(args, model, method)
    best = min(sweep, key=sweep.get)
    i = LADDER.index(best)
    rungs = [LADDER[j] for j in (i - 1, i, i + 1) if 0 <= j < len(LADDER)]
    return best, [lr for lr in rungs if lr not in sweep or (math.isfinite(sweep[lr]) and sweep[lr] - sweep[best] <= FAILED)]


def horizon_best(args, results, label):
    """The lowest final val loss among label's rungs at --steps steps (None while one is missing)."""
    if any(r is None or final_val(r, args.steps) is None for r in results[label].values()):
        return None
    finals = {lr: final_val(r, args.steps) for lr, r in results[label].items()}
    return min(finals, key=lambda lr: finals[lr] if math.isfinite(finals[lr]) else math.inf)


def collect(args, do_runs):
    """Each part's records, {part: {key: records or None}}, running what is missing when do_runs."""
    out = dict(bracket={}, seeds={}, sparse={}, longer={}, ablation={}, rungs_400={})
    rungs = {}
    for label, model, method in MODELS:
        out["rungs_400"][label], rungs[label] = bracket(args, model, method)
    tasks = {(label, lr): Task(method, lr, 0, args.steps, model) for label, model, method in MODELS for lr in rungs[label]}
    done = dict(zip(tasks, run_all(args, list(tasks.values()), do_runs)))
    for (label, lr), records in done.items():
        out["bracket"].setdefault(label, {})[lr] = records
    best = {label: horizon_best(args, out["bracket"], label) for label, _, _ in MODELS}
    out["best"] = best
    parts = [
        ("seeds", [((label, s), Task(method, best[label], s, args.steps, model))
                   for label, model, method in MODELS if best[label] for s in SEEDS]),
        ("sparse", [(("sltrain", ratio, 0), Task("sltrain", best["sltrain"], 0, args.longer, sparse_lr_ratio=ratio))
                    for ratio in (SPARSE_RATIO,) if best["sltrain"]] +
                   [((label, None, 0), Task(method, best[label], 0, args.longer, model))
                    for label, model, method in MODELS if best[label]]),
        ("longer", [((label, ratio, s), Task(method, best[label], s, args.longer, model, sparse_lr_ratio=ratio))
                    for label, model, method, ratio in (("sltrain", "tiny", "sltrain", None),
                                                        ("sltrain", "tiny", "sltrain", SPARSE_RATIO),
                                                        ("tiny-narrow", "tiny-narrow", "full", None))
                    if best[label] for s in (1, 2)]),
        ("ablation", [((rank, delta), Task("sltrain", best["sltrain"], 0, args.steps, rank=rank, delta=delta))
                      for rank, delta in ABLATION if best["sltrain"]]),
    ]
    for n, (part, keyed) in enumerate(parts, start=2):
        runs = do_runs and n <= args.until
        for (key, _), records in zip(keyed, run_all(args, [t for _, t in keyed], runs)):
            out[part][key] = records
    return out


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    try:
        out = collect(args, do_runs=not args.plot)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    for label, lrs in out["bracket"].items():
        print(f"{label}: " + ", ".join(f"lr {lr:g} {final_val(r, args.steps):.4f}" if r else f"lr {lr:g} -"
                                       for lr, r in sorted(lrs.items())))
    print(f"horizon: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
