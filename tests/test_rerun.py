"""benchmarks/rerun.py: a finished run's log, trained again with the command it records, gives the same final
val loss (the reference: the log of a separate train.py run); a log edited by 5% is caught; bad input is one
line with exit status 2."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RERUN = os.path.join(ROOT, "benchmarks", "rerun.py")


def rerun(*argv):
    r = subprocess.run([sys.executable, RERUN, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return r.returncode, r.stdout, r.stderr


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_a_rerun_reproduces_the_logged_final_val_loss(tiny_run, tmp_path):
    log = os.path.join(tiny_run("sltrain"), "log.jsonl")
    config, evals = records(log)[0], [r for r in records(log) if r["type"] == "eval"]
    assert os.path.basename(config["argv"][0]) == "train.py" and "--out-dir" in config["argv"]
    out = tmp_path / "again"
    code, stdout, stderr = rerun(log, "--out-dir", out, "--print")
    assert code == 0 and stdout.splitlines()[-1].startswith("python train.py --model tiny") and not out.exists()
    assert f"--out-dir {out}" in stdout and "--resume" not in stdout
    code, stdout, stderr = rerun(log, "--out-dir", out)
    assert code == 0, stderr[-2000:]
    again = [r for r in records(out / "log.jsonl") if r["type"] == "eval"]
    assert again[-1]["val_loss"] == evals[-1]["val_loss"]  # the same machine and threads: bit for bit
    assert f"log {evals[-1]['val_loss']:.4f}, rerun {evals[-1]['val_loss']:.4f} (+0.00%): reproduced within 1.0% " \
           "(bit for bit)" in stdout

    edited = tmp_path / "edited.jsonl"  # the same run, its final val loss 5% higher: not reproduced
    lines = records(log)
    lines[lines.index(evals[-1])] = dict(evals[-1], val_loss=evals[-1]["val_loss"] * 1.05)
    edited.write_text("".join(json.dumps(r) + "\n" for r in lines))
    code, stdout, stderr = rerun(edited, "--out-dir", out)  # finished there already: only compared
    assert code == 1 and "NOT reproduced within 1.0%" in stdout and "-4.76%" in stdout
    code, stdout, stderr = rerun(edited, "--out-dir", out, "--tolerance", "0.05")
    assert code == 0 and "reproduced within 5.0%" in stdout


def test_bad_input_is_one_line(tiny_run, tmp_path):
    log = os.path.join(tiny_run("sltrain"), "log.jsonl")
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_text("".join(json.dumps(r) + "\n" for r in records(log) if r["type"] != "eval"))
    not_a_log = tmp_path / "notes.jsonl"
    not_a_log.write_text(json.dumps({"type": "eval", "step": 3, "val_loss": 1.0}) + "\n")
    for argv, says in [((tmp_path / "missing.jsonl",), "no such file"),
                       ((unfinished,), "the run did not finish (no eval at step 3)"),
                       ((not_a_log,), "not a train.py log"),
                       ((log, "--tolerance", "-1"), "--tolerance -1.0: must be >= 0")]:
        code, stdout, stderr = rerun(*argv)
        assert code == 2 and stderr.startswith("error: ") and says in stderr and len(stderr.splitlines()) == 1, stderr
