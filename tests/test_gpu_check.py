"""benchmarks/gpu_check.py: it refuses without CUDA, fits its window (plans, timeouts, a deadline), keeps
every finished part on disk, and its report (commands faked) says what it measured."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine it would run the whole check")
def test_refuses_without_cuda():
    out = subprocess.run([sys.executable, os.path.join(gpu_check.ROOT, "benchmarks", "gpu_check.py"), "--quick"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "error: gpu_check needs a CUDA GPU" in out.stderr


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--fast"])
    assert capsys.readouterr().err == "error: unrecognized arguments: --fast\n"


def test_summarize_skips_the_warm_up_interval():
    records = [{"type": "config"}] + [{"type": "train", "tokens_per_s": t, "peak_mem_gb": m}
                                      for t, m in ((10.0, 5.0), (300.0, 7.0), (100.0, 6.0), (200.0, 6.5), (250.0, 6.0))]
    assert gpu_check.summarize(records) == (250.0, 7.0)  # upper median of 300, 100, 200, 250; max of all peaks
    assert gpu_check.summarize([{"type": "config"}]) == (None, None)


def test_plans_fit_the_window():
    """A GPU lent for ~15 minutes, at most 10 per command: --quick within 5 minutes, the full check within 9."""
    quick, full = gpu_check.plan(quick=True), gpu_check.plan(quick=False)
    assert sum(p.plan for p in quick) <= 300 and sum(p.plan for p in full) <= 540
    assert gpu_check.DEADLINE == dict(quick=300, full=540)
    assert [p.args[:2] for p in quick[:3]] == [["-m", "pytest"], ["benchmarks/compile_report.py"],
                                               ["benchmarks/kernel_bench.py"]]
    assert [(p.args[:2], 40 <= p.steps <= 60) for p in quick[3:]] == [(["--model", "60m"], True)]
    # the full check's parts hold the quick one's, its GPU tests inside the whole suite
    assert set(p.title for p in quick) - {"tests on the GPU"} < set(p.title for p in full)
    assert full[0].args == ["-m", "pytest", "-q"]
    forced = [p for p in full if p.env]
    assert [(p.args[:2], p.env) for p in forced] == [(["--model", "60m"], {"SLTRAIN_ROUTE": "triton"})]


def test_run_passes_the_route_only_where_asked(monkeypatch):
    monkeypatch.setenv("SLTRAIN_ROUTE", "dense")  # inherited: must not reach the commands
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels run compiled
    show = ["-c", "import os; print(os.environ.get('SLTRAIN_ROUTE'), os.environ.get('TRITON_INTERPRET'))"]
    assert gpu_check.run(show, timeout=60)[::2] == ("ok", "None None\n")
    assert gpu_check.run(show, timeout=60, env={"SLTRAIN_ROUTE": "triton"})[::2] == ("ok", "triton None\n")


def test_run_kills_the_whole_process_group_at_its_timeout():
    """A part past its timeout goes with everything it started (pytest's torchrun workers), its output kept."""
    child = ("import subprocess, sys, time\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
             "print('grandchild', p.pid, flush=True)\n"
             "time.sleep(120)\n")
    start = time.time()
    status, secs, text = gpu_check.run(["-c", child], timeout=3)
    assert status == "TIMED OUT after 3 s" and 3 <= secs < 30 and time.time() - start < 30
    pid = int(text.split()[1])
    time.sleep(0.5)
    state = open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] if os.path.exists(f"/proc/{pid}") else "gone"
    assert state in ("gone", "Z"), state  # killed (a zombie until its new parent reaps it)


def fake_run(calls, outcome=lambda args: "ok"):
    """Stands in for the commands, recording (args, timeout, env): train.py logs two intervals (the first
    is warm-up), --dry-run prints a plan, anything else prints its arguments."""
    def run(args, timeout, env=None):
        calls.append((args, timeout, env or {}))
        status = outcome(args)
        if args[0] == "train.py" and "--dry-run" in args:
            plan = dict(memory_plan_gb={"weights": 6.29, "support_layout": 0.0, "total": 18.70})
            return status, 1.0, "plan text\n" + json.dumps(plan)
        if args[0] == "train.py":
            out = args[args.index("--out-dir") + 1]
            os.makedirs(out)
            rate = 1000.0 if "full" in args else 250.0 if env else 800.0
            with open(os.path.join(out, "log.jsonl"), "w") as f:
                for tok_s, peak in ((1.0, 3.0), (rate, 4.0)):
                    f.write(json.dumps(dict(type="train", tokens_per_s=tok_s, peak_mem_gb=peak)) + "\n")
            return status, 2.0, "trained"
        return status, 3.0, f"output of {args}"
    return run


@pytest.fixture
def on_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(gpu_check, "RESULTS", str(tmp_path))
    return tmp_path


