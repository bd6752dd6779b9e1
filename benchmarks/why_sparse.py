"""
Why sparse plus low-rank? The paper's Table 6 ablation, and the question it leaves open: is SLTrain better
than a dense model of its parameter count? On the tiny model, offline data, CPU, as benchmarks/study.py.

    python benchmarks/why_sparse.py                    # every run below: queued, resumed, skipped when done
    python benchmarks/why_sparse.py --plot             # the tables and the PNG from the committed logs only
    python benchmarks/why_sparse.py --ablation-seeds 0 1 2   # the ablation with seeds 1 and 2 as well

1. ablation (logs in benchmarks/results/ablation/): sltrain at r = 32 with delta in {0.01, 0.1}, and at
   delta = 0.03 with r in {16, 64}, alpha 8 (scale = 8 / r), --seed-steps steps at the study's sltrain lr
   1e-2. The study's runs give delta = 0 (lowrank) and r = 32, delta = 0.03 (sltrain).
   lr check: every setting (those two included: the study's sweep ran them) for --sweep-steps steps at
   the rung either side of 1e-2 and at 1e-2 itself: is the order of the settings the same at each lr?
2. the parameter-matched dense model (logs in benchmarks/results/dense/): model.py's tiny-narrow, full-rank,
   within 5% of tiny sltrain's parameter count. Its own lr sweep by the study's rule (--sweep-steps steps,
   1e-4 ... 1e-2, one rung further while the best is an edge), seeds 0, 1, 2 at its best lr for
   --seed-steps steps, and seed 0 for --longer steps; against sltrain's study runs, paired by seed. And
   sltrain seed 0 for --longer steps one lr rung lower (3e-3): is the long-run verdict the 400-step lr's?
Run names are the study's with the model and the setting: sltrain-r32-d0.1-lr0.01-seed0-steps2400,
tiny-narrow-full-lr0.001-seed0-steps400. Each is a plain train.py run (study.run: its out-dir under --runs;
a finished log there is copied, not rerun). Writes benchmarks/results/ablation/table.md (params, memory by
train.py --dry-run's estimate, val loss; the lr check), benchmarks/results/dense/table.md (the dense
sweep and the verdict) and benchmarks/results/ablation/val_loss_vs_params.png (the paper's Figure-1 view).

Status: run in full on the project's CPU machine; every run's log is in benchmarks/results/ablation/ and dense/.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import study
from study import LADDER, ROOT, VOCAB, Task, final_val, mean_sd, run_all, sweep_lrs

STUDY_LR = 1e-2  # the study's best sltrain (and lowrank) lr
# (label, Task template: method, rank, delta). rank None: the study's own run (tiny's r 32, delta 0.03)
SETTINGS = (
    ("lowrank r32", "lowrank", None, None),
    ("sltrain r32 d0.01", "sltrain", 32, 0.01),
    ("sltrain r32 d0.03", "sltrain", None, None),
    ("sltrain r32 d0.1", "sltrain", 32, 0.1),
    ("sltrain r16 d0.03", "sltrain", 16, 0.03),
    ("sltrain r64 d0.03", "sltrain", 64, 0.03),
)
DENSE = "tiny-narrow"
LOWER_LR = LADDER[LADDER.index(STUDY_LR) - 1]  # 3e-3: the long-run check of the dense verdict


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-steps", type=int, default=400, help="steps of an lr-check and sweep run (default: 400)")
    p.add_argument("--seed-steps", type=int, default=2400, help="steps of a seed run, ~10M tokens (default: 2400)")
    p.add_argument("--longer", type=int, default=4800, help="steps of the dense model's seed-0 run that sltrain's "
                   "study --longer run is set against (default: 4800; 0: off)")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0], help="seeds of each ablation setting "
                   "(default: 0)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "why_sparse"), help="out-dirs of the runs")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"),
                   help="holds study/, ablation/ and dense/ (default: benchmarks/results)")
    p.add_argument("--plot", action="store_true", help="only the tables and the plot, from the logs in --results")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores/jobs threads (default: 2)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")
    args = p.parse_args(argv)
    for name in ("sweep_steps", "seed_steps", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.longer and args.longer <= args.seed_steps:
        p.error(f"--longer {args.longer}: must be above --seed-steps ({args.seed_steps}), or 0 (off)")
    if any(s < 0 for s in args.ablation_seeds):
        p.error("--ablation-seeds must be >= 0")
    return args


def folder(args, name):
    """study.run's args for the logs of one results folder: study, ablation or dense."""
    return argparse.Namespace(**{**vars(args), "results": os.path.join(args.results, name)})


