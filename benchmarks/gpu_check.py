"""
What only a GPU can show, in one command, on a CUDA machine:

    python benchmarks/gpu_check.py          # about 30-45 min on one H100; refuses without CUDA

From the repository root it runs, one after another (a part that fails is marked and the rest go on):
  1. the test suite (`python -m pytest -q`: kernels compiled, tensors on the GPU)
  2. `python kernels.py --compile-report` and `python kernels.py --bench`
  3. `python benchmarks/optim_bench.py`
  4. `python train.py --model 60m` for 200 steps, full and sltrain: tokens/s and peak memory
  5. `python train.py --model 350m` for 30 steps, full and sltrain: tokens/s
  6. the 7b one-GPU memory check (README: no accumulation) for 5 steps: its real peak memory next to its `--dry-run` plan
and writes everything to benchmarks/results/gpu_check-<device>.md. The training runs use the
offline stdlib data (no network) at the paper's 512 x 256 tokens per step, except 7b (16 x 256,
at the paper's 32000 vocabulary). tokens/s is the median over log intervals after the first (compilation, warm-up).
"""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SEVEN_B = ["--model", "7b", "--param-dtype", "bfloat16", "--optimizer", "adamw8bit", "--per-layer",
           "--activation-checkpointing", "--batch-size", "16", "--grad-accum", "1", "--vocab-size", "32000"]


def run(args, timeout=3600):
    """(status, seconds, stdout + stderr) of `python args...` in the repository root, compiled kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SLTRAIN_ROUTE")}
    start = time.time()
    try:
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status, text = ("ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        status, text = f"TIMED OUT after {timeout} s", (e.stdout or b"").decode() + (e.stderr or b"").decode()
    return status, time.time() - start, text


def summarize(records):
    """tokens/s (median of the log intervals after the first) and peak memory (GB) of a train log."""
    train = [r for r in records if r.get("type") == "train"]
    if not train:
        return None, None
    rates = sorted(r["tokens_per_s"] for r in (train[1:] or train))
    return rates[len(rates) // 2], max(r["peak_mem_gb"] for r in train)


def train(tmp, name, flags, steps, log_every):
    """Run train.py for `steps` steps into a scratch folder; (status, seconds, output, tokens/s, peak GB)."""
    out = os.path.join(tmp, name)
    status, secs, text = run(["train.py", *flags, "--max-steps", str(steps), "--log-every", str(log_every),
                              "--eval-every", str(steps), "--eval-tokens", "65536", "--out-dir", out])
    log = os.path.join(out, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    shutil.rmtree(out, ignore_errors=True)  # the final checkpoint: ~13 GB at 7b
    return (status, secs, text, *summarize(records))


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main():
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU and found none: it measures what a CPU machine cannot "
                 "(compiled kernels, tokens/s, peak GPU memory). Run it on a CUDA machine.")
    device = torch.cuda.get_device_name()
    parts, runs = [], {}  # parts: (title, command, status, seconds, output); runs: name -> (tokens/s, peak GB)
    for title, args in (("test suite", ["-m", "pytest", "-q"]), ("compile report", ["kernels.py", "--compile-report"]),
                        ("kernel bench", ["kernels.py", "--bench"]), ("optimizer bench", ["benchmarks/optim_bench.py"])):
        print(f"gpu_check: {title} ...", flush=True)
        parts.append((title, "python " + " ".join(args), *run(args)))
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        for name, flags, steps, log_every in (
                ("60m full", ["--model", "60m", "--method", "full"], 200, 20),
                ("60m sltrain", ["--model", "60m", "--method", "sltrain"], 200, 20),
                ("350m full", ["--model", "350m", "--method", "full"], 30, 5),
                ("350m sltrain", ["--model", "350m", "--method", "sltrain"], 30, 5),
                ("7b sltrain, one-GPU recipe", SEVEN_B, 5, 1)):
            print(f"gpu_check: train {name} ...", flush=True)
            status, secs, text, tok_s, peak = train(tmp, name.split(",")[0].replace(" ", "-"), flags, steps, log_every)
            parts.append((f"train {name}", f"python train.py {' '.join(flags)} --max-steps {steps}", status, secs, text))
            runs[name] = (tok_s, peak)
    status, secs, text = run(["train.py", *SEVEN_B, "--gpus", "1", "--dry-run"])
    parts.append(("7b --dry-run plan", f"python train.py {' '.join(SEVEN_B)} --gpus 1 --dry-run", status, secs, text))
    plan = json.loads(text.strip().splitlines()[-1]) if status == "ok" else None
    path = write_report(device, parts, runs, plan)
    print(f"gpu_check: wrote {path}")
    return 0 if all(p[2] == "ok" for p in parts) else 1


def write_report(device, parts, runs, plan):
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# GPU check on {device}", "",
             f"`python benchmarks/gpu_check.py`, {datetime.date.today()}, commit {commit or '?'}, torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}.", "", "| part | command | status | wall |", "|---|---|---|---|"]
    lines += [f"| {title} | `{cmd}` | {status} | {secs:.0f} s |" for title, cmd, status, secs, _ in parts]
    lines += ["", "## Training throughput", "", "| run | tokens/s | peak memory (GB) |", "|---|---|---|"]
    lines += [f"| {name} | {fmt(tok_s, ',.0f')} | {fmt(peak, '.2f')} |" for name, (tok_s, peak) in runs.items()]
    for size in ("60m", "350m"):
        full, sl = runs.get(f"{size} full", (None,))[0], runs.get(f"{size} sltrain", (None,))[0]
        if full and sl:
            lines.append(f"\n{size}: sltrain runs at {sl / full:.2f}x full's tokens/s.")
    if plan:  # the plan's lines for the same flags: weights, gradients, ..., total
        measured = runs.get("7b sltrain, one-GPU recipe", (None, None))[1]
        lines += ["", "## 7b on one GPU: measured peak vs the --dry-run plan", "", "| | GB |", "|---|---|",
                  f"| measured peak (torch.cuda.max_memory_allocated, first 5 steps) | {fmt(measured, '.2f')} |"]
        lines += [f"| plan: {name} | {gb:.2f} |" for name, gb in plan["memory_plan_gb"].items()]
    lines += ["", "## Outputs", ""]
    for title, cmd, status, secs, text in parts:
        tail = "\n".join(text.rstrip().splitlines()[-150:])
        lines += [f"<details><summary>{title}: {status}</summary>", "", f"`{cmd}`", "", "```", tail, "```",
                  "", "</details>", ""]
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"gpu_check-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
