"""What people do with their hands, against the real scripts in subprocesses with real signals and files:
two trainings into one --out-dir, Ctrl-C and SIGTERM (also under torchrun), a run too large for the
machine, a log with torn or merged lines, and what train.py prints. The references: the uninterrupted
run's losses (bit for bit), the OS's own lock and signal semantics, the exit statuses shells use."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from run import checkpoint
from run import memory
import train

pytestmark = pytest.mark.slow  # real scripts in subprocesses, signals, torchrun: not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AT = os.path.join(ROOT, "tests", "kill_at.py")
FLAGS = ["--model", "tiny", "--batch-size", "4", "--grad-accum", "1", "--seq-len", "64", "--eval-tokens", "1024",
         "--log-every", "1", "--device", "cpu"]  # CPU: bitwise comparisons (a GPU's atomics reorder sums)
TIMING = {"tokens_per_s", "elapsed_s", "peak_mem_gb"}


def script(*args, env=None, timeout=180, path=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, path or KILL_AT, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def losses(out_dir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in checkpoint.read_log(str(out_dir / "log.jsonl"))
            if r["type"] in ("train", "eval")]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "3", "--data", data_dir, "--out-dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_finishes_the_step_saves_and_resume_is_exact(data_dir, tmp_path, uninterrupted, sig, status):
    """The signal arrives as step 2 begins (tests/kill_at.py sends it to itself): step 2 finishes, its
    checkpoint is written (no eval falls due there), the run says so and exits 128 + the signal's
    number; --resume then ends equal to the uninterrupted run, bit for bit."""
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "3", "--data", data_dir, "--out-dir", str(tmp_path),
               env={"NANO_SLTRAIN_SIGNAL_AT": f"{sig}:2"})
    assert r.returncode == status, r.stderr[-2000:]
    assert "interrupted at step 2: checkpoint saved; continue with --resume" in r.stdout
    assert "Traceback" not in r.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2
    assert checkpoint.read_log(str(tmp_path / "log.jsonl"))[-1] == dict(type="interrupted", step=2, signal=sig)
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "3", "--data", data_dir, "--out-dir", str(tmp_path),
               "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(tmp_path) == losses(uninterrupted)


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(data_dir, tmp_path):
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "3", "--data", data_dir, "--out-dir", str(tmp_path),
               env={"NANO_SLTRAIN_SIGNAL_AT": "SIGINT:2:2"})  # two in a row
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "interrupted again: exiting now" in r.stderr
    assert not (tmp_path / "ckpt.pt").exists()  # it did not wait for step 2's checkpoint


def test_under_torchrun_every_rank_stops_after_the_same_step(data_dir, tmp_path, tmp_path_factory):
    """Only rank 1 receives SIGTERM; the request travels with the step's loss all-reduce, so both ranks
    finish step 2 and save it, and the resumed 2-rank run equals an uninterrupted 2-rank run."""
    def torchrun(out, *extra, env=None):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               KILL_AT, *FLAGS, "--batch-size", "2", "--max-steps", "4", "--eval-every", "4",
                               "--dist", "ddp", "--data", data_dir, "--out-dir", str(out), *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    reference = tmp_path_factory.mktemp("ddp-uninterrupted")
    assert torchrun(reference).returncode == 0
    r = torchrun(tmp_path, env={"NANO_SLTRAIN_SIGNAL_AT": "SIGTERM:2", "SIGNAL_RANK": "1"})
    assert r.returncode != 0 and "interrupted at step 2" in r.stdout, r.stderr[-2000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2  # rank 0 saved step 2, as rank 1
    assert torchrun(tmp_path, "--resume").returncode == 0
    assert losses(tmp_path) == losses(reference)


def test_a_second_run_into_the_same_folder_stops_and_the_lock_dies_with_its_holder(data_dir, tmp_path):
    first = subprocess.Popen([sys.executable, "train.py", *FLAGS, "--max-steps", "100000", "--data", data_dir,
                              "--out-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        log = tmp_path / "log.jsonl"
        while not (log.exists() and any(r["type"] == "train" for r in checkpoint.read_log(str(log)))):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.2)
        second = script(*FLAGS, "--max-steps", "2", "--data", data_dir, "--out-dir", str(tmp_path),
                        path=os.path.join(ROOT, "train.py"))
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr == (f"error: --out-dir {tmp_path} is in use by another train.py (PID {first.pid} on "
                                 f"{socket.gethostname()}): wait for it to finish or stop it, or pass another --out-dir\n")
        assert first.poll() is None  # the first run goes on, its log whole
        os.kill(first.pid, signal.SIGKILL)  # no cleanup at all: the kernel releases the lock
        first.wait()
    finally:
        first.kill()
    again = script(*FLAGS, "--max-steps", "2", "--data", data_dir, "--out-dir", str(tmp_path),
                   path=os.path.join(ROOT, "train.py"))
    assert "in use" not in again.stderr  # not stale: no checkpoint yet, so it simply starts
    assert again.returncode == 0, again.stderr[-2000:]


def test_torn_and_merged_log_lines_are_named_and_skipped(data_dir, tmp_path):
    """Two writers (or a kill) leave a log with a line holding two records and a torn fragment: resume,
    eval.py and sample.py name each such line once and carry on."""
    r = script(*FLAGS, "--max-steps", "2", "--eval-every", "2", "--data", data_dir, "--out-dir", str(tmp_path),
               path=os.path.join(ROOT, "train.py"))
    assert r.returncode == 0
    log = tmp_path / "log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1].rstrip("\n") + lines[2] + '{"type": "tra\n' + "".join(lines[3:]))
    for cmd in (["eval.py", "--out-dir", str(tmp_path), "--device", "cpu"],
                ["sample.py", "--out-dir", str(tmp_path), "--max-new-tokens", "4", "--device", "cpu"],
                ["train.py", *FLAGS, "--max-steps", "4", "--eval-every", "2", "--data", data_dir, "--out-dir",
                 str(tmp_path), "--resume"]):
        r = script(*cmd[1:], path=os.path.join(ROOT, cmd[0]))
        assert r.returncode == 0 and "Traceback" not in r.stderr, (cmd[0], r.stderr[-2000:])
        assert f"note: {log} line 2 is not one JSON record (torn or merged): skipped" in r.stderr, cmd[0]
    assert [r["step"] for r in checkpoint.read_log(str(log)) if r["type"] == "eval"] == [2, 4]


def test_a_run_too_large_for_the_machine_stops_before_it_starts(data_dir, tmp_path, monkeypatch, capsys):
    # the real /proc/meminfo: 65,536 sequences of 256 tokens plan ~800 GB of activations on the tiny model,
    # more than any machine this suite runs on has
    r = script("--model", "tiny", "--batch-size", "65536", "--grad-accum", "1", "--device", "cpu", "--data",
               data_dir, "--out-dir", str(tmp_path / "big"), path=os.path.join(ROOT, "train.py"), timeout=120)
    assert r.returncode == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr[-2000:]
    assert re.match(r"error: this run plans \d{3}\.\d GB of tensors per process", r.stderr), r.stderr
    assert "GB is available to this machine (MemAvailable)" in r.stderr
    for flag in ("--batch-size", "--seq-len", "--activation-checkpointing", "--param-dtype bfloat16", "--per-layer",
                 "--no-memory-check"):
        assert flag in r.stderr
    # a machine with 1 GB free: the default tiny run (0.2 GB of tensors, + 1 GB for the runtime) is refused,
    # and starts when overridden
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  2000000 kB\nMemAvailable:  1000000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    flags = ["--model", "tiny", "--max-steps", "1", "--eval-tokens", "256", "--device", "cpu", "--data", data_dir]
    with pytest.raises(SystemExit, match=r"plans 0\.2 GB of tensors per process \(\+ 1 GB for the Python and torch "
                                         r"runtime\), and 1\.0 GB is available"):
        train.main(flags + ["--out-dir", str(tmp_path / "a")])
    train.main(flags + ["--out-dir", str(tmp_path / "b"), "--no-memory-check"])
    assert (tmp_path / "b" / "ckpt.pt").exists()


def test_the_output_says_what_happened(data_dir, tmp_path):
    r = script(*FLAGS, "--max-steps", "4", "--eval-every", "2", "--stop-at-step", "2", "--data", data_dir,
               "--out-dir", str(tmp_path), path=os.path.join(ROOT, "train.py"))
    assert r.returncode == 0
    out = r.stdout.splitlines()
    assert "256 tokens per step = 1 rank(s) x 4 sequences x 1 micro-step(s) x 64 tokens; 4 steps from step 0" in r.stdout
    evals = [x for x in checkpoint.read_log(str(tmp_path / "log.jsonl")) if x["type"] == "eval"]
    assert out[-2].startswith("done: 2 steps (to step 2 of 4), 512 tokens, ") and out[-2].endswith(
        f", final val loss {evals[-1]['val_loss']:.4f}, best {evals[-1]['val_loss']:.4f} (step 2); "
        f"checkpoint: {tmp_path / 'ckpt.pt'}")
    assert out[-1] == "stopped early at step 2 of 4 (--stop-at-step): continue with --resume (and a later " \
                      "--stop-at-step, or none)"
    assert "python sample.py" not in r.stdout  # the use-the-model hints are for a finished run
    dry = script("--model", "60m", "--dry-run", "--device", "cpu", path=os.path.join(ROOT, "train.py"))
    assert "bfloat16 compute planned (a GPU run's default; on cpu this run computes in float32)" in dry.stdout
    dry = script("--model", "60m", "--dry-run", "--device", "cpu", "--dtype", "float32",
                 path=os.path.join(ROOT, "train.py"))
    assert "float32 compute on cpu" in dry.stdout
    help_text = script("--help", path=os.path.join(ROOT, "train.py")).stdout
    for text in ("tiny: 300)", "tiny: 16)", "tiny: 65,536)", "tiny: full 0.001, lowrank 0.01, sltrain 0.01",
                 "one of: cpu", "python sample.py --out-dir RUN", "python eval.py", "python export.py"):
        assert text in " ".join(help_text.split()), text


def test_after_an_interrupt_the_closing_line_names_the_step_of_the_last_eval(data_dir, tmp_path):
    """Evals at steps 2, 4; the signal as step 3 begins: the run stops at step 3, whose loss was never evaluated,
    so the closing line gives step 2's val loss as the last, at step 2 (not as a final one)."""
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "2", "--data", data_dir, "--out-dir", str(tmp_path),
               env={"NANO_SLTRAIN_SIGNAL_AT": "SIGINT:3"})
    assert r.returncode == 130, r.stderr[-2000:]
    at_2 = [x["val_loss"] for x in checkpoint.read_log(str(tmp_path / "log.jsonl")) if x["type"] == "eval"]
    done = next(line for line in r.stdout.splitlines() if line.startswith("done: 3 steps"))
    assert f", last val loss {at_2[-1]:.4f} (at step 2), best {at_2[-1]:.4f} (step 2);" in done, done
    assert "final val loss" not in done


