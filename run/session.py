"""
The run around train.py's loop. You need none of this to understand SLTrain: it claims the out-dir (one
run per folder), opens or resumes the log, times the steps, prints the log lines, turns Ctrl-C or SIGTERM
into "finish this step, save, exit", and prints the closing lines.
"""
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import torch

from model import perplexity
from run import checkpoint, memory, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# starting: the folder, the log, what the run is


def claim_out_dir(args, rank):
    """Create --out-dir and take its lock (one run per folder); refuse to start over a run's checkpoint
    without --resume. -> None, or what is wrong."""
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        error = checkpoint.lock(args.out_dir) if rank == 0 else None
    except OSError as e:
        return f"--out-dir {args.out_dir}: cannot create it or its .lock ({e.strerror}): pass a folder you can write"
    if error is None and not args.resume and checkpoint.has_checkpoint(args.out_dir):
        error = (f"{args.out_dir} already holds a run with a checkpoint: continue it with --resume, or use another "
                 f"--out-dir (or delete it) to start over.")
    return error


def new_folder(path):
    """The highest folder of `path` that does not exist yet, which creating it creates first; None if it exists."""
    path, top = os.path.abspath(path), None
    while not os.path.exists(path):
        top, path = path, os.path.dirname(path)
    return top


@contextlib.contextmanager
def refusals_leave_no_folder(args, rank, created):
    """A start refused inside the block (data, memory, a checkpoint that would not resume: a SystemExit on
    every rank), or a Ctrl-C before the loop, removes the folders this run created (`created`: new_folder's,
    taken before) when --out-dir holds nothing but the lock."""
    try:
        yield
    except (SystemExit, KeyboardInterrupt):
        if created and rank == 0 and set(os.listdir(args.out_dir)) <= {".lock"}:
            checkpoint.unlock()
            shutil.rmtree(created, ignore_errors=True)
        raise


def cpu_note(args, model, world, say):
    """On a CPU, one `note:` line when a step will take more than about a minute: its FLOPs (6 per weight and
    token, forward and backward, every block linear counted dense as the dense route computes it, plus
    attention's 12 x layers x seq-len x dim) over this machine's fp32 matmul rate, measured for ~0.2 s."""
    if not args.device.startswith("cpu"):
        return
    weights = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))
    cfg = model.cfg
    flops = (6 * weights + 12 * cfg.n_layers * args.seq_len * cfg.dim) * args.batch_size * args.grad_accum * args.seq_len
    if flops < 60 * 10e9:  # under a minute even at 10 GFLOP/s: no need to measure (every tiny run, every test)
        return
    a = torch.randn(512, 512)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.2:
        a @ a
        n += 1
    rate = n * 2 * 512 ** 3 / (time.perf_counter() - t0)  # FLOP/s
    seconds = flops / rate
    if seconds > 60:
        say(f"note: one step of --model {args.model} on this CPU takes about {seconds / 60:.0f} min ({flops / 1e12:.1f} "
            f"TFLOP at the {rate / 1e9:.0f} GFLOP/s a matmul measured here): the recipes from 60m up are sized for "
            f"GPUs; on a CPU, --model tiny trains in minutes")


def start(args, raw_model, optimizer, meta, val, rank, world, say, argv=None):
    """Resume the out-dir's checkpoint (with --resume) and open its log; -> (step, log). argv: main's."""
    checkpoint.remove_stale(args.out_dir)  # what a killed run left half-written
    step = checkpoint.resume(args, raw_model, optimizer, meta) if args.resume else 0
    log = Log(args.out_dir, step if args.resume else None, rank)
    log.record(type="config", resumed_from=step if args.resume else None, **vars(args),
               **memory.paper_estimate(raw_model), build=raw_model.build, data_meta=meta, **run_info(argv),
               **val.eval_plan(args.eval_tokens, args.seq_len, world))
    tokens, stop_at = args.batch_size * args.grad_accum * args.seq_len * world, args.stop_at_step or args.max_steps
    say(f"{tokens:,} tokens per step = {world} rank(s) x {args.batch_size} sequences x {args.grad_accum} "
        f"micro-step(s) x {args.seq_len} tokens; {args.max_steps} steps from step {step}; logging to {log.path}")
    if step >= stop_at:
        say(f"note: the checkpoint is at step {step}, and this run stops at step {stop_at}: nothing to train")
    return step, log


def run_info(argv=None):
    """Where the run came from; argv: what main() parsed (None: the command line)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    argv = sys.argv if argv is None else [os.path.join(ROOT, "train.py")] + list(argv)  # main(argv): a command too
    return dict(argv=argv, commit=commit, torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())


class Log:
    """log.jsonl, one JSON record per line, by rank 0; on resume only the records the checkpoint covers stay."""

    def __init__(self, out_dir, resume_step, rank):
        self.path, self.file, self.evals = os.path.join(out_dir, "log.jsonl"), None, []
        if rank != 0:
            return
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in checkpoint.read_log(self.path) if r.get("step", 0) <= resume_step]
            checkpoint.atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))
            self.evals = [(r["step"], r["val_loss"]) for r in kept if r.get("type") == "eval"]
        self.file = open(self.path, "a" if resume_step is not None else "w")

    def record(self, **kv):
        if kv.get("type") == "eval":
            self.evals.append((kv["step"], kv["val_loss"]))
        if self.file:
            self.file.write(json.dumps(kv) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


# -----------------------------------------------------------------------------
# during the loop: the clock, the log lines, signals, a broken loss


class Clock:
    """Seconds spent in training steps (not evals or checkpoints) and the tokens they took: tokens/s, eta."""

    def __init__(self):
        self.start, self.seconds, self.tokens, self.steps, self.interval = time.time(), 0.0, 0, 0, [0.0, 0, 0, 0.0]

    def begin(self):
        self.t = time.time()

    def end(self, tokens, loss):
        seconds, (s, n, t, losses) = time.time() - self.t, self.interval
        self.seconds, self.tokens, self.steps = self.seconds + seconds, self.tokens + tokens, self.steps + 1
        self.interval = [s + seconds, n + 1, t + tokens, losses + loss]


def peak_memory_gb(device):
    """Peak memory: on a GPU what tensors held (allocated), on a CPU the process's resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KB -> GB (process RSS)


