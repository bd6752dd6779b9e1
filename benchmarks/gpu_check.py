"""
What only a GPU can show, in one command on a CUDA machine, sized for a short GPU window:

    python benchmarks/gpu_check.py --quick   # at most 5 min on one H100/H200: tests, kernels, a 60m run
    python benchmarks/gpu_check.py           # at most 9 min: and the optimizer bench, 60m full vs sltrain
                                             # (auto and Triton routes), the 7b one-GPU memory check

It prints its plan first (each part with its planned seconds), then runs the parts one after another
from the repository root. A part that fails, or runs past its timeout, is marked and the rest go on;
no part runs past the deadline (300 s, or 540 s, from the start). Each part's result is appended to
benchmarks/results/gpu_check-<device>[-quick].md and flushed to disk the moment the part ends, so a
check cut short keeps every part it finished. The training runs use the offline stdlib data (no
network) at the paper's 512 x 256 tokens per step, except 7b (16 x 256, at the paper's 32000
vocabulary); tokens/s is the median over log intervals after the first (compilation, warm-up).

The planned seconds are estimates for one H100/H200, not measurements; their basis is beside
each part in PARTS. 350m is left out: its two runs (~45 s each) do not fit beside the 7b check, and
the 60m runs already compare the methods and the routes.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

clock = time.monotonic
START = clock()  # the deadline counts from here, before torch is imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import read_log  # noqa: E402  a torn log line is named and skipped
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DEADLINE = dict(quick=300, full=540)  # seconds from the start
SEVEN_B = ["--model", "7b", "--param-dtype", "bfloat16", "--optimizer", "adamw8bit", "--per-layer",
           "--activation-checkpointing", "--batch-size", "16", "--grad-accum", "1", "--vocab-size", "32000"]
SLTRAIN_60M = ["--model", "60m", "--method", "sltrain"]


@dataclass
class Part:
    title: str
    args: list  # python's arguments; for a training run (steps > 0), train.py's flags
    plan: int  # planned seconds on one H100/H200
    quick: bool = False  # also part of --quick
    only_quick: bool = False  # part of --quick only (the full check has a larger version of it)
    steps: int = 0
    log_every: int = 1
    eval_tokens: int = 65_536
    env: dict = field(default_factory=dict)  # set for the command on top of this process's environment


PARTS = [
    # the tests that put tensors on the GPU (the `device` fixture): kernels compiled, the 8-bit update,
    # the layer, the model and the loop; on the 2-core CPU machine they are about a third of the suite
    Part("tests on the GPU", ["-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_optim.py",
                              "tests/test_sltrain.py", "tests/test_model.py", "tests/test_loop.py"], 90, quick=True,
         only_quick=True),
    # the whole suite, as written (317 tests; 549 s on the 2-core CPU machine beside a training run, about
    # 4-5 min alone): most of it is CPU work (torchrun on gloo, small runs), which 16 faster cores shorten
    Part("test suite", ["-m", "pytest", "-q"], 200),
    # 15 s on the 2-core CPU machine: ptxas and cuobjdump, no GPU involved
    Part("compile report", ["benchmarks/compile_report.py"], 20, quick=True),
    # 15 layer shapes x 12 do_bench calls of ~0.2-0.4 s (each times ms-long products), plus compiles
    Part("kernel bench", ["benchmarks/kernel_bench.py"], 60, quick=True),
    # 60m at the stdlib's 257-token vocabulary: 25M block weights, ~165 MFLOP a token, 21.6 TFLOP a
    # step; at 150-250 TFLOP/s (dim 512 is small for an H100) 0.1-0.15 s a step, the dense route a
    # little more. 50 steps ~8 s, plus ~25 s to start (imports, CUDA, the data: 3 s), eval, checkpoint.
    Part("train 60m sltrain", SLTRAIN_60M, 35, quick=True, steps=50, log_every=10),
    # 16.7M elements, 7 steps of 2 optimizers on the CPU (the PyTorch 8-bit path ~1 s a step) and 3 on the GPU
    Part("optimizer bench", ["benchmarks/optim_bench.py"], 25),
    Part("train 60m full", ["--model", "60m", "--method", "full"], 35, steps=50, log_every=10),
    # at 16,384 tokens per micro-batch auto takes the dense route. Forced to Triton, each layer and
    # micro-step launches ~110 kernels and copies (16 token chunks): ~50k a step at ~15 us, ~0.7 s a
    # step; 10 steps ~8 s, plus start-up and the kernels' compiles ~35 s
    Part("train 60m sltrain, Triton route", SLTRAIN_60M, 45, steps=10, log_every=2, env={"SLTRAIN_ROUTE": "triton"}),
    # 9 s on the 2-core CPU machine (a fake-tensor forward of the 7b model)
    Part("7b --dry-run plan", ["train.py", *SEVEN_B, "--gpus", "1", "--dry-run"], 12),
    # start-up ~60 s: the 224 supports are drawn on the CPU (66 s at one thread on the 2-core
    # machine); 5 steps of 4,096 tokens at ~8 x 6.5 GFLOP a token (recompute) ~1 s each; the
    # ~14 GB checkpoint at 1-2 GB/s ~10 s
    Part("train 7b sltrain, one-GPU recipe", SEVEN_B, 100, steps=5, eval_tokens=16_384),
]


def plan(quick):
    return [part for part in PARTS if (part.quick if quick else not part.only_quick)]


def run(args, timeout, env=None):
    """(status, seconds, output) of `python args...` in the repository root: compiled kernels, and
    SLTRAIN_ROUTE only where `env` sets it. At the timeout, or when this process is stopped, the whole
    process group goes (pytest's torchrun workers too): no orphan keeps the GPU."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SLTRAIN_ROUTE")}, **(env or {})}
    start = clock()
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text = p.communicate(timeout=timeout)[0]
        status = "ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"
    except subprocess.TimeoutExpired:
        kill_group(p)
        text, status = p.communicate()[0], f"TIMED OUT after {timeout:.0f} s"
    finally:
        kill_group(p)
    return status, clock() - start, text


def kill_group(p):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)


def stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a time limit from outside) stops the check as Ctrl-C does


def summarize(records):
    """tokens/s (median of the log intervals after the first) and peak memory (GB) of a train log."""
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        return None, None
    rates = sorted(r["tokens_per_s"] for r in (train[1:] or train))
    return rates[len(rates) // 2], max(r["peak_mem_gb"] for r in train)


def train(tmp, part, timeout):
    """train.py for part.steps steps into a scratch folder: (status, seconds, output, tokens/s, peak GB)."""
    out = os.path.join(tmp, re.sub(r"\W+", "-", part.title))
    status, secs, text = run(["train.py", *part.args, "--max-steps", str(part.steps), "--log-every",
                              str(part.log_every), "--eval-every", str(part.steps), "--eval-tokens",
                              str(part.eval_tokens), "--out-dir", out], timeout, part.env)
    log = os.path.join(out, "log.jsonl")
    records = read_log(log) if os.path.exists(log) else []
    shutil.rmtree(out, ignore_errors=True)  # the final checkpoint: ~14 GB at 7b
    return (status, secs, text, *summarize(records))


def command(part):
    env = "".join(f"{k}={v} " for k, v in part.env.items())
    if part.steps:
        return f"{env}python train.py {' '.join(part.args)} --max-steps {part.steps}"
    return f"{env}python {' '.join(part.args)}"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def append(path, lines):
    """Add lines to the report and put them on disk now: a check stopped later keeps them."""
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())