@pytest.mark.parametrize("flags", [["--resume"], ["--data", "nowhere"], ["--vocab-size", "100"]],
                         ids=["resume-without-checkpoint", "missing-data", "small-vocab"])
def test_a_refused_start_leaves_no_new_folder(data_dir, tmp_path, flags):
    """A start refused after the folder was claimed (no checkpoint to resume, no data, a vocabulary too small)
    removes the folder it created; a folder that was there before stays, with what it held."""
    new = tmp_path / "new"
    with pytest.raises(SystemExit):
        train.main(FLAGS + ["--data", data_dir, "--out-dir", str(new / "a" / "b"), *flags])
    assert not new.exists()  # nor the parents it made on the way
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        train.main(FLAGS + ["--data", data_dir, "--out-dir", str(old), *flags])
    assert (old / "notes.txt").read_text() == "mine"


def test_a_gpu_sized_recipe_on_a_cpu_says_so_before_it_starts(capsys):
    """60m on a CPU: one note with the step's FLOPs, 6 per weight and token of every block linear (counted dense)
    and lm_head plus attention's 12 x layers x seq x dim per token (the config's shapes, counted here), and the
    CPU-sized alternative; tiny: no note."""
    from model import CONFIGS
    args = train.get_args(["--model", "60m", "--device", "cpu", "--vocab-size", "257"])
    from run import session
    session.cpu_note(args, train.build_model(args, 257), 1, print)
    note = capsys.readouterr().out
    c = CONFIGS["60m"]
    weights = c.n_layers * (4 * c.dim * c.dim + 3 * c.dim * c.ffn_dim) + c.dim * 257
    tflop = (6 * weights + 12 * c.n_layers * 256 * c.dim) * 512 * 256 / 1e12
    assert note.startswith("note: one step of --model 60m on this CPU takes about ") and note.count("\n") == 1
    assert f"({tflop:.1f} TFLOP at the " in note and "--model tiny trains in minutes" in note
    tiny = train.get_args(["--model", "tiny", "--device", "cpu"])
    session.cpu_note(tiny, train.build_model(tiny, 257), 1, print)
    assert capsys.readouterr().out == ""


