"""benchmarks/gpu_check.py: without CUDA it writes the environment and says so in one line; it fits its window
(plans, timeouts, a deadline), keeps every finished part on disk where $OUT says, and its report (commands
faked) says what it measured."""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402


pytestmark = pytest.mark.slow  # the check's parts as subprocesses: not in the one-minute check

def test_without_a_gpu_it_writes_the_environment_and_says_so_in_one_line(tmp_path):
    """Hidden from CUDA (any machine): the environment section under $OUT, one line on stderr, exit 1, no traceback."""
    env = {**os.environ, "OUT": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, os.path.join(gpu_check.ROOT, "benchmarks", "gpu_check.py"), "--quick"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith("gpu_check: no CUDA GPU"), out.stderr
    report = open(tmp_path / "gpu_check-no-cuda-gpu-quick.md").read()
    assert "## environment: skipped: no CUDA GPU" in report
    assert f"| torch | {torch.__version__}, built with CUDA " in report
    assert "| C compiler for Triton's helper | " in report
    assert "| one Triton kernel launch | skipped: torch sees no CUDA GPU |" in report
    assert "## GPU tests" not in report  # nothing else ran


def test_a_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--fast"])
    assert capsys.readouterr().err == "error: unrecognized arguments: --fast\n"


def test_summarize_skips_the_warm_up_interval_and_keeps_reserved_beside_allocated():
    records = [{"type": "config"}] + [{"type": "train", "tokens_per_s": t, "peak_mem_gb": m, "peak_reserved_gb": r}
                                      for t, m, r in ((10.0, 5.0, 9.0), (300.0, 7.0, 7.5), (100.0, 6.0, 8.0),
                                                      (200.0, 6.5, 7.0), (250.0, 6.0, 8.5))]
    # upper median of 300, 100, 200, 250; max of all peaks, allocated and reserved
    assert gpu_check.summarize(records) == (250.0, 7.0, 9.0)
    old = [{k: v for k, v in r.items() if k != "peak_reserved_gb"} for r in records]  # a log from before reserved
    assert gpu_check.summarize(old) == (250.0, 7.0, None)
    assert gpu_check.summarize([{"type": "config"}]) == (None, None, None)


def test_plans_fit_the_window():
    """A GPU lent for ~15 minutes, at most 10 per command: --quick within 5 minutes, the full check within 9."""
    quick, full = gpu_check.plan(quick=True), gpu_check.plan(quick=False)
    assert gpu_check.planned(quick) <= 300 and gpu_check.planned(full) <= 540
    assert gpu_check.planned(quick) == gpu_check.ENVIRONMENT_PLAN + sum(p.plan for p in quick)
    assert gpu_check.LAUNCH_TIMEOUT <= gpu_check.ENVIRONMENT_PLAN
    assert gpu_check.DEADLINE == dict(quick=300, full=540)
    assert [p.title for p in quick] == ["GPU tests", "train 60m sltrain", "train 60m sltrain, Triton route",
                                        "kernel bench", "compile report"]
    assert [p.args[:2] for p in quick[3:]] == [["benchmarks/kernel_bench.py"], ["benchmarks/compile_report.py"]]
    assert full[:len(quick)] == quick  # the full check runs the quick one's parts first, then adds its own
    assert [p.title for p in full[len(quick):]] == ["optimizer bench", "train 60m full", "7b --dry-run plan",
                                                    "train 7b sltrain, one-GPU recipe"]
    forced = [p for p in full if p.env]
    assert [(p.args[:2], p.env) for p in forced] == [(["--model", "60m"], {"SLTRAIN_ROUTE": "triton"})]


def test_the_gpu_tests_are_the_marked_ones_each_named():
    """pytest -m gpu (the `device` tests), -v lists each test's name, -rf each failure; -q would hide the names."""
    args = gpu_check.plan(quick=True)[0].args
    assert args[:2] == ["-m", "pytest"] and args[args.index("-m", 1) + 1] == "gpu"
    assert "-v" in args and "-rf" in args and "-q" not in args


def test_the_60m_runs_use_the_one_gpu_recipe():
    """The fused 8-bit update in the loop, per-layer hooks, bf16 weights (stochastic rounding), recompute."""
    runs = [p for p in gpu_check.plan(quick=False) if p.args[:2] == ["--model", "60m"]]
    assert len(runs) == 3 and all(20 <= p.steps <= 60 for p in runs if not p.env)
    for p in runs:
        flags = " ".join(p.args)
        assert "--optimizer adamw8bit" in flags and "--param-dtype bfloat16" in flags, p.title
        assert "--per-layer" in p.args and "--activation-checkpointing" in p.args, p.title
    assert [p.args[3] for p in runs] == ["sltrain", "sltrain", "full"]  # the ratios compare the same flags


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
    """Stands in for the commands, recording (args, timeout, env): the environment's kernel launch prints ok,
    train.py logs two intervals (the first is warm-up), --dry-run prints a plan, anything else its arguments."""
    def run(args, timeout, env=None):
        calls.append((args, timeout, env or {}))
        status = outcome(args)
        if args[0].endswith("triton_launch.py"):
            return status, 1.0, "ok: GPUTarget(backend='cuda', arch=90, warp_size=32), 4.2 s\n"
        if args[0] == "train.py" and "--dry-run" in args:
            plan = dict(memory_plan_gb={"weights": 6.29, "support_layout": 0.0, "total": 18.70})
            return status, 1.0, "plan text\n" + json.dumps(plan)
        if args[0] == "train.py":
            out = args[args.index("--out-dir") + 1]
            os.makedirs(out)
            rate = 1000.0 if "full" in args else 250.0 if env else 800.0
            with open(os.path.join(out, "log.jsonl"), "w") as f:
                for tok_s, peak in ((1.0, 3.0), (rate, 4.0)):
                    f.write(json.dumps(dict(type="train", tokens_per_s=tok_s, peak_mem_gb=peak,
                                            peak_reserved_gb=peak + 1)) + "\n")
            return status, 2.0, "trained"
        return status, 3.0, f"output of {args}"
    return run


@pytest.fixture
def on_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpu_check, "RESULTS", str(tmp_path))
    monkeypatch.delenv("OUT", raising=False)  # set on a lent GPU machine: the tests say where the report goes
    monkeypatch.setattr(gpu_check, "START", gpu_check.clock())  # the deadline counts from this check, not the import
    return tmp_path


