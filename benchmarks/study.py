"""
Does sparse plus low-rank close the gap? full / lowrank / sltrain on the tiny model, offline data, CPU.

    python benchmarks/study.py                 # the whole study: lr sweep, then 3 seeds at each best lr
    python benchmarks/study.py --plot          # the table and the PNGs from the committed logs only
    python benchmarks/study.py --longer 4800   # then full, lowrank and sltrain, seed 0, twice the tokens (~1 h)
    python benchmarks/study.py --sweep-steps 4 --seed-steps 6 --results /tmp/study   # a smoke test

1. lr sweep: each method at lr in {1e-4, 3e-4, 1e-3, 3e-3, 1e-2} (log-spaced, GaLore's range), seed 0,
   --sweep-steps steps of the tiny recipe (16 x 256 tokens); while a method's best lr is the edge of its
   grid, one more rung on that side (3e-2, 1e-1, ... or 3e-5, ...), so no best lr is a grid edge.
2. seeds: each method at its best sweep lr (lowest final val loss), seeds 0, 1, 2, --seed-steps steps.
--jobs runs go at once, each on cores/jobs threads; an odd one out runs after them on every thread. Measured
on 2 cores (medians over the committed logs): two 1-thread runs make 17.8k (full), 17.2k (lowrank), 17.3k
(sltrain) tokens/s together, one 2-thread run 15.7k, 15.6k, 16.0k, so the default is 2 (8-13% faster).
Cost there: ~3.7 min per 1-thread sweep run, ~19.5 min per 1-thread seed run, ~11 min per 2-thread seed
run: about 2 h for the whole study (README, Results).
Every run is a plain `train.py` run in its own out-dir under --runs. A finished run's log.jsonl is
copied to --results/<name>.jsonl (commit those), its config's paths inside the repository (data, out_dir,
argv) made relative to it: a run whose log is there is skipped, a finished log in its out-dir (the same
command run by hand) is copied, not rerun, and a run cut short resumes from its checkpoint, so the study
can stop and go on, on another machine too. benchmarks/why_sparse.py queues its runs the same way.
Then it prints the table (mean +- sd over seeds, the fraction of the low-rank -> full-rank gap that
sltrain closes) and, if matplotlib is installed (requirements-dev.txt; training never needs it), writes
three PNGs: val loss vs tokens (seed bands), final val loss vs lr, and the paper's Figure-1 view: memory
(train.py --dry-run's estimate) vs final val loss.

Status: run in full on the project's CPU machine, with --longer 4800; every run's log is in
benchmarks/results/study/.
"""
import argparse
import collections
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from run.checkpoint import read_log  # noqa: E402  a torn or merged log line (a kill, two writers) is named and skipped
METHODS = ("full", "lowrank", "sltrain")
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # log-spaced, two per decade
LRS = LADDER[2:7]  # the sweep: 1e-4 ... 1e-2 (GaLore's range), one rung further while the best is at an edge
SEEDS = (0, 1, 2)
VOCAB = ["--vocab-size", "257"]  # the offline data's (256 bytes and <|endoftext|>), which every run here trains on
# one train.py run: the tiny model unless `model`; rank and delta given for an ablation setting (else the size's)
# and sparse_lr_ratio for S's own lr (--sparse-lr-ratio; None: the default, 1)
Task = collections.namedtuple("Task", "method lr seed steps model rank delta sparse_lr_ratio",
                              defaults=("tiny", None, None, None))


