"""run_cases(script, cases): run a top-level script (sample.py, eval.py, export.py) once per argv in
`cases`, each as `python script argv` would run it (runpy, __name__ == "__main__", sys.argv set), all in
one child process: the import of torch and the model code, most of a script's start-up, is paid once.
-> [(exit status, stderr, stdout)] per case. An exception that escapes the script comes back as its
traceback with status 1, as the interpreter would print it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = r"""
import contextlib, io, json, runpy, sys, traceback
script, cases = sys.argv[1], json.loads(sys.argv[2])
results = []
for argv in cases:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        sys.argv = [script] + argv
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # what the interpreter does with each kind of exit
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([code, err.getvalue(), out.getvalue()])
sys.__stdout__.write(json.dumps(results))
"""


def run_cases(script, cases, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, os.path.join(ROOT, script), json.dumps(cases)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return [tuple(x) for x in json.loads(r.stdout)]
