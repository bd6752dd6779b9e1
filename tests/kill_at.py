"""python tests/kill_at.py <train.py flags>: train.py, except that with NANO_SLTRAIN_KILL_AT=<point>:<n>
the process SIGKILLs itself the n-th time it reaches <point>, as a power cut or the OOM killer
would: no exception, no cleanup, no flush. With NANO_SLTRAIN_SIGNAL_AT=<SIGNAL>:<n>[:<times>] it sends
itself that signal (SIGINT as Ctrl-C does, SIGTERM as a scheduler does; <times> in a row) as its n-th
training step begins, on rank $SIGNAL_RANK only (default 0). `{rank}` in a flag becomes the process's rank (per-rank
paths under torchrun). `python tests/kill_at.py --serve` runs many (see serve). The points, each
patched in from outside so train.py stays as it is:

    batch     inside a training step, as it fetches a micro-batch (TokenData.random_batch)
    eval      inside an evaluation (train.validation_loss), after the step's train record
    log       inside a log write: the first half of the record's line is on disk
    save      inside torch.save of a checkpoint: the first half of the file is on disk
    rename    with a checkpoint (ckpt.pt or latest-sharded) complete, just before its rename
    renamed   just after that rename
"""
import io
import json
import os
import signal
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import train  # noqa: E402
from data.loader import TokenData  # noqa: E402
from run import session  # noqa: E402

point, _, nth = os.environ.get("NANO_SLTRAIN_KILL_AT", "").partition(":")
reached = 0
signal_at = os.environ.get("NANO_SLTRAIN_SIGNAL_AT", "").split(":")


def now(at):
    """True the nth time `at` (the point being reached) is the point asked for."""
    global reached
    if at == point:
        reached += 1
    return at == point and reached == int(nth)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def patch(owner, name, wrap):
    setattr(owner, name, wrap(getattr(owner, name)))


patch(TokenData, "random_batch", lambda real: lambda *a, **k: (now("batch") and die()) or real(*a, **k))
patch(train, "validation_loss", lambda real: lambda *a, **k: (now("eval") and die()) or real(*a, **k))


def save(real):
    def torn_save(obj, f, *args, **kwargs):
        if not now("save"):
            return real(obj, f, *args, **kwargs)
        whole = io.BytesIO()
        real(obj, whole, *args, **kwargs)
        f.write(whole.getvalue()[:len(whole.getvalue()) // 2])
        f.flush()
        die()
    return torn_save


def replace(real):
    def checkpoint_rename(src, dst, *args, **kwargs):
        is_checkpoint = os.path.basename(dst) in ("ckpt.pt", "latest-sharded")
        if is_checkpoint and now("rename"):
            die()
        real(src, dst, *args, **kwargs)
        if is_checkpoint and now("renamed"):
            die()
    return checkpoint_rename


class TornLog:
    """The log file, except for the write that the kill interrupts halfway."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        if now("log"):
            self.f.write(text[:len(text) // 2])
            self.f.flush()
            die()
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def log_open(path, mode="r", *args, **kwargs):
    f = open(path, mode, *args, **kwargs)
    return TornLog(f) if os.path.basename(path) == "log.jsonl" and mode in ("a", "w") else f


def signal_self(real):
    steps = []

    def train_step(*args, **kwargs):
        steps.append(1)
        if signal_at[0] and len(steps) == int(signal_at[1]) and os.environ.get("RANK", "0") == os.environ.get(
                "SIGNAL_RANK", "0"):
            for _ in range(int(signal_at[2]) if len(signal_at) > 2 else 1):
                os.kill(os.getpid(), getattr(signal, signal_at[0]))  # handled before os.kill returns
        return real(*args, **kwargs)
    return train_step


patch(torch, "save", save)
patch(os, "replace", replace)
patch(train, "train_step", signal_self)
session.open = log_open  # run/session.py's own open() (its Log): a module global shadows the builtin



def serve():
    """Run train.py once per line of stdin, JSON [point:n or null, flags, output file], each in a
    forked child of this process, which has imported torch once (a fresh python train.py spends
    most of a short run importing), and print the child's exit code (-9: killed) for each."""
    global point, nth
    for line in sys.stdin:
        kill, argv, output = json.loads(line)
        pid = os.fork()
        if pid == 0:
            point, _, nth = (kill or "").partition(":")
            with open(output, "a") as f:  # the child's stdout and stderr
                os.dup2(f.fileno(), 1)
                os.dup2(f.fileno(), 2)
            code = 0
            try:
                train.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else print(e.code, file=sys.stderr) or 1
            except BaseException:
                code = traceback.print_exc() or 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        rank = os.environ.get("RANK", "0")
        train.main([arg.replace("{rank}", rank) for arg in sys.argv[1:]])
