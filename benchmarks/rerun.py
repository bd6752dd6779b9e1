"""
Rerun one committed result: train again with the command its log records, and compare final val losses.

    python benchmarks/rerun.py benchmarks/results/ablation/sltrain-r32-d0.1-lr0.01-seed0-steps2400.jsonl
    python benchmarks/rerun.py LOG --print        # only the command
    python benchmarks/rerun.py LOG --out-dir runs/mine --tolerance 0.005

The command is the argv of the log's first config record (train.py writes it; benchmarks/study.py keeps it
relative to the repository), with --out-dir set to runs/rerun/<name> (or --out-dir) and without --resume.
A rerun cut short resumes from its checkpoint, and one already finished there is only compared. The
verdict compares the final val loss (the last eval at --max-steps) of the log and of the rerun: reproduced
when they differ by at most --tolerance of the log's (default 1%; on the same machine and thread count,
a CPU run repeats bit for bit). Exit status: 0 reproduced, 1 not, 2 bad input.
"""
import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import read_log  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="a run's log.jsonl, or a kept copy under benchmarks/results/")
    p.add_argument("--out-dir", help="where the rerun trains (default: runs/rerun/<the log's name>)")
    p.add_argument("--tolerance", type=float, default=0.01, help="largest relative difference of the final val "
                   "loss that counts as reproduced (default: 0.01)")
    p.add_argument("--print", action="store_true", help="print the command and stop")
    p.error = lambda message: p.exit(2, f"error: {message}\n")
    args = p.parse_args(argv)
    if not args.tolerance >= 0:
        p.error(f"--tolerance {args.tolerance}: must be >= 0")
    if not os.path.isfile(args.log):
        p.error(f"{args.log}: no such file")
    return args, p.error


def final_val(records):
    """The last eval at the run's --max-steps (from its config record), or None."""
    steps = records[0].get("max_steps")
    evals = [r for r in records if r.get("type") == "eval" and r.get("step") == steps]
    return evals[-1]["val_loss"] if evals else None


def command(config, out_dir):
    """The config record's argv as a command run from the repository: python train.py ..., --out-dir replaced,
    --resume dropped (a rerun starts from step 0)."""
    argv = list(config["argv"])
    if not argv or os.path.basename(argv[0]) != "train.py":
        raise ValueError(f"its argv does not run train.py: {argv[:1]}")
    out, i = [sys.executable, os.path.join(ROOT, "train.py")], 1
    while i < len(argv):
        a = argv[i]
        if a == "--out-dir":
            i += 2
            continue
        if not a.startswith("--out-dir=") and a != "--resume":
            out.append(a)
        i += 1
    return out + ["--out-dir", out_dir]


def main(argv=None):
    args, error = get_args(argv)
    records = read_log(args.log)
    if not records or records[0].get("type") != "config" or "argv" not in records[0]:
        error(f"{args.log}: not a train.py log (its first record is not a config record with argv)")
    want = final_val(records)
    if want is None:
        error(f"{args.log}: the run did not finish (no eval at step {records[0].get('max_steps')})")
    name = os.path.splitext(os.path.basename(args.log))[0]
    if name == "log":  # a run folder's own log: name it after its folder
        name = os.path.basename(os.path.dirname(os.path.abspath(args.log)))
    out_dir = os.path.abspath(args.out_dir or os.path.join(ROOT, "runs", "rerun", name))
    try:
        cmd = command(records[0], out_dir)
    except ValueError as e:
        error(f"{args.log}: {e}")
    shown = " ".join(shlex.quote(os.path.relpath(a, ROOT) if os.path.isabs(a) and a.startswith(ROOT) else a)
                     for a in ["python"] + cmd[1:])
    ranks = records[0].get("world_size") or 1
    if ranks > 1:
        shown = f"torchrun --standalone --nproc-per-node {ranks} " + shown.replace("python ", "", 1)
    print(shown, flush=True)
    if args.print:
        return 0
    if ranks > 1:
        error(f"{args.log}: the run trained on {ranks} ranks: run the command above (torchrun) and compare by hand")
    log = os.path.join(out_dir, "log.jsonl")
    done = os.path.exists(log) and read_log(log) and final_val(read_log(log)) is not None
    if not done:
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            cmd.append("--resume")  # a rerun cut short goes on where its last checkpoint left it
        child = subprocess.Popen(cmd, cwd=ROOT)
        try:
            code = child.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches train.py too: it checkpoints and stops; wait for that
            code = child.wait()
            print(f"stopped: run this again to resume the rerun in {out_dir}", file=sys.stderr)
            return 130
        if code != 0:
            print(f"error: the rerun stopped with exit status {code}; run this again to resume it", file=sys.stderr)
            return code
    got = final_val(read_log(log))
    diff = (got - want) / want
    ok = abs(diff) <= args.tolerance
    print(f"final val loss: log {want:.4f}, rerun {got:.4f} ({diff:+.2%}): "
          f"{'reproduced' if ok else 'NOT reproduced'} within {args.tolerance:.1%}"
          f"{' (bit for bit)' if got == want else ''}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
