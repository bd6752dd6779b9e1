"""benchmarks/rerun.py: a finished run's log, trained again with the settings it records, gives the same final
val loss (the reference: the log of a separate train.py run); a log edited by 5% is caught; a folder holding
another run is never trained over; bad input is one line with exit status 2."""
import json
import os
import subprocess
import sys

import pytest

from run_script import run_cases

pytestmark = pytest.mark.slow  # end-to-end: a run trained again: not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RERUN = os.path.join(ROOT, "benchmarks", "rerun.py")


def rerun(*argv):
    r = subprocess.run([sys.executable, RERUN, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_a_rerun_reproduces_the_logged_final_val_loss(tiny_run, tmp_path):
    log = os.path.join(tiny_run("sltrain"), "log.jsonl")
    config, evals = records(log)[0], [r for r in records(log) if r["type"] == "eval"]
    assert os.path.basename(config["argv"][0]) == "train.py" and config["threads"] >= 1
    out = tmp_path / "again"
    code, stdout, stderr = rerun(log, "--out-dir", out)
    assert code == 0, stderr[-2000:]
    assert stdout.startswith(f"OMP_NUM_THREADS={config['threads']} python train.py --model tiny --method sltrain")
    again = [r for r in records(out / "log.jsonl") if r["type"] == "eval"]
    assert again[-1]["val_loss"] == evals[-1]["val_loss"]  # the same machine and threads: bit for bit
    v = evals[-1]["val_loss"]
    assert f"log {v:.4f}, rerun {v:.4f} (+0.00%): reproduced within 1% (bit for bit)" in stdout

    lines = records(log)  # the same run, its final val loss 5% higher: not reproduced
    lines[lines.index(evals[-1])] = dict(evals[-1], val_loss=v * 1.05)
    edited = write(tmp_path / "edited.jsonl", lines)
    code, stdout, stderr = rerun(edited, "--out-dir", out)  # finished there already: only compared
    assert code == 1 and "NOT reproduced within 1%" in stdout and "-4.76%" in stdout
    code, stdout, stderr = rerun(edited, "--out-dir", out, "--tolerance", "0.05")
    assert code == 0 and "reproduced within 5%" in stdout

    other = write(tmp_path / "other.jsonl", [dict(config, seed=1)] + lines[1:])  # another run: out is refused
    mtime = os.path.getmtime(out / "ckpt.pt")
    code, stdout, stderr = rerun(other, "--out-dir", out)
    assert code == 2 and stderr == f"error: {out} holds another run: pass another --out-dir\n"
    assert os.path.getmtime(out / "ckpt.pt") == mtime


def test_the_command_pins_what_the_run_resolved_and_bad_input_is_one_line(tiny_run, tmp_path):
    log = os.path.join(tiny_run("sltrain"), "log.jsonl")
    recs = records(log)
    config = recs[0]
    split = write(tmp_path / "split.jsonl", [dict(config, stop_at_step=2)] + recs[1:])  # run split across jobs
    resumed = write(tmp_path / "resumed.jsonl", recs + [dict(config, lr=config["lr"] / 2, resumed_from=2)])
    last = [r for r in recs if r["type"] == "eval"][-1]
    diverged = write(tmp_path / "diverged.jsonl", recs + [dict(last, val_loss=float("inf"))])
    unfinished = write(tmp_path / "unfinished.jsonl", [r for r in recs if r["type"] != "eval"])
    not_a_log = write(tmp_path / "notes.jsonl", [last])
    bad_argv = write(tmp_path / "bad.jsonl", [dict(config, seq_len=[64])] + recs[1:])
    results = run_cases("benchmarks/rerun.py", [
        [os.path.dirname(log), "--print", "--out-dir", str(tmp_path / "x")],  # a run's folder is its log
        [split, "--print"],
        [os.path.dirname(log), "--out-dir", os.path.dirname(log)],
        [str(tmp_path / "missing.jsonl")], [unfinished], [not_a_log], [diverged], [resumed], [bad_argv],
        [log, "--tolerance", "-1"]])
    (code, err, out), (code2, _, out2), *bad = results
    assert code == 0 and code2 == 0 and "--stop-at-step" not in out2 and "--resume" not in out
    for flag in ("--device cpu", "--dtype float32", f"--batch-size {config['batch_size']}", f"--lr {config['lr']}",
                 f"--warmup {config['warmup']}", f"--eval-tokens {config['eval_tokens']}", "--seed 0",
                 f"--out-dir {tmp_path / 'x'}"):  # resolved values, not a machine's defaults
        assert flag in out
    says = ["that is the log's own run", "no such file", "the run did not finish (no eval at step 3)",
            "not a train.py log", "its final val loss is inf (diverged?)", "resumed with other settings",
            "its seq_len is [64]", "--tolerance -1.0: must be >= 0"]
    assert len(bad) == len(says)
    for (code, err, out), say in zip(bad, says):
        assert code == 2 and err.startswith("error: ") and say in err and len(err.splitlines()) == 1, err