def setting_task(setting, lr, seed, steps):
    _, method, rank, delta = setting
    return Task(method, lr, seed, steps, rank=rank, delta=delta)


def runs_of(args, setting, tasks, do_runs):
    """The setting's tasks' records: the study's logs for its own settings (never rerun here), else the ablation's."""
    if setting[2] is None:
        return run_all(folder(args, "study"), tasks, do_runs=False)
    return run_all(folder(args, "ablation"), tasks, do_runs)


# -----------------------------------------------------------------------------
# collecting the runs


def collect(args, do_runs):
    """-> dict(ablation={label: {seed: final val}}, lr_check={label: {lr: final val}}, dense_sweep={lr: val},
    dense_lr, dense={seed: final val}, sltrain={seed: final val}, full={seed: final val},
    longer={sltrain, tiny-narrow: {0: val}}); the study's runs are only read, never run here."""
    out = dict(ablation={}, lr_check={})
    for setting in SETTINGS:  # the 2,400-step seed runs first: they are the table
        seeds = args.ablation_seeds if setting[2] is not None else study.SEEDS
        tasks = [setting_task(setting, STUDY_LR, s, args.seed_steps) for s in seeds]
        out["ablation"][setting[0]] = finals(tasks, runs_of(args, setting, tasks, do_runs))
    i = LADDER.index(STUDY_LR)
    lrs = LADDER[i - 1:i + 2]
    for setting in SETTINGS:
        tasks = [setting_task(setting, lr, 0, args.sweep_steps) for lr in lrs]
        out["lr_check"][setting[0]] = {t.lr: v for t, v in zip(tasks, finals_list(tasks, runs_of(args, setting, tasks,
                                                                                                  do_runs)))}
    dense = folder(args, "dense")
    out["dense_sweep"], best = sweep_lrs(dense, ["full"], lambda m, lr: Task(m, lr, 0, args.sweep_steps, DENSE), do_runs)
    out["dense_sweep"], out["dense_lr"] = out["dense_sweep"]["full"], best.get("full")
    out["dense"], out["longer"] = {}, {}
    if out["dense_lr"] is not None:
        tasks = [Task("full", out["dense_lr"], s, args.seed_steps, DENSE) for s in study.SEEDS]
        out["dense"] = finals(tasks, run_all(dense, tasks, do_runs))
        if args.longer:
            task = Task("full", out["dense_lr"], 0, args.longer, DENSE)
            out["longer"][DENSE] = finals([task], run_all(dense, [task], do_runs))
    base = folder(args, "study")
    for method, lr in (("sltrain", STUDY_LR), ("full", 1e-3)):  # the study's best lrs (its table)
        tasks = [Task(method, lr, s, args.seed_steps) for s in study.SEEDS]
        out[method] = finals(tasks, run_all(base, tasks, do_runs=False))
    if args.longer:
        task = Task("sltrain", STUDY_LR, 0, args.longer)
        out["longer"]["sltrain"] = finals([task], run_all(base, [task], do_runs=False))
        # is the long-run verdict the 400-step lr's? sltrain once more, one rung lower (kept with the dense runs)
        task = Task("sltrain", LOWER_LR, 0, args.longer)
        out["longer"]["sltrain lower lr"] = finals([task], run_all(dense, [task], do_runs))
    return out


def finals_list(tasks, records):
    return [final_val(r, t.steps) if r else None for t, r in zip(tasks, records)]


def finals(tasks, records):
    """{seed: final val loss} of the finished ones."""
    return {t.seed: v for t, v in zip(tasks, finals_list(tasks, records)) if v is not None}