def test_the_parameter_count_names_its_vocabulary():
    """60m at the offline data's 257 tokens has 11.03M parameters; the README's table (the paper's) counts 43.53M
    at 32000: the start line says both. tiny's table counts at 257: no second figure."""
    args = train.get_args(["--model", "60m", "--vocab-size", "257"])
    assert train.parameters(args, train.build_model(args, 257)) == (
        "11.03M parameters (11.03M trainable) at the data's vocabulary of 257 (43.53M at the 32000 the README's table "
        "counts with)")
    tiny = train.get_args(["--model", "tiny", "--vocab-size", "257"])
    assert train.parameters(tiny, train.build_model(tiny, 257)) == "0.40M parameters (0.40M trainable), vocab 257"


def test_dry_run_sizes_are_in_mb_below_a_gb(data_dir):
    """The tiny model's paper estimate is 2.61 MB (the README's table; 0.00 GB would say nothing), and the plan's
    total says it is this run's plan, the figure the memory check uses."""
    r = script("--model", "tiny", "--dry-run", "--data", data_dir, path=os.path.join(ROOT, "train.py"))
    assert "the paper's memory estimate (bf16 weights + bf16 Adam moments + int64 indices; the README table's): " \
           "2.61 MB" in r.stdout, r.stdout
    total = next(line for line in r.stdout.splitlines() if line.strip().startswith("total"))
    assert re.search(r"\d+\.\d\d MB  this run's plan: what the memory check compares with the free memory", total)