def findings(part, runs, plan_gb):
    """What a training part measured, next to what it compares with from the parts before it."""
    if part.title not in runs:
        return []
    tok_s, peak = runs[part.title]
    lines = [f"tokens/s {fmt(tok_s, ',.0f')} (median of the log intervals after the first), "
             f"peak memory {fmt(peak, '.2f')} GB (torch.cuda.max_memory_allocated)."]
    sltrain = runs.get("train 60m sltrain", (None,))[0]  # the auto route: dense at 16,384 tokens a micro-batch
    if tok_s and sltrain and part.title == "train 60m full":
        lines.append(f"sltrain (auto route, dense at this micro-batch) runs at {sltrain / tok_s:.2f}x full's tokens/s.")
    if tok_s and sltrain and part.env.get("SLTRAIN_ROUTE") == "triton":
        lines.append(f"The Triton route runs at {tok_s / sltrain:.2f}x the auto route's tokens/s (train 60m sltrain).")
    if part.title.startswith("train 7b") and plan_gb:
        lines += ["", "| 7b, one GPU | GB |", "|---|---|",
                  f"| measured peak (first {part.steps} steps) | {fmt(peak, '.2f')} |"]
        lines += [f"| plan: {name} | {gb:.2f} |" for name, gb in plan_gb.items()]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tests, the kernels and a 60m run: at most 5 minutes")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: gpu_check needs a CUDA GPU and found none: it measures what a CPU machine cannot "
                 "(compiled kernels, tokens/s, peak GPU memory). Run it on a CUDA machine.")
    device, parts = torch.cuda.get_device_name(), plan(args.quick)
    deadline = DEADLINE["quick" if args.quick else "full"]
    print(f"gpu_check{' --quick' if args.quick else ''} on {device}: {len(parts)} parts, "
          f"{sum(q.plan for q in parts)} s planned, deadline {deadline} s")
    for part in parts:
        print(f"  {part.plan:4d} s  {part.title:<34} {command(part)}")
    name = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") + ("-quick" if args.quick else "")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"gpu_check-{name}.md")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    open(path, "w").close()
    append(path, [f"# GPU check on {device}", "",
                  f"`python benchmarks/gpu_check.py{' --quick' if args.quick else ''}`, {datetime.date.today()}, "
                  f"commit {commit.strip() or '?'}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
                  f"{sum(q.plan for q in parts)} s planned of a {deadline} s deadline. Each part below was "
                  f"written as it ended.", "", "| part | command | planned |", "|---|---|---|",
                  *[f"| {q.title} | `{command(q)}` | {q.plan} s |" for q in parts], ""])
    previous = signal.signal(signal.SIGTERM, stop)
    done, runs, plan_gb = [], {}, None  # done: (title, status, seconds, planned)
    try:
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            for i, part in enumerate(parts):
                left, later = deadline - (clock() - START), sum(q.plan for q in parts[i + 1:])
                timeout = min(left, max(part.plan, min(2 * part.plan, left - later)))  # the slack later parts leave
                print(f"gpu_check: {part.title} (planned {part.plan} s, timeout {timeout:.0f} s) ...", flush=True)
                if timeout < 5:
                    status, secs, text = "not run: past the deadline", 0.0, ""
                elif part.steps:
                    status, secs, text, tok_s, peak = train(tmp, part, timeout)
                    runs[part.title] = tok_s, peak
                else:
                    status, secs, text = run(part.args, timeout, part.env)
                    if part.title == "7b --dry-run plan" and status == "ok":
                        plan_gb = json.loads(text.strip().splitlines()[-1])["memory_plan_gb"]
                done.append((part.title, status, secs, part.plan))
                tail = "\n".join(text.rstrip().splitlines()[-150:])
                append(path, [f"## {part.title}: {status}, {secs:.0f} s (planned {part.plan} s)", "",
                              f"`{command(part)}`", "", *findings(part, runs, plan_gb), "",
                              "<details><summary>output (last 150 lines)</summary>", "", "```", tail, "```", "",
                              "</details>", ""])
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (stop): what finished is on disk already
        append(path, [f"Stopped during {part.title}, {clock() - START:.0f} s from the start."])
        sys.exit(f"gpu_check: stopped during {part.title}; {path} holds the parts that finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
    append(path, ["## Summary", "", "| part | status | wall | planned |", "|---|---|---|---|",
                  *[f"| {t} | {s} | {w:.0f} s | {pl} s |" for t, s, w, pl in done],
                  f"| all | | {clock() - START:.0f} s | {sum(q.plan for q in parts)} s |"])
    print(f"gpu_check: wrote {path}")
    return 0 if all(d[1] == "ok" for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