def test_report_prints_the_plan_first_and_says_what_each_part_measured(on_a_gpu, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls, lambda a: "FAILED (exit 1)" if "optim" in a[0] else "ok"))
    assert gpu_check.main([]) == 1  # the optimizer bench "failed"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "gpu_check on NVIDIA H100 80GB HBM3: 10 parts, 472 s planned, deadline 540 s"
    assert printed[1].split()[:3] == ["30", "s", "environment"]  # the environment first, then each part's plan
    assert printed[2].split()[:4] == ["90", "s", "GPU", "tests"]
    assert all(not line.startswith("gpu_check: ") for line in printed[1:11]) and printed[11].startswith("gpu_check: ")
    report = open(on_a_gpu / "gpu_check-nvidia-h100-80gb-hbm3.md").read()
    assert report.startswith("# GPU check on NVIDIA H100 80GB HBM3")
    assert report.index("## environment: ok") < report.index("## GPU tests: ok")
    assert "| GPU (torch) | NVIDIA H100 80GB HBM3, sm_90 |" in report
    assert "| one Triton kernel launch | ok: GPUTarget(backend='cuda', arch=90, warp_size=32), 4.2 s |" in report
    assert "| train 60m sltrain, Triton route | `SLTRAIN_ROUTE=triton python train.py --model 60m --method " \
           "sltrain --optimizer adamw8bit --param-dtype bfloat16 --per-layer --activation-checkpointing " \
           "--max-steps 10` | 50 s |" in report
    assert "## optimizer bench: FAILED (exit 1), 3 s (planned 25 s)" in report
    assert "## train 60m full: ok, 2 s (planned 40 s)" in report and "tokens/s 1,000 (median" in report
    assert "peak memory 4.00 GB allocated, 5.00 GB reserved" in report
    assert "sltrain (auto route, dense at this micro-batch) runs at 0.80x full's tokens/s" in report
    assert "The Triton route runs at 0.31x the auto route's tokens/s (train 60m sltrain)." in report
    assert "| measured peak allocated (first 5 steps) | 4.00 |" in report  # both, beside the plan
    assert "| measured peak reserved (first 5 steps) | 5.00 |" in report and "| plan: support_layout | 0.00 |" in report
    assert "| plan: weights | 6.29 |" in report and "| plan: total | 18.70 |" in report  # every line of the plan
    assert "| optimizer bench | FAILED (exit 1) | 3 s | 25 s |" in report  # the summary
    assert re.search(r"\| environment \| ok \| \d+ s \| 30 s \|", report)  # its real seconds
    forced = [args for args, _, env in calls if env == {"SLTRAIN_ROUTE": "triton"}]  # the only env set
    assert [args[:5] for args in forced] == [["train.py", "--model", "60m", "--method", "sltrain"]]
    assert len(forced) == len([env for _, _, env in calls if env]) == 1


