"""
What only a GPU can show, in one command on a CUDA machine, sized for a short GPU window (about 15 minutes
with the machine's start-up, at most 10 a command):

    python benchmarks/gpu_check.py --quick   # at most 5 min on one H100/H200: the environment, the GPU tests,
                                             # two 60m runs (auto and Triton routes), the kernels
    python benchmarks/gpu_check.py           # at most 9 min: and the optimizer bench, 60m full (for sltrain's
                                             # tokens/s ratio), the 7b plan and its one-GPU memory check

It prints its plan first (each part with its planned seconds), then runs the parts one after another from the
repository root, those that teach most per second first. The environment always comes first, in seconds: the
GPU and its driver, the CUDA torch was built with, torch and triton, the C compiler Triton builds its launcher
helper with at the first launch, and one trivial Triton kernel launched in a subprocess. Without a CUDA GPU the
check writes that section, says in one line that there is no GPU, and exits 1.

A part that fails, or runs past its timeout, is marked and the rest go on; no part runs past the deadline (300 s,
or 540 s, from the start). Each part's result is appended to $OUT/gpu_check-<device>[-quick].md
(benchmarks/results/ when OUT is not set) and flushed to disk the moment the part ends, so a check cut short
keeps every part it finished. The training runs write into a temporary folder outside the repository, use the
offline stdlib data (no network) at the paper's 512 x 256 tokens per step, except 7b (16 x 256, at the paper's
32000 vocabulary), and the one-GPU memory recipe (8-bit AdamW, bf16 weights, per-layer updates, activation
checkpointing): the 60m runs exercise the fused 8-bit update inside backward, bf16 stochastic rounding and
recompute. tokens/s is the median over log intervals after the first (compilation, warm-up); peak memory is
both allocated and reserved (the memory check holds the plan against mem_get_info, which reserved memory fills).

The planned seconds are estimates for one H100/H200, not measurements; their basis is beside each part in
PARTS. 350m is left out: its runs (~45 s each) do not fit beside the 7b check, and the 60m runs already compare
the methods and the routes.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass, field

clock = time.monotonic
START = clock()  # the deadline counts from here, before torch is imported

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from run.checkpoint import read_log  # noqa: E402  a torn log line is named and skipped
RESULTS = os.path.join(ROOT, "benchmarks", "results")  # the report's folder when OUT is not set
DEADLINE = dict(quick=300, full=540)  # seconds from the start
ONE_GPU = ["--optimizer", "adamw8bit", "--param-dtype", "bfloat16", "--per-layer", "--activation-checkpointing"]
SLTRAIN_60M = ["--model", "60m", "--method", "sltrain", *ONE_GPU]
SEVEN_B = ["--model", "7b", "--param-dtype", "bfloat16", "--optimizer", "adamw8bit", "--per-layer",
           "--activation-checkpointing", "--batch-size", "16", "--grad-accum", "1", "--vocab-size", "32000"]
# the environment: nvidia-smi and the compiler's --version ~1 s; the launch imports torch and triton (~5 s),
# starts CUDA (~1 s), builds Triton's cuda_utils helper with the C compiler (~2-5 s) and compiles the kernel
# with ptxas (~1 s): ~10-15 s, LAUNCH_TIMEOUT at most
ENVIRONMENT_PLAN, LAUNCH_TIMEOUT = 30, 25
LAUNCH = '''"""One trivial Triton kernel, compiled and launched: the first launch also builds Triton's helper."""
import time
start = time.time()
import torch
import triton
import triton.language as tl


@triton.jit
def add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) + tl.load(y_ptr + offs, mask=mask), mask=mask)


