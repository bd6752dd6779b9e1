"""
The evidence at its horizon: every model's lr checked at 2,400 steps, 3 seeds at each best, S's own lr,
under the eval that reads windows across the whole val split. Tiny model, offline data, CPU, as study.py.

    python benchmarks/horizon.py             # every run below, in priority order: queued, resumed, skipped when done
    python benchmarks/horizon.py --plot      # the tables and PNGs from the committed logs only, and the
                                             # README's headline table (its `horizon.py: headline` block)

1. lr at the horizon: tiny full, lowrank, sltrain and tiny-narrow (full) at their 400-step best lr (the
   committed sweeps in benchmarks/results/study/ and dense/) and one rung either side, seed 0, --steps steps.
   A rung whose 400-step run failed (non-finite, or more than 1 nat above that sweep's best) is skipped; while a
   best at --steps is its bracket's edge, one rung further on that side.
2. seeds 0, 1, 2 at each model's --steps best lr.
3. S's own lr: sltrain seed 0 for --longer steps at its best lr with --sparse-lr-ratio 0.1 (S's values at a
   tenth of the factors' lr). Its val loss has no twin at --longer steps under this eval; its train losses pair
   with the committed --longer runs of the four (study/, dense/: seed 0, their 400-step lrs, the older eval),
   whose training is the code's of today bit for bit (the report checks it on the --steps logs): equal seeds,
   equal batches.
4. seeds 1 and 2 at --longer steps for sltrain (both S lrs) and tiny-narrow, under this eval.
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
from study import LADDER, ROOT, Task, ci95, ci_text, final_val, read_log, run_all, verdict
from why_sparse import footprint  # (parameters, the paper's memory estimate in MB) of a model and method

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
    p.add_argument("--plot", action="store_true", help="only the tables and plots, from the logs in --results")
    p.add_argument("--until", type=int, default=5, choices=range(1, 6), help="stop after this part (default: 5)")
    p.add_argument("--steps", type=int, default=2400, help="steps of an lr-check and seed run (default: 2400)")
    p.add_argument("--longer", type=int, default=4800, help="steps of the S-lr runs (default: 4800)")
    p.add_argument("--sweep-steps", type=int, default=400, help="steps of the committed sweeps (default: 400)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "horizon"), help="out-dirs of the runs")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "horizon"),
                   help="finished runs' logs and the tables (default: benchmarks/results/horizon)")
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
            v = final_val(read_log(path), args.sweep_steps)
            found[lr] = v if math.isfinite(v) else math.inf  # diverged: the worst, never the best
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


def wider(args, results, label, model, method):
    """The next rung past the edge of label's rungs when its best at --steps is that edge (and the rung did not
    fail at 400 steps), else None: no best is a grid's edge, as study.py's rule."""
    best = horizon_best(args, results, label)
    if best is None:
        return None
    lrs = sorted(results[label])
    i = LADDER.index(best)
    nxt = LADDER[i + 1] if best == lrs[-1] and i + 1 < len(LADDER) else LADDER[i - 1] if best == lrs[0] and i else None
    sweep = sweep_400(args, model, method)
    failed = nxt in sweep and not sweep[nxt] - min(sweep.values()) <= FAILED
    return None if nxt is None or nxt in results[label] or failed else nxt


def collect(args, do_runs):
    """Each part's records, {part: {key: records or None}}, running what is missing when do_runs."""
    out = dict(bracket={}, seeds={}, sparse={}, longer={}, ablation={}, rungs_400={}, committed={}, twins={})
    rungs = {}
    for label, model, method in MODELS:
        out["rungs_400"][label], rungs[label] = bracket(args, model, method)
    todo = [(label, lr) for label, _, _ in MODELS for lr in rungs[label]]
    kinds = {label: (model, method) for label, model, method in MODELS}
    while todo:  # the bracket, then one rung further while a best at --steps is its bracket's edge
        tasks = {(label, lr): Task(kinds[label][1], lr, 0, args.steps, kinds[label][0]) for label, lr in todo}
        for (label, lr), records in zip(tasks, run_all(args, list(tasks.values()), do_runs)):
            out["bracket"].setdefault(label, {})[lr] = records
        todo = [(label, lr) for label in kinds for lr in [wider(args, out["bracket"], label, *kinds[label])] if lr]
    best = {label: horizon_best(args, out["bracket"], label) for label, _, _ in MODELS}
    out["best"] = best
    for label, model, method in MODELS:  # the committed runs of the older eval (seed 0, the 400-step best lr)
        for part, steps in (("committed", args.longer), ("twins", args.steps)):
            path = os.path.join(SWEEPS[model], study.name_of(Task(method, out["rungs_400"][label], 0, steps, model)))
            out[part][label] = read_log(path + ".jsonl") if os.path.exists(path + ".jsonl") else None
    parts = [
        ("seeds", [((label, s), Task(method, best[label], s, args.steps, model))
                   for label, model, method in MODELS if best[label] for s in SEEDS]),
        ("sparse", [(("sltrain", ratio, 0), Task("sltrain", best["sltrain"], 0, args.longer, sparse_lr_ratio=ratio))
                    for ratio in (SPARSE_RATIO,) if best["sltrain"]]),
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


# -----------------------------------------------------------------------------
# measures: the train-batch loss, what an eval read (statistics: study.ci95, study.verdict)

def train_batch_loss(records, steps):
    """The mean training loss over the last 10% of the steps (the train records' interval means, weighted by
    their steps): an in-distribution measure on the batches every run of a seed sees alike."""
    start = steps - max(1, steps // 10)
    parts = [(r["loss_mean"], r["steps_in_mean"]) for r in records if r.get("type") == "train" and "loss_mean" in r
             and r["step"] > start]
    n = sum(k for _, k in parts)
    return sum(v * k for v, k in parts) / n if n and n == steps - start else None


def logged(records):
    """{step: the train loss logged there}: the loss of that step's batch."""
    return {r["step"]: r["loss"] for r in records if r.get("type") == "train"}


def mean(values):
    return sum(values) / len(values) if values else None


def norm_ratio(record):
    """||S|| / ||scale B A|| of an eval record, the sums over layer types (None where not logged)."""
    n = record.get("norms_S_BA")
    return sum(v[0] for v in n.values()) / sum(v[1] for v in n.values()) if n and sum(v[1] for v in n.values()) else None


def config_of(records):
    return next((r for r in records if r.get("type") == "config"), {})


BATCH_KEYS = ("seed", "batch_size", "grad_accum", "seq_len", "world_size")  # with the data: which batch a step sees


def batches_differ(a, b):
    """What makes two runs' step-k batches differ ('' if nothing): a batch setting or the data (data.loader draws
    step k's rows from the seed, the step and the micro-step)."""
    ca, cb = config_of(a), config_of(b)
    keys = [k for k in BATCH_KEYS if ca.get(k) != cb.get(k)]
    data = {k: v for k, v in (ca.get("data_meta") or {}).items() if k != "seconds"} != \
        {k: v for k, v in (cb.get("data_meta") or {}).items() if k != "seconds"}
    return ", ".join(keys + ["data"] * data)


def identical_training(new, old):
    """(equal, compared): the logged train losses two logs of one run share, and how many are bitwise equal."""
    if not new or not old:
        return 0, 0
    a, b = logged(new), logged(old)
    common = set(a) & set(b)
    return sum(a[s] == b[s] for s in common), len(common)


def evals(records):
    return {r["step"]: r["val_loss"] for r in records if r.get("type") == "eval"}


def signed(v):
    return "-" if v is None else f"{v:+.4f}"


def fmt(v, digits=4):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


# -----------------------------------------------------------------------------
# tables


def paired(a, b, steps, measure):
    """[(seed, a - b)] for the seeds both have, by `measure` (final_val or train_batch_loss)."""
    out = []
    for seed in sorted(set(a) & set(b)):
        x, y = measure(a[seed], steps), measure(b[seed], steps)
        if x is not None and y is not None:
            out.append((seed, x - y))
    return out


def difference_rows(pairs_of, steps):
    lines = ["| difference | measure | per seed | mean +- sd | 95% CI | reads |", "|---|---|---|---|---|---|"]
    for label, a, b in pairs_of:
        for measure, name in ((final_val, "val loss"), (train_batch_loss, "train-batch loss")):
            d = paired(a, b, steps, measure)
            if not d:
                continue
            mean, sd, low, high = ci95([v for _, v in d])
            lines.append(f"| {label} | {name} | " + ", ".join(f"{v:+.4f}" for _, v in d) +
                         f" | {mean:+.4f} +- {fmt(sd)} | " + ("-" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]") +
                         f" | {verdict(low, high)} |")
    return lines


def report(args, out):
    """benchmarks/results/horizon/table.md; returns its text."""
    labels = [label for label, _, _ in MODELS]
    any_records = next((r for part in ("bracket",) for lrs in out[part].values() for r in lrs.values() if r), [])
    lines = [f"Eval: {study.eval_named(any_records)}; the same windows for every run. Train-batch loss: the mean training "
             f"loss over the last 10% of the steps (equal seeds see identical batches). - = not run yet.", "",
             f"## 1. lr at the horizon: {args.steps} steps ({args.steps * 4096 / 1e6:.1f}M tokens), seed 0", "",
             "| model | 400-step best lr | " + " | ".join(f"lr {lr:g}" for lr in LADDER[2:8]) + " | best here |",
             "|---|---|" + "---|" * 6 + "---|"]
    for label in labels:
        lrs = out["bracket"].get(label, {})
        cell = {lr: f"{fmt(final_val(r, args.steps))} / {fmt(train_batch_loss(r, args.steps))}" if r else "-"
                for lr, r in lrs.items()}
        lines.append(f"| {label} | {out['rungs_400'][label]:g} | " +
                     " | ".join(cell.get(lr, "") for lr in LADDER[2:8]) +
                     f" | {fmt(out['best'][label], 0) if out['best'][label] is None else format(out['best'][label], 'g')} |")
    lines += ["", "(cells: val loss / train-batch loss; blank = a rung not run: outside the bracket, or failed at "
              "400 steps)", "", f"## 2. Three seeds at each model's {args.steps}-step best lr", "",
              "| model | lr | val loss per seed | val mean +- sd | train-batch mean +- sd |", "|---|---|---|---|---|"]
    seeds = {label: {s: out["seeds"][(label, s)] for s in SEEDS if out["seeds"].get((label, s))} for label in labels}
    for label in labels:
        runs = {s: r for s, r in seeds[label].items() if final_val(r, args.steps) is not None}
        if not runs:
            lines.append(f"| {label} | - | - | - | - |")
            continue
        v = ci95([final_val(r, args.steps) for r in runs.values()])
        t = [train_batch_loss(r, args.steps) for r in runs.values()]
        t = ci95(t) if None not in t else (math.nan, math.nan)
        lines.append(f"| {label} | {out['best'][label]:g} | " + ", ".join(fmt(final_val(r, args.steps)) for r in runs.values())
                     + f" | {fmt(v[0])} +- {fmt(v[1])} | {fmt(t[0])} +- {fmt(t[1])} |")
    lines += ["", "Paired by seed; 95% CI of the mean difference (t, n - 1 degrees of freedom); 'within noise' where "
              "it holds 0:", ""]
    lines += difference_rows([("sltrain - full", seeds["sltrain"], seeds["full"]),
                              ("sltrain - lowrank", seeds["sltrain"], seeds["lowrank"]),
                              ("sltrain - tiny-narrow", seeds["sltrain"], seeds["tiny-narrow"]),
                              ("full - tiny-narrow", seeds["full"], seeds["tiny-narrow"])], args.steps)
    closed = [(seeds["lowrank"][s], seeds["sltrain"][s], seeds["full"][s]) for s in SEEDS
              if all(s in seeds[m] for m in ("full", "lowrank", "sltrain"))]
    gaps = [(final_val(lo, args.steps) - final_val(sl, args.steps)) / (final_val(lo, args.steps) - final_val(fu, args.steps))
            for lo, sl, fu in closed]
    if gaps:
        g = ci95(gaps)
        lines += ["", f"Gap closed by sltrain, (lowrank - sltrain) / (lowrank - full), per seed: "
                  f"{', '.join(f'{x:.2f}' for x in gaps)}; mean {g[0]:.2f} +- {fmt(g[1], 2)}, 95% CI "
                  + ("-" if math.isnan(g[2]) else f"[{g[2]:.2f}, {g[3]:.2f}]")]
    # 3 and 4: S's own lr at the longer horizon
    long = {key: r for key, r in list(out["sparse"].items()) + list(out["longer"].items()) if r}
    slr = long.get(("sltrain", SPARSE_RATIO, 0))
    name = f"sltrain, S at {SPARSE_RATIO:g} x lr"
    lines += ["", f"## 3. S's own lr: {args.longer} steps ({args.longer * 4096 / 1e6:.1f}M tokens), seed 0", "",
              f"{name} (lr {fmt(out['best']['sltrain'], 0) if not out['best']['sltrain'] else format(out['best']['sltrain'], 'g')} "
              f"for A and B, {SPARSE_RATIO:g} x that for S's values), val loss at each eval under this eval, and "
              f"||S|| / ||scale B A|| (their sums over the layer types):", "", "| step | val loss | ||S|| / ||scale B A|| |",
              "|---|---|---|"]
    for rec in [r for r in slr or [] if r.get("type") == "eval"]:
        lines.append(f"| {rec['step']} | {fmt(rec['val_loss'])} | {fmt(norm_ratio(rec), 3)} |")
    same = {label: identical_training(out["bracket"].get(label, {}).get(out["rungs_400"][label]), out["twins"][label])
            for label in labels}
    commits = sorted({config_of(out["committed"][label]).get("commit", "?") for label in labels if out["committed"][label]})
    lines += ["", f"Its train loss against the committed {args.longer}-step runs (seed 0, each at its 400-step lr, "
              f"commits {', '.join(commits)}, the older eval: their val losses do not compare). Equal seeds and batch "
              f"settings train on equal batches, so each logged step pairs the same batch, if the training code "
              f"computes a step as it did: the logged train losses of each model's {args.steps}-step run at that lr, "
              f"committed from the older eval's runs and run again here, are equal at "
              + ", ".join(f"{label} {k}/{n}" for label, (k, n) in same.items()) + " logged steps.", ""]
    mine = logged(slr) if slr else {}
    rows = []
    for label in labels:
        if not out["committed"][label] or not slr:
            continue
        k, n = same[label]
        other = batches_differ(slr, out["committed"][label])
        lr = out["rungs_400"][label]
        if other or not k == n > 0:
            rows.append(f"| {label} ({lr:g}) | not paired: " + (f"{other} not the same" if other else
                        f"{n - k} of {n} logged losses of its {args.steps}-step twin differ") + " | | |")
            continue
        theirs = logged(out["committed"][label])
        tail = [s for s in sorted(set(mine) & set(theirs)) if s > args.longer - args.longer // 10]
        whole = sorted(set(mine) & set(theirs))
        rows.append(f"| {label} ({lr:g}) | {fmt(mean([theirs[s] for s in tail]))} | "
                    f"{signed(mean([mine[s] - theirs[s] for s in tail]))} ({len(tail)} steps) | "
                    f"{signed(mean([mine[s] - theirs[s] for s in whole]))} ({len(whole)} steps) |")
    if rows:
        lines += [f"| model (lr) | mean train loss, logged steps of the last 10% | {name} - model, there | the same "
                  f"over the whole run |", "|---|---|---|---|", *rows, "",
                  f"One seed: a difference over logged steps pairs batches, not seeds; no CI. {name}'s own mean over "
                  f"the same steps: {fmt(mean([mine[s] for s in mine if s > args.longer - args.longer // 10]))}."]
    by_seed = {key: {s: long[(label, ratio, s)] for s in SEEDS if (label, ratio, s) in long}
               for key, (label, ratio) in (("slr", ("sltrain", SPARSE_RATIO)), ("sltrain", ("sltrain", None)),
                                           ("tiny-narrow", ("tiny-narrow", None)))}
    rows = difference_rows([(f"{name} - sltrain", by_seed["slr"], by_seed["sltrain"]),
                            (f"{name} - tiny-narrow", by_seed["slr"], by_seed["tiny-narrow"])], args.longer)
    if len(rows) > 2:  # part 4's seeds, under this eval
        lines += ["", f"Seeds at {args.longer} steps under this eval (part 4):", ""] + rows
    # 5: the ablation
    lines += ["", f"## 5. The ablation's seed-0 cells at {args.steps} steps, sltrain's best lr", "",
              "| rank | delta | val loss | train-batch loss |", "|---|---|---|---|"]
    for (rank, delta), r in out["ablation"].items():
        lines.append(f"| {rank} | {delta:g} | {fmt(final_val(r, args.steps) if r else None)} | "
                     f"{fmt(train_batch_loss(r, args.steps) if r else None)} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write(text)
    return text


def headline(args, out, memory_mb):
    """The README's result: each model's three seeds at --steps steps at its --steps best lr (val and train-batch
    loss, mean +- sd), its memory, and the paired differences with their 95% CIs. memory_mb(model, method) -> MB."""
    lines = [f"Eval: {study.eval_named(next(r for r in out['seeds'].values() if r))}.", "",
             f"| {args.steps:,} steps ({args.steps * 4096 / 1e6:.1f}M tokens) | lr | val loss, seeds "
             f"{' / '.join(map(str, SEEDS))} | val mean +- sd | train-batch mean +- sd | memory (`--dry-run`) |",
             "|---|---|---|---|---|---|"]
    runs = {label: {s: out["seeds"][(label, s)] for s in SEEDS if out["seeds"].get((label, s))}
            for label, _, _ in MODELS}
    for label, model, method in MODELS:
        if not runs[label]:
            continue
        val = [v for v in (final_val(r, args.steps) for r in runs[label].values()) if v is not None]
        batch = [v for v in (train_batch_loss(r, args.steps) for r in runs[label].values()) if v is not None]
        if not val or not batch:
            continue
        v, t = ci95(val), ci95(batch)
        lines.append(f"| {label} | {out['best'][label]:g} | {' / '.join(fmt(x) for x in val)} | "
                     f"**{fmt(v[0])} +- {fmt(v[1])}** | {fmt(t[0])} +- {fmt(t[1])} | {memory_mb(model, method):.2f} MB |")
    lines.append("")
    for a, b in (("sltrain", "full"), ("sltrain", "lowrank"), ("sltrain", "tiny-narrow")):
        val, batch = (paired(runs[a], runs[b], args.steps, m) for m in (final_val, train_batch_loss))
        if len(val) > 1:
            lines.append(f"- {a} - {b}, paired by seed: val loss {ci_text([d for _, d in val])}; train-batch loss "
                         f"{ci_text([d for _, d in batch])}")
    both = [s for s in SEEDS if all(s in runs[m] for m in ("full", "lowrank", "sltrain"))]
    if len(both) > 1:
        closed = [(final_val(runs["lowrank"][s], args.steps) - final_val(runs["sltrain"][s], args.steps)) /
                  (final_val(runs["lowrank"][s], args.steps) - final_val(runs["full"][s], args.steps)) for s in both]
        mean, sd, low, high = ci95(closed)
        lines.append(f"- the share of the lowrank -> full gap (val loss) sltrain closes: {mean:.2f} +- {sd:.2f}, "
                     f"95% CI [{low:.2f}, {high:.2f}]")
    return "\n".join(lines) + "\n"


def plot(args, out):
    plt = study.pyplot()
    if plt is None:
        return
    colors = {"full": "tab:blue", "lowrank": "tab:orange", "sltrain": "tab:green", "tiny-narrow": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, _, _ in MODELS:
        runs = [out["seeds"][(label, s)] for s in SEEDS if out["seeds"].get((label, s))]
        curves = [evals(r) for r in runs if final_val(r, args.steps) is not None]
        if curves:
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            x = [s * 4096 / 1e6 for s in steps]
            axes[0].plot(x, [sum(c[s] for c in curves) / len(curves) for s in steps], color=colors[label],
                         label=f"{label} (lr {out['best'][label]:g}, {len(curves)} seeds)")
            axes[0].fill_between(x, [min(c[s] for c in curves) for s in steps], [max(c[s] for c in curves) for s in steps],
                                 color=colors[label], alpha=0.2)
        lrs = {lr: final_val(r, args.steps) for lr, r in out["bracket"].get(label, {}).items() if r}
        if lrs:
            axes[1].plot(sorted(lrs), [lrs[lr] for lr in sorted(lrs)], "o-", color=colors[label], label=label)
    axes[0].set(xlabel="tokens (M)", ylabel="val loss (spread eval)", title=f"{args.steps} steps, mean and range over seeds")
    axes[1].set(xscale="log", xlabel="lr", ylabel="final val loss", title=f"lr at the horizon ({args.steps} steps, seed 0)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout(), fig.savefig(os.path.join(args.results, "horizon.png"), dpi=100)
    slr = out["sparse"].get(("sltrain", SPARSE_RATIO, 0))
    if slr:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        runs = [(f"{label} ({out['rungs_400'][label]:g}, committed)", colors[label], "-", out["committed"][label])
                for label, _, _ in MODELS if out["committed"][label]]
        for name, color, style, records in runs + [(f"sltrain, S at {SPARSE_RATIO:g} x lr", "black", "--", slr)]:
            steps = sorted(logged(records))
            window = 5  # a moving mean over 5 logged batches: each point is one batch's loss
            smooth = [mean([logged(records)[s] for s in steps[max(0, k - window + 1):k + 1]]) for k in range(len(steps))]
            axes[0].plot([s * 4096 / 1e6 for s in steps], smooth, style, color=color, label=name)
        norms = [(r["step"], norm_ratio(r)) for r in slr if r.get("type") == "eval" and norm_ratio(r) is not None]
        axes[1].plot([s * 4096 / 1e6 for s, _ in norms], [v for _, v in norms], "o--", color="black")
        axes[0].set(xlabel="tokens (M)", ylabel="train loss (mean of 5 logged batches)", ylim=(None, 2.0),
                    title=f"{args.longer} steps, seed 0: the same batches")
        axes[1].set(xlabel="tokens (M)", ylabel="||S|| / ||scale B A|| (sums over layer types)",
                    title=f"sltrain, S at {SPARSE_RATIO:g} x lr: S against scale B A")
        axes[0].legend(fontsize=8)
        fig.tight_layout(), fig.savefig(os.path.join(args.results, "sparse_lr.png"), dpi=100)
    print(f"wrote the PNGs to {args.results}")


def main(argv=None):
    args, t0 = get_args(argv), time.time()
    out = study.collected(collect, args)  # a run that failed: one error line
    tables = report(args, out)
    print(tables)
    if (args.results == os.path.join(ROOT, "benchmarks", "results", "horizon") and all(out["best"].values()) and
            all(out["seeds"].get((label, s)) for label, _, _ in MODELS for s in SEEDS) and study.write_block(
            os.path.join(ROOT, "README.md"), "horizon.py: headline", headline(args, out, lambda model, method: footprint(model, method)[1]))):
        print("wrote the README's headline table")
    if args.results == os.path.join(ROOT, "benchmarks", "results", "horizon"):
        study.write_block(os.path.join(ROOT, "docs", "why_sparse.md"), "horizon.py: tables",
                          tables.replace("\n## ", "\n### "))  # under that page's own section heading
    plot(args, out)
    print(f"horizon: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