@pytest.mark.parametrize("code", ["ENOLCK", "ENOSYS", "EOPNOTSUPP"])
def test_a_filesystem_without_locks_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys, code):
    """flock on NFS without lockd fails with ENOLCK, on Lustre mounted noflock with ENOSYS: one warning line, the
    lock file still names the holder (PID and host), and the run is not refused. Any other error still raises."""
    import errno
    import fcntl

    def no_locks(f, op):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    try:
        assert checkpoint.lock(str(tmp_path)) is None
        err = capsys.readouterr().err
        name = errno.errorcode[getattr(errno, code)]  # Linux names EOPNOTSUPP's number ENOTSUP
        assert err.startswith(f"warning: --out-dir {tmp_path} is on a filesystem without file locks ({name})")
        assert err.count("\n") == 1
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} on {socket.gethostname()}"
        monkeypatch.setattr(fcntl, "flock", lambda f, op: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(OSError):
            checkpoint.lock(str(tmp_path))
    finally:
        checkpoint.unlock()


def test_two_sigterms_together_are_one_request_the_step_finishes_and_saves(data_dir, tmp_path, uninterrupted):
    """Slurm signals every process of a job step and torchrun forwards its own SIGTERM too: two SIGTERMs back to
    back (tests/kill_at.py sends both as step 2 begins) still let step 2 finish and save, and --resume then ends
    equal to the uninterrupted run, bit for bit. (Two Ctrl-Cs quit at once: the test above.)"""
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "3", "--data", data_dir, "--out-dir", str(tmp_path),
               env={"NANO_SLTRAIN_SIGNAL_AT": "SIGTERM:2:2"})
    assert r.returncode == 143, r.stderr[-2000:]
    assert "interrupted at step 2: checkpoint saved; continue with --resume" in r.stdout
    assert "interrupted again" not in r.stderr and "Traceback" not in r.stderr
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2
    r = script(*FLAGS, "--max-steps", "6", "--eval-every", "3", "--data", data_dir, "--out-dir", str(tmp_path),
               "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(tmp_path) == losses(uninterrupted)


def test_ctrl_c_before_the_loop_leaves_no_new_folder(data_dir, tmp_path, monkeypatch):
    """A Ctrl-C while the model is built (a 60m on a CPU takes a while) stops the start: no folder is left behind."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build_optimizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.main(FLAGS + ["--data", data_dir, "--out-dir", str(tmp_path / "new" / "run")])
    assert not (tmp_path / "new").exists()