def test_quick_runs_its_parts_into_its_own_report(on_a_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls))
    assert gpu_check.main(["--quick"]) == 0
    assert [args[0] for args, _, _ in calls][1:] == ["-m", "train.py", "train.py", "benchmarks/kernel_bench.py",
                                                     "benchmarks/compile_report.py"]
    assert calls[0][0][0].endswith("triton_launch.py") and calls[0][1] == gpu_check.LAUNCH_TIMEOUT
    args = calls[2][0]
    assert args[1:5] == ["--model", "60m", "--method", "sltrain"] and args[args.index("--max-steps") + 1] == "30"
    assert os.listdir(on_a_gpu) == ["gpu_check-nvidia-h100-80gb-hbm3-quick.md"]


def test_the_report_goes_under_OUT_and_the_scratch_runs_outside_the_repository(on_a_gpu, monkeypatch, tmp_path):
    """On a lent GPU machine only $OUT comes back: the report goes there, and no run writes into the tree."""
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls))
    assert gpu_check.main(["--quick"]) == 0
    assert os.listdir(out) == ["gpu_check-nvidia-h100-80gb-hbm3-quick.md"]
    assert "## Summary" in open(out / "gpu_check-nvidia-h100-80gb-hbm3-quick.md").read()
    assert os.listdir(on_a_gpu) == ["out"]  # nothing in RESULTS
    scratch = [args[args.index("--out-dir") + 1] for args, _, _ in calls if "--out-dir" in args]
    scratch.append(calls[0][0][0])  # the launch script
    assert len(scratch) == 3
    root = os.path.realpath(gpu_check.ROOT) + os.sep
    assert not [d for d in scratch if os.path.realpath(d).startswith(root)], scratch
    assert not [d for d in scratch if os.path.exists(os.path.dirname(d))]  # and removed


def test_no_git_is_no_crash(on_a_gpu, monkeypatch, tmp_path):
    """A copied tree on a machine without git (nor nvidia-smi, nor a compiler): commit '?', and the rest runs."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_check, "run", fake_run([]))
    assert gpu_check.main(["--quick"]) == 0
    report = open(on_a_gpu / "gpu_check-nvidia-h100-80gb-hbm3-quick.md").read()
    assert ", commit ?;" in report and "| nvidia-smi: name, driver, memory | not on PATH |" in report
    assert "| C compiler for Triton's helper | none: no $CC, gcc or clang on PATH" in report  # a finding
    assert "## compile report: ok" in report


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
    assert "## environment: ok" in report
    assert "## GPU tests: ok" in report and "output of ['-m', 'pytest', '-m', 'gpu', '-v'" in report
    assert "## train 60m sltrain, Triton route: ok" in report and "Stopped during kernel bench" in report
    assert "## kernel bench" not in report and "## compile report" not in report


def test_a_part_past_its_timeout_is_marked_and_the_rest_still_run(on_a_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(gpu_check, "run", fake_run(calls, lambda a: "TIMED OUT after 178 s" if "pytest" in a else "ok"))
    assert gpu_check.main([]) == 1
    report = open(on_a_gpu / "gpu_check-nvidia-h100-80gb-hbm3.md").read()
    assert "## GPU tests: TIMED OUT after 178 s" in report and len(calls) == 10
    assert "## train 7b sltrain, one-GPU recipe: ok" in report


@pytest.mark.parametrize("quick", [True, False])
def test_parts_that_use_their_whole_timeout_end_by_the_deadline(on_a_gpu, monkeypatch, quick):
    """The kernel launch and every part run until they are killed at their timeouts: the check still ends by
    its deadline, and each part gets at least its planned time (the plans fit the deadline)."""
    now = [gpu_check.START]
    monkeypatch.setattr(gpu_check, "clock", lambda: now[0])
    timeouts = []

    def run(args, timeout, env=None):
        timeouts.append(timeout)
        now[0] += timeout
        return f"TIMED OUT after {timeout:.0f} s", timeout, ""
    monkeypatch.setattr(gpu_check, "run", run)
    assert gpu_check.main(["--quick"] if quick else []) == 1
    deadline = gpu_check.DEADLINE["quick" if quick else "full"]
    parts = gpu_check.plan(quick)
    assert now[0] - gpu_check.START <= deadline
    assert timeouts[0] == gpu_check.LAUNCH_TIMEOUT <= gpu_check.ENVIRONMENT_PLAN  # the environment's launch
    assert timeouts[1] > parts[0].plan  # the slack goes to the first part that needs it
    assert len(timeouts) == len(parts) + 1 and all(t >= p.plan for t, p in zip(timeouts[1:], parts))