def test_report_prints_the_plan_first_and_says_what_each_part_measured(on_a_gpu, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls, lambda a: "FAILED (exit 1)" if "optim" in a[0] else "ok"))
    assert gpu_check.main([]) == 1  # the optimizer bench "failed"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("gpu_check on NVIDIA H100 80GB HBM3: 9 parts, 532 s planned, deadline 540 s")
    assert printed[1].split()[:2] == ["200", "s"] and "test suite" in printed[1]  # each part's plan, before any part
    assert all(not line.startswith("gpu_check: ") for line in printed[1:10])
    report = open(on_a_gpu / "gpu_check-nvidia-h100-80gb-hbm3.md").read()
    assert report.startswith("# GPU check on NVIDIA H100 80GB HBM3")
    assert "| train 60m sltrain, Triton route | `SLTRAIN_ROUTE=triton python train.py --model 60m --method " \
           "sltrain --max-steps 10` | 45 s |" in report
    assert "## optimizer bench: FAILED (exit 1), 3 s (planned 25 s)" in report
    assert "## train 60m full: ok, 2 s (planned 35 s)" in report and "tokens/s 1,000 (median" in report
    assert "sltrain (auto route, dense at this micro-batch) runs at 0.80x full's tokens/s." in report
    assert "The Triton route runs at 0.31x the auto route's tokens/s (train 60m sltrain)." in report
    assert "| measured peak (first 5 steps) | 4.00 |" in report and "| plan: support_layout | 0.00 |" in report
    assert "| plan: weights | 6.29 |" in report and "| plan: total | 18.70 |" in report  # every line of the plan
    assert "| optimizer bench | FAILED (exit 1) | 3 s | 25 s |" in report  # the summary
    forced = [args for args, _, env in calls if env == {"SLTRAIN_ROUTE": "triton"}]  # the only env set
    assert [args[:5] for args in forced] == [["train.py", "--model", "60m", "--method", "sltrain"]]
    assert len(forced) == len([env for _, _, env in calls if env]) == 1
    assert not [d for d in os.listdir(gpu_check.ROOT) if d.startswith("tmp")]  # scratch runs removed


def test_quick_runs_its_four_parts_into_its_own_report(on_a_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls))
    assert gpu_check.main(["--quick"]) == 0
    assert [args[0] for args, _, _ in calls] == ["-m", "benchmarks/compile_report.py", "benchmarks/kernel_bench.py",
                                                 "train.py"]
    args = calls[-1][0]
    assert args[1:5] == ["--model", "60m", "--method", "sltrain"] and args[args.index("--max-steps") + 1] == "50"
    assert os.listdir(on_a_gpu) == ["gpu_check-nvidia-h100-80gb-hbm3-quick.md"]


def test_a_stopped_check_keeps_every_finished_part(on_a_gpu, monkeypatch):
    """Killed from outside during the kernel bench (the window closed): the parts before it are on disk."""
    def outcome(args):
        if args[0] == "benchmarks/kernel_bench.py":
            raise KeyboardInterrupt  # what SIGTERM becomes (gpu_check.stop)
        return "ok"
    monkeypatch.setattr(gpu_check, "run", fake_run([], outcome))
    with pytest.raises(SystemExit, match="stopped during kernel bench"):
        gpu_check.main(["--quick"])
    report = open(on_a_gpu / "gpu_check-nvidia-h100-80gb-hbm3-quick.md").read()
    assert "## tests on the GPU: ok" in report and "output of ['-m', 'pytest', '-q', 'tests/test_kernels.py'" in report
    assert "## compile report: ok" in report and "Stopped during kernel bench" in report
    assert "## kernel bench" not in report


def test_a_part_past_its_timeout_is_marked_and_the_rest_still_run(on_a_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls, lambda a: "TIMED OUT after 198 s" if "pytest" in a else "ok"))
    assert gpu_check.main([]) == 1
    report = open(on_a_gpu / "gpu_check-nvidia-h100-80gb-hbm3.md").read()
    assert "## test suite: TIMED OUT after 198 s" in report and len(calls) == 9
    assert "## train 7b sltrain, one-GPU recipe: ok" in report


@pytest.mark.parametrize("quick", [True, False])
def test_parts_that_use_their_whole_timeout_end_by_the_deadline(on_a_gpu, monkeypatch, quick):
    """Every part runs until it is killed at its timeout: the check still ends by its deadline, and each
    part gets at least its planned time (the plans fit the deadline)."""
    now = [gpu_check.START]
    monkeypatch.setattr(gpu_check, "clock", lambda: now[0])
    timeouts = []

    def run(args, timeout, env=None):
        timeouts.append(timeout)
        now[0] += timeout
        return f"TIMED OUT after {timeout:.0f} s", timeout, ""
    monkeypatch.setattr(gpu_check, "run", run)
    gpu_check.main(["--quick"] if quick else [])
    deadline = gpu_check.DEADLINE["quick" if quick else "full"]
    parts = gpu_check.plan(quick)
    assert now[0] - gpu_check.START <= deadline
    assert timeouts[0] > parts[0].plan  # the slack goes to the first part that needs it
    assert len(timeouts) == len(parts) and all(t >= p.plan for t, p in zip(timeouts, parts))