def footprint(model, method, rank=None, delta=None):
    """(total parameters, estimated memory in MB) from train.py --dry-run (the paper's count)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--method", method, "--dry-run", *VOCAB]
    cmd += [] if rank is None else ["--rank", str(rank), "--delta", str(delta)]
    out = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    return out["params_total"], (2 * out["params_total"] + 4 * out["params_trainable"] + 8 * out["support_nnz"]) / 1e6


# -----------------------------------------------------------------------------
# tables and the plot


def cell(v):
    return "-" if v is None else f"{v:.4f}"


def stats(vals):
    s = mean_sd(list(vals.values()))
    if not s:
        return "-"
    return f"{s[0]:.4f}" + ("" if math.isnan(s[1]) else f" +- {s[1]:.4f}") + f" ({len(vals)})"


def points(res):
    """[(label, model, method, rank, delta, {seed: final val})]: every method and setting at --seed-steps."""
    rows = [("full (tiny)", "tiny", "full", None, None, res["full"]),
            (f"full ({DENSE})", DENSE, "full", None, None, res["dense"])]
    return rows + [(label, "tiny", method, rank, delta, res["ablation"][label]) for label, method, rank, delta in SETTINGS]


def kendall(a, b):
    """Kendall's tau of two orders of the same labels: (concordant - discordant pairs) / all pairs."""
    pos = {k: i for i, k in enumerate(b)}
    pairs = [(x, y) for i, x in enumerate(a) for y in a[i + 1:]]
    return sum(1 if pos[x] < pos[y] else -1 for x, y in pairs) / len(pairs)


def report(args, res, sizes):
    """The two tables (ablation/table.md, dense/table.md); returns their text."""
    i = LADDER.index(STUDY_LR)
    lrs = LADDER[i - 1:i + 2]
    dense_lr = "-" if res["dense_lr"] is None else f"{res['dense_lr']:g}"
    named = {name: f"Eval: {study.eval_named(study.sweep_records(folder(args, name)))}." for name in ("ablation", "dense")}
    lines = [named["ablation"], "", f"Every method and setting at {args.seed_steps} steps ({args.seed_steps * 4096 / 1e6:.1f}M tokens): "
             "final val loss, seed 0 and mean +- sd (seeds); - = not run yet. Params and memory: train.py --dry-run "
             f"(bf16 weights and Adam moments, int64 support indices). lr: lowrank and sltrain 1e-2, full (tiny) "
             f"1e-3, full ({DENSE}) {dense_lr}.", "",
             "| method | params | memory (MB) | seed 0 | mean +- sd (seeds) |", "|---|---|---|---|---|"]
    for label, *_, vals in points(res):
        params, mb = sizes[label]
        lines.append(f"| {label} | {params:,} | {mb:.2f} | {cell(vals.get(0))} | {stats(vals)} |")
    lines += ["", f"lr check: seed 0, {args.sweep_steps} steps, final val loss at the study's sltrain lr and one rung "
              "either side (- = not run yet):", "", "| setting | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
              "|---|" + "---|" * len(lrs)]
    check = res["lr_check"]
    lines += [f"| {label} | " + " | ".join(cell(check[label].get(lr)) for lr in lrs) + " |" for label, *_ in SETTINGS]
    orders = {}
    for lr in lrs:
        vals = {label: check[label].get(lr) for label, *_ in SETTINGS}
        if all(v is not None for v in vals.values()):
            orders[lr] = sorted(vals, key=lambda k: vals[k] if math.isfinite(vals[k]) else math.inf)
            lines.append(f"\norder at lr {lr:g} (best first): {', '.join(orders[lr])}")
    if len(orders) == len(lrs):
        same = all(o == orders[STUDY_LR] for o in orders.values())
        taus = ", ".join(f"lr {lr:g} {kendall(orders[lr], orders[STUDY_LR]):.2f}" for lr in lrs if lr != STUDY_LR)
        lines.append(f"\nthe same order at every lr: {'yes' if same else 'no'} (Kendall's tau against lr "
                     f"{STUDY_LR:g}, 1 = the same order, -1 = reversed: {taus})")
    ablation = "\n".join(lines) + "\n"
    # the verdict: sltrain vs the dense model of its size, paired by seed
    grid = sorted(set(study.LRS) | set(res["dense_sweep"]))
    lines = [named["dense"], "", f"{DENSE} full-rank lr sweep ({args.sweep_steps} steps, seed 0), final val loss (- = not run yet):", "",
             "| " + " | ".join(f"lr {lr:g}" for lr in grid) + " |", "|" + "---|" * len(grid),
             "| " + " | ".join(cell(res["dense_sweep"].get(lr)) for lr in grid) + " |"]
    lines += ["", f"sltrain (tiny, r 32, delta 0.03, lr 1e-2, {sizes['sltrain r32 d0.03'][0]:,} params) vs full-rank "
              f"{DENSE} (lr {dense_lr}, {sizes[f'full ({DENSE})'][0]:,} params), final val loss (- = not run yet):", "",
              "| tokens | seed | sltrain | " + DENSE + " | sltrain - " + DENSE + " |", "|---|---|---|---|---|"]
    for tokens, sl, dn in ((args.seed_steps * 4096, res["sltrain"], res["dense"]),
                           (args.longer * 4096, res["longer"].get("sltrain", {}), res["longer"].get(DENSE, {}))):
        if not tokens:
            continue
        diffs = {}
        for s in study.SEEDS if tokens == args.seed_steps * 4096 else (0,):
            a, b = sl.get(s), dn.get(s)
            if a is not None and b is not None:
                diffs[s] = a - b
            lines.append(f"| {tokens / 1e6:.1f}M | {s} | {cell(a)} | {cell(b)} | "
                         f"{'-' if s not in diffs else f'{diffs[s]:+.4f}'} |")
        m = mean_sd(list(diffs.values()))
        lines.append(f"| {tokens / 1e6:.1f}M | mean | | | " + ("-" if not m else f"{m[0]:+.4f}" + (
            "" if math.isnan(m[1]) else f" +- {m[1]:.4f}") + f" ({len(diffs)} paired)") + " |")
        if m and len(diffs) > 1:
            lines.append(f"| {tokens / 1e6:.1f}M | 95% CI | | | {study.ci_text(list(diffs.values()))} |")
    if args.longer:
        a, b = res["longer"].get("sltrain lower lr", {}).get(0), res["longer"].get(DENSE, {}).get(0)
        lines += ["", f"the same at {args.longer * 4096 / 1e6:.1f}M tokens with sltrain one lr rung lower "
                  f"({LOWER_LR:g}), seed 0: sltrain {cell(a)}, {DENSE} {cell(b)}, sltrain - {DENSE} "
                  + ("-" if a is None or b is None else f"{a - b:+.4f}")]
    dense = "\n".join(lines) + "\n"
    for name, text in (("ablation", ablation), ("dense", dense)):
        os.makedirs(os.path.join(args.results, name), exist_ok=True)
        with open(os.path.join(args.results, name, "table.md"), "w") as f:
            f.write(text)
    print(ablation + "\n" + dense)
    return ablation, dense