def get_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep-steps", type=int, default=400, help="steps per lr-sweep run (default: 400)")
    p.add_argument("--seed-steps", type=int, default=2400, help="steps per seed run, ~10M tokens (default: 2400)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "study"), help="out-dirs of the runs")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "study"),
                   help="finished runs' log.jsonl, the table and the PNGs (default: benchmarks/results/study)")
    p.add_argument("--plot", action="store_true", help="only the table and plots, from the logs in --results")
    p.add_argument("--longer", type=int, default=0, metavar="STEPS", help="then each method once more, seed 0 "
                   "at their best lr for STEPS steps: does more data change their order? (default: 0, off)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, each on cores/jobs threads (default: 2, "
                   "8-13%% more tokens/s than one run at a time on 2 cores, measured)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args()
    if args.longer and args.longer <= args.seed_steps:
        p.error(f"--longer {args.longer}: must be above --seed-steps ({args.seed_steps}), or 0 (off)")
    for name in ("sweep_steps", "seed_steps", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def name_of(task):
    """full-lr0.001-seed0-steps2400; sltrain-r32-d0.1-lr0.01-seed0-steps2400; tiny-narrow-full-lr0.001-seed0-steps400;
    sltrain-lr0.01-slr0.1-seed0-steps4800"""
    model = "" if task.model == "tiny" else task.model + "-"
    setting = "" if task.rank is None else f"-r{task.rank}-d{task.delta:g}"
    sparse = "" if task.sparse_lr_ratio is None else f"-slr{task.sparse_lr_ratio:g}"
    return f"{model}{task.method}{setting}-lr{task.lr:g}{sparse}-seed{task.seed}-steps{task.steps}"


def final_val(records, steps):
    evals = [r for r in records if r.get("type") == "eval" and r.get("step") == steps]
    return evals[-1]["val_loss"] if evals else None


def say(line):
    sys.stdout.write(line + "\n")  # one write per line: runs on two threads do not split each other's lines
    sys.stdout.flush()


def relative(records):
    """The records with the config record's paths inside the repository (data, out_dir, argv) made relative to
    it, so a committed log names no machine's folders; paths outside it are kept."""
    def rel(path):
        inside = isinstance(path, str) and os.path.isabs(path) and os.path.commonpath([ROOT, path]) == ROOT
        return os.path.relpath(path, ROOT) if inside else path
    out = []
    for r in records:
        if r.get("type") == "config":
            r = dict(r, **{k: rel(r[k]) for k in ("data", "out_dir") if k in r})
            r["argv"] = [rel(a) for a in r.get("argv", [])]
        out.append(r)
    return out


def keep(args, name, records):
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in relative(records))


def run(args, task, threads=None):
    """One train.py run, skipped when its log is already in --results, copied there when its out-dir under --runs
    holds a finished log (a run queued by hand: the same command); returns its records."""
    name, (method, lr, seed, steps, model, rank, delta, sparse_lr_ratio) = name_of(task), task
    kept = os.path.join(args.results, name + ".jsonl")
    if os.path.exists(kept) and final_val(read_log(kept), steps) is not None:
        return read_log(kept)
    out = os.path.join(args.runs, name)
    log = os.path.join(out, "log.jsonl")
    if os.path.exists(log) and final_val(read_log(log), steps) is not None:
        keep(args, name, read_log(log))
        return read_log(kept)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--method", method, "--lr", str(lr),
           "--seed", str(seed), "--max-steps", str(steps), "--log-every", str(max(1, steps // 40)),
           "--eval-every", str(max(1, steps // 10)), "--out-dir", out]
    cmd += [] if rank is None else ["--rank", str(rank), "--delta", str(delta)]
    cmd += [] if sparse_lr_ratio is None else ["--sparse-lr-ratio", str(sparse_lr_ratio)]
    if os.path.exists(os.path.join(out, "ckpt.pt")):
        cmd.append("--resume")  # a run cut short goes on where its last checkpoint left it
    elif os.path.exists(out):
        shutil.rmtree(out)  # started but never checkpointed: start again
    say(f"study: {name} ...")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None  # jobs share the cores
    result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    records = read_log(os.path.join(out, "log.jsonl")) if os.path.exists(os.path.join(out, "log.jsonl")) else []
    if result.returncode != 0 and " loss is " in last:  # train.py stopped on a NaN/inf loss: the lr diverged,
        records.append(dict(type="eval", step=steps, val_loss=math.inf, diverged=last))  # a result, the worst
    elif result.returncode != 0:
        raise RuntimeError(f"{name} failed: {last}")
    say(f"study: {name}: final val loss {final_val(records, steps):.4f} ({(time.time() - t0) / 60:.1f} min)")
    keep(args, name, records)
    return read_log(kept)


def memory_gb(method):
    """The paper's estimate for the tiny model with this method (train.py --dry-run's JSON line)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--method", method,
                          "--dry-run", *VOCAB], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["est_memory_bytes"] / 1e9


def kept(args, task):
    """The records of the task's log in --results, or None."""
    path = os.path.join(args.results, name_of(task) + ".jsonl")
    return read_log(path) if os.path.exists(path) else None


def run_all(args, tasks, do_runs=True):
    """[Task] -> their records, in order (None for a log not in --results when do_runs is False). Runs go --jobs
    at a time, each on cores/jobs threads; the odd ones out after, one at a time on every thread."""
    if not do_runs:
        return [kept(args, t) for t in tasks]
    todo = [t for t in tasks if not kept(args, t) or final_val(kept(args, t), t.steps) is None]
    together = todo[:len(todo) - len(todo) % args.jobs] if args.jobs > 1 else []
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, args, t, threads=threads) for t in together]
        try:
            for f in concurrent.futures.as_completed(futures):
                f.result()
        except BaseException:  # a failed run or Ctrl-C: start nothing more
            for f in futures:
                f.cancel()
            raise
    return [run(args, t) for t in tasks]  # those done above are read back from --results


def sweep_lrs(args, keys, task_of, do_runs=True):
    """The lr sweep of each key (a method): task_of(key, lr) -> its Task at --sweep-steps. Starts on LRS and, while
    a key's best lr is its grid's edge, adds one rung on that side. -> (sweep {key: {lr: final val loss}},
    best {key: lr} for the keys whose sweep is complete)."""
    sweep, grid = {k: {} for k in keys}, {k: list(LRS) for k in keys}
    todo = [(k, lr) for k in keys for lr in LRS]
    while todo:
        for (k, lr), records in zip(todo, run_all(args, [task_of(k, lr) for k, lr in todo], do_runs)):
            if records and final_val(records, args.sweep_steps) is not None:
                v = final_val(records, args.sweep_steps)
                sweep[k][lr] = v if math.isfinite(v) else math.inf  # a diverged run is the worst, not a NaN
        todo = []
        for k in keys:
            if len(sweep[k]) < len(grid[k]):
                continue  # the sweep is not complete: no best lr yet
            best, i = min(sweep[k], key=sweep[k].get), LADDER.index(min(grid[k]))
            j = LADDER.index(max(grid[k]))
            edge = i - 1 if best == LADDER[i] and i > 0 else j + 1 if best == LADDER[j] and j + 1 < len(LADDER) else None
            if edge is not None:  # the best lr is the grid's edge: one rung further on that side
                grid[k].append(LADDER[edge])
                todo.append((k, LADDER[edge]))
    return sweep, {k: min(sweep[k], key=sweep[k].get) for k in keys if len(sweep[k]) == len(grid[k])}


def collect(args, do_runs):
    """sweep[method][lr] -> final val loss; seeds[method] -> (best lr, {seed: records});
    longer[method] -> records of the --longer run (full and sltrain, and lowrank where it is there).
    First the sweep (widened until every best lr is inside its grid), then the seeds, then --longer.
    --plot (do_runs False) reads the kept logs only, and finds --longer runs by their names."""
    sweep, best = sweep_lrs(args, METHODS, lambda m, lr: Task(m, lr, 0, args.sweep_steps), do_runs)
    if not do_runs and not args.longer:  # --plot: the longest full and sltrain seed-0 runs both have, if any
        steps = [{int(n[:-6].rsplit("steps", 1)[1]) for n in os.listdir(args.results)
                  if n.startswith(f"{m}-lr{best[m]:g}-seed0-steps") and n.endswith(".jsonl")} if m in best else set()
                 for m in ("full", "sltrain")]
        args.longer = max((n for n in steps[0] & steps[1] if n > args.seed_steps), default=0)
    tasks = [Task(m, best[m], s, args.seed_steps) for m in best for s in SEEDS]
    n_seeds = len(tasks)
    tasks += [Task(m, best[m], 0, args.longer) for m in METHODS if m in best and args.longer]
    seeds, longer = {m: (best[m], {}) for m in best}, {}
    for i, (task, records) in enumerate(zip(tasks, run_all(args, tasks, do_runs))):
        if records and final_val(records, task.steps) is not None:
            if i < n_seeds:
                seeds[task.method][1][task.seed] = records
            else:
                longer[task.method] = records
    return sweep, seeds, longer


# the 95% CI of a small sample's mean, and how a paired difference reads (REFERENCE section 12)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def ci95(values):
    """(mean, sd, low, high): the 95% CI of the mean, t with n - 1 degrees of freedom; sd and CI nan for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = T95[n - 1] * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def verdict(low, high):
    """How a difference's 95% CI reads: 'within noise' where it holds 0."""
    if math.isnan(low):
        return "one seed: no CI"
    return "within noise" if low <= 0 <= high else ("lower" if high < 0 else "higher")


def ci_text(values):
    """'mean +- sd, 95% CI [low, high], <verdict>' of a paired difference (signed)."""
    mean, sd, low, high = ci95(values)
    if math.isnan(low):
        return f"{mean:+.4f} ({verdict(low, high)})"
    return f"{mean:+.4f} +- {sd:.4f}, 95% CI [{low:+.4f}, {high:+.4f}], {verdict(low, high)}"


def mean_sd(vals):
    """(mean, sd) of the values, sd nan for one value; None when there are none or one diverged (inf)."""
    if not vals or not all(math.isfinite(v) for v in vals):
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else math.nan


def eval_named(records):
    """What the evals of a run read, from its config record."""
    config = next((r for r in records if r.get("type") == "config"), {})
    if "eval_windows" not in config:
        tokens = config.get("eval_tokens")
        return (f"the first {tokens:,} tokens of the val split, not windows spread over it (docs/data.md)"
                if tokens else "not recorded")
    return (f"{config['eval_windows']} windows of {config['seq_len']} tokens spread over the whole val split "
            f"({config['val_split_tokens']:,} tokens, {config['eval_share_read']:.0%} of it read)")


def sweep_records(args):
    """The records of one of the study's logs in --results (the first found), for what its evals read."""
    names = sorted(n for n in os.listdir(args.results) if n.endswith(".jsonl")) if os.path.isdir(args.results) else []
    return read_log(os.path.join(args.results, names[0])) if names else []


def report(args, sweep, seeds, longer):
    lrs = sorted(set(LRS).union(*(sweep[m] for m in METHODS)))
    lines = [f"Eval: {eval_named(sweep_records(args))}.", "",
             f"lr sweep ({args.sweep_steps} steps, seed 0), final val loss (- = not run):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(f"{sweep[m][lr]:.4f}" if lr in sweep[m] else "-" for lr in lrs) + " |")
    finals = {m: {seed: final_val(r, args.seed_steps) for seed, r in runs.items()} for m, (_, runs) in seeds.items()}
    lines += ["", f"{args.seed_steps} steps ({args.seed_steps * 4096 / 1e6:.1f}M tokens) at each method's best lr "
              "(- = not run yet; inf = diverged):", "", "| method | lr | " + " | ".join(f"seed {s}" for s in SEEDS) +
              " | mean +- sd |", "|---|---|" + "---|" * len(SEEDS) + "---|"]
    for m, vals in finals.items():
        stats = mean_sd(list(vals.values()))
        lines.append(f"| {m} | {seeds[m][0]:g} | " + " | ".join(f"{vals[s]:.4f}" if s in vals else "-" for s in SEEDS)
                     + " | " + (f"{stats[0]:.4f} +- {stats[1]:.4f} |" if stats else "- |"))
    both = [s for s in SEEDS if all(s in finals.get(m, {}) for m in METHODS)]  # paired by seed
    closed = [(finals["lowrank"][s] - finals["sltrain"][s]) / (finals["lowrank"][s] - finals["full"][s]) for s in both]
    if closed and mean_sd(closed):
        lines += ["", f"gap closed by sltrain, (lowrank - sltrain) / (lowrank - full), seeds {', '.join(map(str, both))}: "
                  f"{', '.join(f'{c:.2f}' for c in closed)}; mean {mean_sd(closed)[0]:.2f} +- {mean_sd(closed)[1]:.2f}"
                  + ("" if len(closed) < 2 else f", 95% CI [{ci95(closed)[2]:.2f}, {ci95(closed)[3]:.2f}]")]
    pairs = [s for s in SEEDS if all(s in finals.get(m, {}) for m in ("full", "sltrain"))]
    if pairs:
        diffs = [finals['sltrain'][s] - finals['full'][s] for s in pairs]
        lines += ["", f"sltrain - full, seeds {', '.join(map(str, pairs))}: " + ", ".join(f"{d:+.4f}" for d in diffs)
                  + (f"; mean {ci_text(diffs)}" if all(math.isfinite(d) for d in diffs) else "")]
    if "full" in longer and "sltrain" in longer:
        at = {m: {r["step"]: r["val_loss"] for r in longer[m] if r["type"] == "eval"} for m in longer}
        low = at.get("lowrank", {})

        def closed(n):  # (lowrank - sltrain) / (lowrank - full) at step n, '-' without a lowrank run
            return f"{(low[n] - at['sltrain'][n]) / (low[n] - at['full'][n]):.2f}" if n in low else "-"
        lines += ["", f"seed 0 for {args.longer} steps ({args.longer * 4096 / 1e6:.1f}M tokens), same lrs, val loss "
                  "(- = not run yet):", "", "| step | full | lowrank | sltrain | sltrain - full | gap closed |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {at['full'][n]:.4f} | {f'{low[n]:.4f}' if n in low else '-'} | {at['sltrain'][n]:.4f} | "
                  f"{at['sltrain'][n] - at['full'][n]:+.4f} | {closed(n)} |"
                  for n in sorted(set(at["full"]) & set(at["sltrain"]))]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write(text)
    return finals


def write_block(path, name, text):
    """Put text between the `<!-- NAME -->` and `<!-- /NAME -->` lines of a Markdown file (the README's headline):
    the figures there come from the logs, never typed by hand."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    page = open(path).read()
    if start not in page or end not in page:
        return False
    head, rest = page.split(start, 1)
    with open(path, "w") as f:
        f.write(head + start + "\n" + text.rstrip("\n") + "\n" + end + rest.split(end, 1)[1])
    return True


def pyplot():
    """matplotlib.pyplot drawing to files, or None (with a line saying so): only the plots need it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plots")


def plot(args, sweep, seeds, finals, longer):
    plt = pyplot()
    if plt is None:
        return
    colors = dict(full="tab:blue", lowrank="tab:orange", sltrain="tab:green")
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, (lr, runs) in seeds.items():
        if not runs:
            continue
        curves = [{r["step"]: r["val_loss"] for r in recs if r["type"] == "eval"} for recs in runs.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        mean = [statistics.mean(c[s] for c in curves) for s in steps]
        lo, hi = ([min(c[s] for c in curves) for s in steps], [max(c[s] for c in curves) for s in steps])
        tokens = [s * 4096 / 1e6 for s in steps]
        ax.plot(tokens, mean, color=colors[m], label=f"{m} (lr {lr:g})")
        ax.fill_between(tokens, lo, hi, color=colors[m], alpha=0.2)
    for m, recs in longer.items():
        evals = [r for r in recs if r["type"] == "eval"]
        ax.plot([r["step"] * 4096 / 1e6 for r in evals], [r["val_loss"] for r in evals], "--", color=colors[m],
                label=f"{m}, seed 0, {args.longer} steps")
    ax.set(xlabel="tokens (M)", ylabel="val loss", title=f"tiny, mean and range over {len(SEEDS)} seeds")
    ax.legend(), fig.tight_layout(), fig.savefig(os.path.join(args.results, "val_loss_vs_tokens.png"), dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        lrs = sorted(sweep[m])
        ax.plot(lrs, [sweep[m][lr] for lr in lrs], "o-", color=colors[m], label=m)
    ax.set(xscale="log", xlabel="lr", ylabel="final val loss", title=f"lr sweep, {args.sweep_steps} steps, seed 0")
    ax.legend(), fig.tight_layout(), fig.savefig(os.path.join(args.results, "val_loss_vs_lr.png"), dpi=100)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, vals in finals.items():
        stats = mean_sd(list(vals.values()))
        if stats:
            ax.errorbar([memory_gb(m) * 1e3], [stats[0]], yerr=[0 if math.isnan(stats[1]) else stats[1]], fmt="o",
                        color=colors[m], label=m, capsize=4)
    ax.set(xlabel="estimated memory (MB, train.py --dry-run)", ylabel="final val loss", title="memory vs loss (Figure 1 view)")
    ax.legend(), fig.tight_layout(), fig.savefig(os.path.join(args.results, "memory_vs_val_loss.png"), dpi=100)
    print(f"wrote 3 PNGs to {args.results}")


def collected(collect, args):
    """collect(args, do_runs) of a study script (runs unless --plot); a run that failed is one error line."""
    try:
        return collect(args, do_runs=not args.plot)
    except RuntimeError as e:
        sys.exit(f"error: {e}")


def main():
    args = get_args()
    t0 = time.time()
    sweep, seeds, longer = collected(collect, args)
    finals = report(args, sweep, seeds, longer)
    plot(args, sweep, seeds, finals, longer)
    print(f"study: {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