def peak_reserved_gb(device):
    """On a GPU, the peak the caching allocator reserved (what mem_get_info sees as used); None on a CPU."""
    return torch.cuda.max_memory_reserved() / 1e9 if device.startswith("cuda") else None


def log_step(step, loss, lr, optimizer, clock, args, log, say):
    seconds, steps, tokens, losses = clock.interval
    tok_s, eta = tokens / seconds, (args.max_steps - step) * seconds / steps
    mem = peak_memory_gb(args.device)
    skipped = getattr(optimizer, "skipped", 0)  # AdamW8bit: tensor updates skipped for NaN/Inf gradients
    say(f"step {step:>6}/{args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
        f"peak mem {mem:.2f} GB | eta {eta / 60:.1f} min" + (f" | skipped {skipped}" if skipped else ""))
    reserved = peak_reserved_gb(args.device)
    log.record(type="train", step=step, loss=loss, loss_mean=losses / steps, steps_in_mean=steps, lr=lr,
               tokens_per_s=tok_s, peak_mem_gb=mem, **({} if reserved is None else {"peak_reserved_gb": reserved}),
               skipped_updates=skipped, elapsed_s=time.time() - clock.start)
    clock.interval = [0.0, 0, 0, 0.0]


def log_eval(step, val_loss, norms, args, log, say):
    stop_if_not_finite(val_loss, "val", step, args, log.record)
    say(f"eval step {step}: val loss {val_loss:.4f} | val ppl {perplexity(val_loss):.2f}")
    log.record(type="eval", step=step, val_loss=val_loss, val_ppl=perplexity(val_loss),
               **({"norms_S_BA": norms} if norms else {}))


def stop_if_not_finite(loss, split, step, args, record):
    """A NaN/Inf loss means the weights (or this batch) are broken: stop without writing a
    checkpoint, so the last good one is never overwritten."""
    if math.isfinite(loss):
        return
    record(type="error", step=step, split=split, loss=loss, message="non-finite loss")
    path = checkpoint.checkpoint_path(args)
    kept = f"the last good checkpoint, {path}, is untouched" if os.path.exists(path) else \
        "no checkpoint had been written yet"
    sys.exit(f"error: the {split} loss is {loss} at step {step}; {kept}. Try a lower --lr, a longer --warmup or "
             f"--grad-clip 1.0, then continue with --resume (or start again, e.g. with --dtype float32).")


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (what schedulers send before a kill) asks the loop to stop after
    the current step and save a checkpoint. Only a second Ctrl-C, from a person, exits at once, without a
    traceback: further SIGTERMs are the same request again (Slurm signals every process of a job step and
    torchrun forwards its own SIGTERM too, so a worker gets two, milliseconds apart)."""

    def __init__(self, loud):
        self.signum, self.loud, self.previous = 0, loud, {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals only there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGTERM:
            return  # a scheduler's (or the launcher's) copy of the request: the step still finishes and saves
        if self.signum:
            os.write(2, b"\ninterrupted again: exiting now, without saving (a checkpoint already written stays whole)\n")
            os._exit(128 + signum)
        self.signum = signum
        if self.loud:  # os.write, not print: the signal may arrive while the loop is inside a print
            os.write(1, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (press Ctrl-C "
                        f"again to quit at once)\n".encode())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# the end


def finish(args, step, signum, clock, log, say):
    """One summary line; then how to continue a run that stopped early, or what to do with a finished one.
    A run stopped by a signal exits with the conventional status, 128 + the signal's number."""
    if signum:
        log.record(type="interrupted", step=step, signal=signal.Signals(signum).name)
    log.close()
    evals = log.evals
    best = min(evals, key=lambda e: e[1]) if evals else None
    last = "" if not evals else (f", final val loss {evals[-1][1]:.4f}" if evals[-1][0] == step else
                                 f", last val loss {evals[-1][1]:.4f} (at step {evals[-1][0]})")
    say(f"done: {clock.steps} steps (to step {step} of {args.max_steps}), {clock.tokens:,} tokens, "
        f"{(time.time() - clock.start) / 60:.1f} min" + (f"{last}, best {best[1]:.4f} (step {best[0]})" if evals else "")
        + f"; checkpoint: {checkpoint.checkpoint_path(args)}")
    checkpoint.unlock()
    if signum:
        say(f"interrupted at step {step}: checkpoint saved; continue with --resume")
    elif step < args.max_steps:
        say(f"stopped early at step {step} of {args.max_steps} (--stop-at-step): continue with --resume "
            f"(and a later --stop-at-step, or none)")
    else:
        say(f"use the model:\n  python sample.py --out-dir {args.out_dir} --max-new-tokens 200\n"
            f"  python eval.py --out-dir {args.out_dir}\n"
            f"  python export.py --out-dir {args.out_dir} --hf-dir {args.out_dir}/hf")
    parallel.teardown(args)
    if signum:
        sys.exit(128 + signum)
