"""docs/reliability.md quotes the one line each bad input gets: the quoted train.py, sample.py, eval.py and
consolidation commands that need nothing but the project, the tests' small data and a tiny run are run here, and
each one's last stderr line must be the quoted one (export.py's rows need folders set up: tests/test_export.py)."""
import os
import re

import pytest

from run_script import ROOT, run_cases

pytestmark = pytest.mark.slow  # every quoted command run as a script: not in the one-minute check

DOC = os.path.join(ROOT, "docs", "reliability.md")
ROW = re.compile(r"^\| `python (train\.py|sample\.py|eval\.py|-m run\.checkpoint)( [^`]*)?` \| (error: .*) \|$")


def quoted():
    """[(script, argv, the quoted error line)] for the rows `| `python SCRIPT ARGS` | error: ... |`: a plain
    command (no environment variables, no note on the machine it needs) and a one-line error."""
    rows = []
    for line in open(DOC):
        m = ROW.match(line.strip())
        if m:
            rows.append((m.group(1), (m.group(2) or "").split(), m.group(3).replace("\\|", "|")))
    return rows


def test_the_table_is_read():
    scripts = {script for script, _, _ in quoted()}
    assert len(quoted()) >= 25 and scripts == {"train.py", "sample.py", "eval.py", "-m run.checkpoint"}


def test_quoted_train_py_lines_match_the_code(data_dir, tmp_path):
    """Each train.py row, run where nothing exists: out/... and data/stdlib name folders under tmp_path (the quoted
    paths are put back into the line before comparing), and a run without --data reads the tests' small data."""
    cases, expected = [], []
    for script, argv, line in quoted():
        if script != "train.py" or "1e30" in argv or "out/run" in argv:  # these train, or need a run at out/run:
            continue  # not run here (test_train.py and test_reliability.py check those refusals by their pattern)
        argv = [a.replace("out/", f"{tmp_path}/out/").replace("data/stdlib", data_dir).replace("data/other", data_dir)
                for a in argv]
        if "--data" not in argv:
            argv += ["--data", data_dir]
        if "--out-dir" not in argv:
            argv += ["--out-dir", str(tmp_path / "fresh")]
        cases.append(argv)
        expected.append(line)
    for (code, err, _), want in zip(run_cases("train.py", cases), expected):
        got = err.strip().splitlines()[-1].replace(f"{tmp_path}/out/", "out/").replace(data_dir, "data/stdlib")
        assert code != 0 and got == want


@pytest.mark.parametrize("script", ["sample.py", "eval.py"])
def test_quoted_reader_lines_match_the_code(tiny_run, script):
    """sample.py and eval.py rows, R being a finished tiny run."""
    rows = [(argv, line) for s, argv, line in quoted() if s == script]
    run = tiny_run("sltrain")
    results = run_cases(script, [[run if a == "R" else a for a in argv] for argv, _ in rows])
    for (code, err, _), (argv, want) in zip(results, rows):
        assert code != 0 and err.strip().splitlines()[-1].replace(run, "R") == want, argv


def test_quoted_consolidation_line_matches_the_code(tmp_path):
    (script, argv, want), = [row for row in quoted() if row[0] == "-m run.checkpoint"]
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "run.checkpoint", *[a.replace("out/", f"{tmp_path}/") for a in argv]],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].replace(f"{tmp_path}/", "out/") == want
