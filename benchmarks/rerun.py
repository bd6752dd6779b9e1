"""
Rerun one committed result: train again with the settings its log records, and compare final val losses.

    python benchmarks/rerun.py benchmarks/results/ablation/sltrain-r32-d0.1-lr0.01-seed0-steps2400.jsonl
    python benchmarks/rerun.py LOG --print        # only the command
    python benchmarks/rerun.py RUN_DIR --out-dir runs/mine --tolerance 0.005

The command is built from the log's config record: every train.py flag at the value the run resolved (device,
dtype, batch size, lr, warmup, ... so a machine's defaults cannot change it), --out-dir set to
runs/rerun/<name> (or --out-dir), without --resume and --stop-at-step; it runs on the run's thread count
where the log records it. A rerun cut short resumes from its checkpoint, and one already finished there is only
compared; a folder holding another run is refused. The verdict compares the final val loss (the last eval at
--max-steps) of the log and of the rerun: reproduced when they differ by at most --tolerance of the log's
(default 1%; on the same machine, a CPU run repeats bit for bit). Exit status: 0 reproduced, 1 not, 2 bad
input, 3 the rerun stopped (its message above), 130 Ctrl-C (run it again to resume).
"""
import argparse
import math
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]
from run.checkpoint import read_log  # noqa: E402
from train import RECIPES  # noqa: E402
from run.flags import parse_args  # noqa: E402
from study import final_val  # noqa: E402  the last eval at a step, or None

NOT_PINNED = {"help", "out_dir", "resume", "dry_run", "stop_at_step", "no_memory_check", "gpus"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="a run's folder or its log.jsonl, or a kept copy under benchmarks/results/")
    p.add_argument("--out-dir", help="where the rerun trains (default: runs/rerun/<the log's name>)")
    p.add_argument("--tolerance", type=float, default=0.01, help="largest relative difference of the final val "
                   "loss that counts as reproduced (default: 0.01)")
    p.add_argument("--print", action="store_true", help="print the command and stop")
    p.error = lambda message: p.exit(2, f"error: {message}\n")
    args = p.parse_args(argv)
    if not 0 <= args.tolerance < math.inf:
        p.error(f"--tolerance {args.tolerance}: must be >= 0")
    if os.path.isdir(args.log):
        args.log = os.path.join(args.log, "log.jsonl")
    if not os.path.isfile(args.log):
        p.error(f"{args.log}: no such file (pass a run's folder or a log .jsonl)")
    return args, p.error


def settings(config):
    """train.py's flags at the values a config record resolved, in --help's order (no --out-dir)."""
    flags = []
    for action in parse_args([], RECIPES)[0]._actions:
        value = config.get(action.dest)
        if action.dest in NOT_PINNED or value is None or value is False:
            continue
        if action.nargs == 0:  # a switch (--per-layer, --compile, ...)
            flags.append(action.option_strings[0])
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            flags += [action.option_strings[0], str(value)]
        else:
            raise ValueError(f"its {action.dest} is {value!r}")
    return flags


def main(argv=None):
    args, error = get_args(argv)
    records = read_log(args.log)
    if not records or records[0].get("type") != "config" or "max_steps" not in records[0]:
        error(f"{args.log}: not a train.py log (its first record is not a config record)")
    steps = records[0]["max_steps"]  # the rerun's too: its settings are the log's
    want = final_val(records, steps)
    if want is None:
        error(f"{args.log}: the run did not finish (no eval at step {steps})")
    if not (isinstance(want, (int, float)) and 0 < want < math.inf):
        error(f"{args.log}: its final val loss is {want!r} (diverged?): nothing to compare")
    try:
        flags = settings(records[0])
        resumed = [r for r in records[1:] if r.get("type") == "config" and settings(r) != flags]
        ranks = int(records[0].get("world_size") or 1)
    except (ValueError, TypeError) as e:
        error(f"{args.log}: {e}")
    if resumed:
        error(f"{args.log}: the run was resumed with other settings: rerun.py reruns runs of one schedule")
    name = os.path.splitext(os.path.basename(args.log))[0]
    if name == "log":  # a run folder's own log: name it after its folder
        name = os.path.basename(os.path.dirname(os.path.abspath(args.log)))
    out_dir = os.path.abspath(args.out_dir or os.path.join(ROOT, "runs", "rerun", name))
    if out_dir == os.path.dirname(os.path.abspath(args.log)):
        error(f"--out-dir {out_dir}: that is the log's own run: pass another folder")
    log = os.path.join(out_dir, "log.jsonl")
    there = read_log(log) if os.path.isfile(log) else []
    try:
        other = there and (there[0].get("type") != "config" or settings(there[0]) != flags)
    except (ValueError, TypeError):
        other = True
    if other:
        error(f"{out_dir} holds another run: pass another --out-dir")
    if os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not there:
        error(f"{out_dir} holds a checkpoint but no log of this run: pass another --out-dir")
    done = bool(there) and final_val(there, steps) is not None
    resume = bool(there) and not done and os.path.exists(os.path.join(out_dir, "ckpt.pt"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out-dir", out_dir] + ["--resume"] * resume
    threads = records[0].get("threads")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    shown = " ".join(shlex.quote(os.path.relpath(a, ROOT) if a.startswith(ROOT + os.sep) else a) for a in cmd[1:])
    shown = f"{'OMP_NUM_THREADS=%d ' % threads if threads else ''}python {shown}"
    if ranks > 1:
        shown = f"torchrun --standalone --nproc-per-node {ranks} " + shown.split("python ", 1)[1]
    print(("" if os.getcwd() == ROOT else f"cd {shlex.quote(ROOT)} && ") + shown, flush=True)
    if args.print:
        return 0
    if ranks > 1:
        error(f"{args.log}: the run trained on {ranks} ranks: run the command above (torchrun) and compare by hand")
    if not done:
        child = subprocess.Popen(cmd, cwd=ROOT, env=env)
        stopped = False
        while True:
            try:
                code = child.wait()
                break
            except KeyboardInterrupt:  # Ctrl-C reaches train.py too: it checkpoints and stops; wait for that
                stopped = True
        if stopped:
            print(f"stopped: run this again to resume the rerun in {out_dir}", file=sys.stderr)
            return 130
        got = final_val(read_log(log), steps) if os.path.isfile(log) else None
        if code != 0 or got is None:
            print(f"error: the rerun stopped (train.py's exit status {code}) before its final eval", file=sys.stderr)
            return 3
    got = final_val(read_log(log), steps)
    diff = (got - want) / want
    ok = abs(diff) <= args.tolerance
    print(f"final val loss: log {want:.4f}, rerun {got:.4f} ({diff:+.2%}): "
          f"{'reproduced' if ok else 'NOT reproduced'} within {args.tolerance * 100:g}%"
          f"{' (bit for bit)' if got == want else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