def plot(args, res, sizes):
    plt = study.pyplot()
    if plt is None:
        return
    colors = dict(full="tab:blue", lowrank="tab:orange", sltrain="tab:green")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, model, method, rank, delta, vals in points(res):  # seed 0 for all: every setting ran it
        x, s = sizes[label][0] / 1e3, mean_sd(list(vals.values()))
        if 0 in vals:
            ax.plot([x], [vals[0]], "s" if model == DENSE else "o", color=colors[method])
            ax.annotate(label, (x, vals[0]), textcoords="offset points", xytext=(5, 3), fontsize=7)
        if s and len(vals) > 1:  # and the mean +- sd where there are more seeds
            ax.errorbar([x], [s[0]], yerr=[s[1]], capsize=3, fmt="s" if model == DENSE else "o", color=colors[method],
                        mfc="none", alpha=0.6)
    ax.set(xlabel="parameters (thousands, train.py --dry-run)", ylabel=f"val loss at {args.seed_steps} steps",
           title="tiny: every setting, seed 0 (filled); mean +- sd of 3 seeds (hollow)")
    fig.tight_layout()
    path = os.path.join(args.results, "ablation", "val_loss_vs_params.png")
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    res = study.collected(collect, args)
    sizes = {p[0]: footprint(*p[1:5]) for p in points(res)}
    ablation, dense = report(args, res, sizes)
    if args.results == os.path.join(ROOT, "benchmarks", "results"):  # docs/why_sparse.md quotes both tables
        for name, text in (("ablation", ablation), ("dense", dense)):
            study.write_block(os.path.join(ROOT, "docs", "why_sparse.md"), f"why_sparse.py: {name}", text)
    plot(args, res, sizes)
    print(f"why_sparse: {(time.time() - t0) / 60:.1f} min")
    return res


if __name__ == "__main__":
    main()
