"""benchmarks/gpu_check.py: it refuses without CUDA, and its report (commands faked) says what it measured."""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine it would run the whole check (30+ min)")
def test_refuses_without_cuda():
    out = subprocess.run([sys.executable, os.path.join(gpu_check.ROOT, "benchmarks", "gpu_check.py")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr


def test_summarize_skips_the_warm_up_interval():
    records = [{"type": "config"}] + [{"type": "train", "tokens_per_s": t, "peak_mem_gb": m}
                                      for t, m in ((10.0, 5.0), (300.0, 7.0), (100.0, 6.0), (200.0, 6.5), (250.0, 6.0))]
    assert gpu_check.summarize(records) == (250.0, 7.0)  # upper median of 300, 100, 200, 250; max of all peaks
    assert gpu_check.summarize([{"type": "config"}]) == (None, None)


def fake_run(args, timeout=3600):
    """Stands in for the commands: train.py logs two intervals (the first is warm-up), --dry-run prints a plan."""
    if args[0] == "train.py" and "--dry-run" in args:
        plan = dict(memory_plan_gb={"weights": 6.29, "activations": 2.03, "total": 21.25})
        return "ok", 1.0, "plan text\n" + json.dumps(plan)
    if args[0] == "train.py":
        out = args[args.index("--out-dir") + 1]
        os.makedirs(out)
        rate = 1000.0 if "full" in args else 800.0
        with open(os.path.join(out, "log.jsonl"), "w") as f:
            for tok_s, peak in ((1.0, 3.0), (rate, 4.0)):
                f.write(json.dumps(dict(type="train", tokens_per_s=tok_s, peak_mem_gb=peak)) + "\n")
        return "ok", 2.0, "trained"
    return ("FAILED (exit 1)" if args[0] == "benchmarks/optim_bench.py" else "ok"), 3.0, f"output of {args}"


def test_report_names_the_device_and_puts_7b_peak_next_to_the_plan(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu_check, "run", fake_run)
    monkeypatch.setattr(gpu_check, "RESULTS", str(tmp_path))
    assert gpu_check.main() == 1  # the optimizer bench "failed"
    report = open(tmp_path / "gpu_check-nvidia-h100-80gb-hbm3.md").read()
    assert report.startswith("# GPU check on NVIDIA H100 80GB HBM3")
    assert "| optimizer bench | `python benchmarks/optim_bench.py` | FAILED (exit 1) | 3 s |" in report
    assert "| 60m full | 1,000 | 4.00 |" in report and "| 350m sltrain | 800 | 4.00 |" in report
    assert "60m: sltrain runs at 0.80x full's tokens/s." in report
    assert "| measured peak (torch.cuda.max_memory_allocated, first 5 steps) | 4.00 |" in report
    assert "| plan: weights | 6.29 |" in report and "| plan: total | 21.25 |" in report  # every line of the plan
    assert not [d for d in os.listdir(gpu_check.ROOT) if d.startswith("tmp")]  # scratch runs removed