x = torch.rand(1000, device="cuda")
y = torch.rand_like(x)
out = torch.empty_like(x)
add[(triton.cdiv(1000, 256),)](x, y, out, 1000, BLOCK=256)
torch.cuda.synchronize()
assert torch.equal(out, x + y), "the kernel's sum differs from torch's"
print(f"ok: {triton.runtime.driver.active.get_current_target()}, {time.time() - start:.1f} s with imports and compiles")
'''


@dataclass
class Part:
    title: str
    args: list  # python's arguments; for a training run (steps > 0), train.py's flags
    plan: int  # planned seconds on one H100/H200
    quick: bool = False  # also part of --quick
    steps: int = 0
    log_every: int = 1
    eval_tokens: int = 65_536
    env: dict = field(default_factory=dict)  # set for the command on top of this process's environment
    keep: int = 150  # the output's last lines in the report


PARTS = [
    # the tests marked gpu (tests/conftest.py: each test that takes the `device` fixture): test_kernels' cases
    # against their PyTorch references, test_optim's fused 8-bit update, test_loop's runs. Each kernel
    # specialization compiles once (~1 s); collecting the suite ~10 s. -v names each test, -rf each failure.
    Part("GPU tests", ["-m", "pytest", "-m", "gpu", "-v", "-rf", "-p", "no:cacheprovider"], 90, quick=True, keep=1000),
    # 60m at the stdlib's 257-token vocabulary: 25M block weights, ~165 MFLOP a token, 21.6 TFLOP a step, ~29 with
    # recompute; at 150-250 TFLOP/s (dim 512 is small for an H100) ~0.2 s a step. 30 steps ~6 s, plus ~25 s to
    # start (imports, CUDA, the data: 3 s), ~5 s for the 8-bit update's and the rounding's compiles, eval, checkpoint.
    Part("train 60m sltrain", SLTRAIN_60M, 45, quick=True, steps=30, log_every=5),
    # at 16,384 tokens per micro-batch auto takes the dense route. Forced to Triton, each layer and micro-step
    # launches ~110 kernels and copies (16 token chunks): ~50k a step at ~15 us, ~0.7 s, ~1 s with the recompute;
    # 10 steps ~10 s, plus start-up and the kernels' compiles ~35 s
    Part("train 60m sltrain, Triton route", SLTRAIN_60M, 50, quick=True, steps=10, log_every=2,
         env={"SLTRAIN_ROUTE": "triton"}),
    # 15 layer shapes x 12 do_bench calls of ~0.2-0.4 s (each times ms-long products), plus compiles
    Part("kernel bench", ["benchmarks/kernel_bench.py"], 60, quick=True),
    # 15 s on the 2-core CPU machine: ptxas and cuobjdump, no GPU involved
    Part("compile report", ["benchmarks/compile_report.py"], 20, quick=True),
    # 16.7M elements, 7 steps of 2 optimizers on the CPU (the PyTorch 8-bit path ~1 s a step) and 3 on the GPU
    Part("optimizer bench", ["benchmarks/optim_bench.py"], 25),
    # sltrain's flags with full layers: its dense step without the rebuild of W, ~0.15 s; 30 steps ~5 s, plus
    # start-up and the 8-bit compiles ~30 s
    Part("train 60m full", ["--model", "60m", "--method", "full", *ONE_GPU], 40, steps=30, log_every=5),
    # 9 s on the 2-core CPU machine (a fake-tensor forward of the 7b model)
    Part("7b --dry-run plan", ["train.py", *SEVEN_B, "--gpus", "1", "--dry-run"], 12),
    # start-up ~60 s: the 224 supports are drawn on the CPU (66 s at one thread on the 2-core
    # machine); 5 steps of 4,096 tokens at ~8 x 6.5 GFLOP a token (recompute) ~1 s each; the
    # ~14 GB checkpoint at 1-2 GB/s ~10 s
    Part("train 7b sltrain, one-GPU recipe", SEVEN_B, 100, steps=5, eval_tokens=16_384),
]


def plan(quick):
    return [part for part in PARTS if part.quick or not quick]


def planned(parts):
    """The check's planned seconds: the environment, then the parts."""
    return ENVIRONMENT_PLAN + sum(part.plan for part in parts)


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


# -----------------------------------------------------------------------------
# the environment: what decides whether anything else can run


def probe(cmd, timeout=10):
    """What a command prints (its lines joined by "; "), or why it printed nothing: a missing tool is a finding."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return f"{cmd[0]}: not found"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]}: {type(e).__name__}: {e}"
    lines = [line.strip() for line in (out.stdout if out.returncode == 0 else out.stderr).splitlines() if line.strip()]
    return "; ".join(lines) if out.returncode == 0 else f"failed (exit {out.returncode}): {'; '.join(lines[:3])}"


def guarded(f):
    """f()'s text, or its error's: one row of the environment never stops the check."""
    try:
        return str(f())
    except Exception as e:  # noqa: BLE001  whatever it is, it is the finding
        return f"error: {type(e).__name__}: {e}"


def cuda_available():
    """(torch.cuda.is_available(), its warnings' text): a CUDA build on too old a driver says why only there."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    return available, " ".join(str(w.message).replace("\n", " ") for w in caught)


def compiler():
    """The C compiler Triton's first launch builds its cuda_utils helper with (triton/runtime/build.py: $CC, else
    gcc, else clang), and its version."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return "none: no $CC, gcc or clang on PATH (Triton's first launch cannot build its helper)"
    how = "$CC" if os.environ.get("CC") else "on PATH"
    return f"{cc} ({how}): {probe([cc, '--version'], timeout=5).split('; ')[0]}"


def python_h():
    """Where the helper's build looks for Python.h (build.py: the posix_prefix scheme for Debian's posix_local)."""
    scheme = sysconfig.get_default_scheme()
    path = os.path.join(sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"],
                        "Python.h")
    return f"{path}: {'present' if os.path.exists(path) else 'MISSING (install the Python headers)'}"


def version(package):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package)
    return "not installed"


def environment(cuda, warned, tmp):
    """(status, seconds, report lines) of the environment; the kernel launch only where torch sees a GPU."""
    start = clock()
    gpu = (guarded(lambda: "{}, sm_{}{}".format(torch.cuda.get_device_name(), *torch.cuda.get_device_capability()))
           if cuda else f"none: torch.cuda.is_available() is False{'; ' + warned if warned else ''}")
    smi = (probe(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
           if shutil.which("nvidia-smi") else "not on PATH")
    rows = [("GPU (torch)", gpu), ("nvidia-smi: name, driver, memory", smi),
            ("torch", f"{torch.__version__}, built with CUDA {torch.version.cuda or 'none (a CPU build)'}"),
            ("triton", version("triton")), ("C compiler for Triton's helper", guarded(compiler)),
            ("Python.h for the helper", guarded(python_h))]
    text = ""
    if cuda:
        script = os.path.join(tmp, "triton_launch.py")
        with open(script, "w") as f:
            f.write(LAUNCH)
        status, _, text = run([script], LAUNCH_TIMEOUT)
        last = text.strip().splitlines()[-1] if text.strip() else "no output"
        rows.append(("one Triton kernel launch", last if status == "ok" else f"{status}: {last}"))
    else:
        status = "skipped: no CUDA GPU"
        rows.append(("one Triton kernel launch", "skipped: torch sees no CUDA GPU"))
    secs = clock() - start
    lines = [f"## environment: {status}, {secs:.0f} s (planned {ENVIRONMENT_PLAN} s)", "", "| what | found |",
             "|---|---|", *[f"| {what} | {found.replace('|', '/')} |" for what, found in rows], ""]
    if status not in ("ok", "skipped: no CUDA GPU"):
        tail = "\n".join(text.rstrip().splitlines()[-60:])
        lines += ["The launch's output (last 60 lines):", "", "```", tail, "```", ""]
    return status, secs, lines


# -----------------------------------------------------------------------------
# the parts and the report


def summarize(records):
    """tokens/s (median of the log intervals after the first), peak memory allocated and reserved (GB; reserved
    None where the log has none) of a train log."""
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        return None, None, None
    rates = sorted(r["tokens_per_s"] for r in (train[1:] or train))
    reserved = [r["peak_reserved_gb"] for r in train if r.get("peak_reserved_gb") is not None]
    return rates[len(rates) // 2], max(r["peak_mem_gb"] for r in train), max(reserved, default=None)


def train(tmp, part, timeout):
    """train.py for part.steps steps into a scratch folder: (status, seconds, output, (tokens/s, allocated,
    reserved))."""
    out = os.path.join(tmp, re.sub(r"\W+", "-", part.title))
    status, secs, text = run(["train.py", *part.args, "--max-steps", str(part.steps), "--log-every",
                              str(part.log_every), "--eval-every", str(part.steps), "--eval-tokens",
                              str(part.eval_tokens), "--out-dir", out], timeout, part.env)
    log = os.path.join(out, "log.jsonl")
    records = read_log(log) if os.path.exists(log) else []
    shutil.rmtree(out, ignore_errors=True)  # the final checkpoint: ~14 GB at 7b
    return status, secs, text, summarize(records)


def memory_plan(text):
    """The dry run's memory plan (GB by line) from its last output line, or None."""
    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
        return json.loads(text.strip().splitlines()[-1])["memory_plan_gb"]
    return None


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
    tok_s, allocated, reserved = runs[part.title]
    lines = [f"tokens/s {fmt(tok_s, ',.0f')} (median of the log intervals after the first), peak memory "
             f"{fmt(allocated, '.2f')} GB allocated, {fmt(reserved, '.2f')} GB reserved "
             f"(torch.cuda.max_memory_allocated, max_memory_reserved; '-': not in the log)."]
    sltrain = runs.get("train 60m sltrain", (None,))[0]  # the auto route: dense at 16,384 tokens a micro-batch
    if tok_s and sltrain and part.title == "train 60m full":
        lines.append(f"sltrain (auto route, dense at this micro-batch) runs at {sltrain / tok_s:.2f}x full's tokens/s "
                     f"(the same flags).")
    if tok_s and sltrain and part.env.get("SLTRAIN_ROUTE") == "triton":
        lines.append(f"The Triton route runs at {tok_s / sltrain:.2f}x the auto route's tokens/s (train 60m sltrain).")
    if part.title.startswith("train 7b") and plan_gb:
        lines += ["", "The memory check holds the plan's total against torch.cuda.mem_get_info's free memory, which "
                  "the allocator's reserved memory fills: compare the plan with reserved.", "",
                  "| 7b, one GPU | GB |", "|---|---|",
                  f"| measured peak allocated (first {part.steps} steps) | {fmt(allocated, '.2f')} |",
                  f"| measured peak reserved (first {part.steps} steps) | {fmt(reserved, '.2f')} |"]
        lines += [f"| plan: {name} | {gb:.2f} |" for name, gb in plan_gb.items()]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the environment, the GPU tests, 60m runs and the kernels: "
                   "at most 5 minutes")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    cuda, warned = cuda_available()
    device = guarded(torch.cuda.get_device_name) if cuda else "no CUDA GPU"
    parts, deadline = plan(args.quick), DEADLINE["quick" if args.quick else "full"]
    flag = " --quick" if args.quick else ""
    if cuda:  # without a GPU only the one line at the end: nothing else would run
        print(f"gpu_check{flag} on {device}: {len(parts) + 1} parts, {planned(parts)} s planned, deadline {deadline} s")
        print(f"  {ENVIRONMENT_PLAN:4d} s  {'environment':<34} nvidia-smi, the C compiler, one Triton kernel launch")
        for part in parts:
            print(f"  {part.plan:4d} s  {part.title:<34} {command(part)}")
    folder = os.environ.get("OUT") or RESULTS  # only $OUT outlives a lent GPU machine
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"gpu_check-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}"
                                f"{'-quick' if args.quick else ''}.md")
    try:  # no git, or no repository (a copied tree): the report says '?'
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    open(path, "w").close()
    append(path, [f"# GPU check on {device}", "",
                  f"`python benchmarks/gpu_check.py{flag}`, {datetime.date.today()}, commit {commit or '?'}; "
                  f"{planned(parts)} s planned of a {deadline} s deadline. Each part below was written as it ended.",
                  "", "| part | command | planned |", "|---|---|---|",
                  f"| environment | nvidia-smi, the C compiler, one Triton kernel launch | {ENVIRONMENT_PLAN} s |",
                  *[f"| {q.title} | `{command(q)}` | {q.plan} s |" for q in parts], ""])
    previous = signal.signal(signal.SIGTERM, stop)
    done, runs, plan_gb, current = [], {}, None, "environment"  # done: (title, status, seconds, planned)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:  # outside the repository
            if cuda:
                print(f"gpu_check: environment (planned {ENVIRONMENT_PLAN} s) ...", flush=True)
            status, secs, lines = environment(cuda, warned, tmp)
            done.append(("environment", status, secs, ENVIRONMENT_PLAN))
            append(path, lines)
            if not cuda:
                append(path, ["No CUDA GPU: the other parts need one and did not run."])
                sys.exit(f"gpu_check: no CUDA GPU (torch.cuda.is_available() is False); the environment is in {path}")
            for i, part in enumerate(parts):
                current = part.title
                left, later = deadline - (clock() - START), sum(q.plan for q in parts[i + 1:])
                timeout = min(left, max(part.plan, min(2 * part.plan, left - later)))  # the slack later parts leave
                print(f"gpu_check: {part.title} (planned {part.plan} s, timeout {timeout:.0f} s) ...", flush=True)
                if timeout < 5:
                    status, secs, text = "not run: past the deadline", 0.0, ""
                elif part.steps:
                    status, secs, text, runs[part.title] = train(tmp, part, timeout)
                else:
                    status, secs, text = run(part.args, timeout, part.env)
                    if part.title == "7b --dry-run plan" and status == "ok":
                        plan_gb = memory_plan(text)
                done.append((part.title, status, secs, part.plan))
                tail = "\n".join(text.rstrip().splitlines()[-part.keep:])
                append(path, [f"## {part.title}: {status}, {secs:.0f} s (planned {part.plan} s)", "",
                              f"`{command(part)}`", "", *findings(part, runs, plan_gb), "",
                              f"<details><summary>output (last {part.keep} lines)</summary>", "", "```", tail, "```",
                              "", "</details>", ""])
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (stop): what finished is on disk already
        append(path, [f"Stopped during {current}, {clock() - START:.0f} s from the start."])
        sys.exit(f"gpu_check: stopped during {current}; {path} holds the parts that finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
    append(path, ["## Summary", "", "| part | status | wall | planned |", "|---|---|---|---|",
                  *[f"| {t} | {s} | {w:.0f} s | {pl} s |" for t, s, w, pl in done],
                  f"| all | | {clock() - START:.0f} s | {planned(parts)} s |"])
    print(f"gpu_check: wrote {path}")
    return 0 if all(d[1] == "ok" for d in done) else 1


if __name__ == "__main__":
    sys.exit(main())
