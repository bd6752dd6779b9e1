"""
Pretrain a LLaMA whose block linears are SLTrain (sparse + low-rank), low-rank or full layers.

    python train.py --model tiny                        # 2-core CPU, offline data, a few minutes
    python train.py --model 60m                         # one GPU, the paper's recipe
    python train.py --model 7b --dry-run --vocab-size 32000   # parameter count and memory, no memory used

The story, top to bottom: flags (config.py) -> data -> model -> optimizer -> the loop in main(), which
calls train_step (micro-steps, clip, update), then logs, evaluates and checkpoints (checkpoint.py).
Ctrl-C (or SIGTERM) finishes the current step and saves a checkpoint; --resume continues exactly.
"""
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace

import torch
from torch.distributed.tensor import DTensor

import checkpoint
import memory
import parallel
from config import DEFAULT_DATA, RECIPES, get_args  # noqa: F401  (get_args: train.get_args for scripts and tests)
from data.loader import load_data
from model import CONFIGS, autocast, evaluate, perplexity
from optim import AdamW8bit, book_skips, fp32_state_params, pending_flags
from per_layer import PerLayerOptimizer
from sltrain import SLLinear

# -----------------------------------------------------------------------------
# model and optimizer


def sl_settings(args):
    """What sltrain.swap_linears needs, as checkpoints store it."""
    return dict(method=args.method, rank=args.rank, delta=args.delta, alpha=args.alpha, seed=args.seed)


def build_model(args, vocab_size):
    """The model on the meta device (no memory) with the block layers swapped in, and what rebuilds it
    (kept in every checkpoint); parallel.parallelize materialises and initialises it."""
    cfg = replace(CONFIGS[args.model], vocab_size=vocab_size, max_seq_len=args.seq_len, rank=args.rank,
                  alpha=args.alpha, delta=args.delta)  # the run's own SL settings, as `sl` has them
    build = dict(model_config=asdict(cfg), sl=sl_settings(args), param_dtype=args.param_dtype)
    model = checkpoint.build_model(**build)
    model.build = build
    return model


def build_optimizer(model, args):
    """AdamW or AdamW8bit (weight decay 0, as the paper). Embeddings and lm_head keep fp32 state
    under AdamW8bit (the standard advice for token embeddings). bf16 weights take AdamW as AdamW8bit
    with fp32 state everywhere (torch AdamW's math, bit for bit) for its stochastic rounding: torch's
    AdamW would round every update to the nearest bf16 and lose those below half an ulp (optim.py).
    --per-layer gives every parameter its own optimizer, stepped from backward."""

    embeddings = {id(p) for p in fp32_state_params(model)}
    sparse = {id(m.values) for m in model.modules() if isinstance(m, SLLinear)} if args.sparse_lr_ratio != 1 else set()

    def make(params):
        # groups by what differs: S's values with their own lr (lr_ratio: the loop sets lr = schedule x ratio),
        # embeddings and lm_head with fp32 state under AdamW8bit; one group (as torch makes it) when nothing does
        eight_bit = args.optimizer == "adamw8bit"
        key = lambda p: (id(p) in sparse, eight_bit and id(p) in embeddings)  # noqa: E731
        groups = [dict(params=[p for p in params if key(p) == k], **({"lr_ratio": args.sparse_lr_ratio} if k[0] else {}),
                       **({"fp32_state": True} if k[1] else {}))
                  for k in sorted({key(p) for p in params})]
        if args.optimizer == "adamw" and args.param_dtype == "float32":
            return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        return AdamW8bit(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                         fp32_state=args.optimizer == "adamw")

    if args.per_layer:  # one optimizer per named parameter, stepped by the last micro-step's backward
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # FSDP2 skips the reduce-scatter on all but the last micro-step (parallel.no_sync), and only
        # then does a shard's gradient (and its hook) arrive: one hook call per step. In one process
        # every micro-step's backward calls the hook. FSDP2's units (parallel.parallelize: each block,
        # then the root) reconcile their non-finite flags once each.
        units = None
        if args.dist == "fsdp":
            units = [[n for n, _ in named if n.startswith(f"blocks.{i}.")] for i in range(len(model.blocks))]
            units.append([n for n, _ in named if not n.startswith("blocks.")])
        optimizer = PerLayerOptimizer(named, make, grad_accum_steps=1 if args.dist == "fsdp" else args.grad_accum,
                                      units=units)
    else:
        optimizer = make([p for p in model.parameters() if p.requires_grad])
    optimizer.book_skips_in_step = False  # train_step books AdamW8bit's skips with the step's one read
    return optimizer


def dry_run(args):
    vocab = args.vocab_size
    if vocab is None:
        meta_path = os.path.join(args.data, "meta.json")
        vocab = json.load(open(meta_path))["vocab_size"] if os.path.exists(meta_path) else 32000
    model = build_model(args, vocab)
    est = memory.paper_estimate(model)
    gpu_default = args.device == "cpu" and not args.dtype_given  # a plan for the GPUs the run is meant for
    compute = (f"{args.dtype} compute planned (a GPU run's default; on cpu this run computes in float32)"
               if gpu_default else f"{args.dtype} compute on {args.device}")
    print(f"model {args.model} | method {args.method} | rank {args.rank} delta {args.delta} alpha {args.alpha} "
          f"| vocab {vocab} | {compute}")
    print(f"parameters: {est['params_total'] / 1e6:.2f}M total, {est['params_trainable'] / 1e6:.2f}M trainable, "
          f"{est['support_nnz'] / 1e6:.2f}M sparse nonzeros")
    print(f"estimated memory (paper's count: bf16 weights + bf16 Adam moments + int64 indices): "
          f"{est['est_memory_gb']:.2f} GB")
    recipe = RECIPES[args.model]
    plan = memory.memory_report(args, model, lambda method: build_model(replace_args(args, method=method), vocab),
                                recipe["batch"] * 256, recipe["lr"][args.method])
    print(json.dumps(dict(model=args.model, method=args.method, vocab_size=vocab, gpus=args.gpus, **est, **plan)))


def replace_args(args, **changes):
    return type(args)(**{**vars(args), **changes})


# -----------------------------------------------------------------------------
# the loop


def lr_at(step, args):
    """Linear warmup to --lr, then cosine down to 0.1 x lr at max-steps (the paper's schedule)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_step(model, optimizer, batches, args, autocast, world, stop):
    """One optimizer step: forward and backward over --grad-accum micro-batches (each loss divided by
    their number, so the gradients are the whole batch's mean), clip, update. Returns the mean loss and
    whether any rank was asked to stop, read in the step's one wait for the device."""
    loss_sum = torch.zeros((), device=args.device)
    for micro in range(args.grad_accum):
        x, y = next(batches)  # the data's random_batch(step, micro), read one batch ahead
        with parallel.no_sync(model, args, micro == args.grad_accum - 1):
            with autocast:
                _, loss = model(x, y)
            (loss / args.grad_accum).backward()
        loss_sum += loss.detach()
    # the loss and a stop request travel in one all-reduce, so every rank stops after the same step
    totals = parallel.all_reduce_sum(torch.stack([loss_sum, torch.full((), float(stop.signum > 0), device=args.device)]))
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the host waits for the device once per step, here, after the whole step is queued: the loss, the stop
    # request and AdamW8bit's non-finite flags in one read. A non-finite loss stops the run before any
    # checkpoint holds this update (per-layer updates have run inside backward anyway).
    inner = list(getattr(optimizer, "optimizers", {}).values()) or [optimizer]  # PerLayerOptimizer's, or itself
    flags = pending_flags(inner)
    loss_sum, stops, *flags = torch.cat([totals, torch.stack(flags)]).tolist() if flags else totals.tolist()
    book_skips(inner, flags)
    return loss_sum / (args.grad_accum * world), stops > 0


def validation_loss(model, val, args, autocast, rank, world):
    """Mean loss over the fixed val windows, summed across ranks."""
    batches = val.eval_batches(args.eval_tokens, args.batch_size, args.seq_len, args.device, rank, world)
    loss_sum, n_tokens = evaluate(model, batches, autocast, args.device)
    totals = parallel.all_reduce_sum(torch.stack([loss_sum, torch.full((), n_tokens, dtype=torch.float64,
                                                                        device=args.device)]))
    return (totals[0] / totals[1]).item()  # the one host sync of an eval


class StopRequest:
    """The first Ctrl-C (SIGINT) or SIGTERM (what schedulers send before a kill) asks the loop to stop
    after the current step and save a checkpoint; a second one exits at once, without a traceback."""

    def __init__(self, loud):
        self.signum, self.loud, self.previous = 0, loud, {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals only there
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.signum:
            os.write(2, b"\ninterrupted again: exiting now; the last checkpoint is as it was\n")
            os._exit(128 + signum)
        self.signum = signum
        if self.loud:  # os.write, not print: the signal may arrive while the loop is inside a print
            os.write(1, f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (press Ctrl-C "
                        f"again to quit at once)\n".encode())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


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


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KB -> GB (process RSS)


def run_info(argv=None):
    """Where the run came from; argv: what main() parsed (None: the command line)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    argv = sys.argv if argv is None else [os.path.abspath(__file__)] + list(argv)  # main(argv): a command too
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


def log_step(step, loss, lr, optimizer, clock, args, log, say):
    seconds, steps, tokens, losses = clock.interval
    tok_s, eta = tokens / seconds, (args.max_steps - step) * seconds / steps
    mem = peak_memory_gb(args.device)
    skipped = getattr(optimizer, "skipped", 0)  # AdamW8bit: tensor updates skipped for NaN/Inf gradients
    say(f"step {step:>6}/{args.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
        f"peak mem {mem:.2f} GB | eta {eta / 60:.1f} min" + (f" | skipped {skipped}" if skipped else ""))
    log.record(type="train", step=step, loss=loss, loss_mean=losses / steps, steps_in_mean=steps, lr=lr,
               tokens_per_s=tok_s, peak_mem_gb=mem, skipped_updates=skipped, elapsed_s=time.time() - clock.start)
    clock.interval = [0.0, 0, 0, 0.0]


def part_norms(model):
    """{layer type: [mean ||S||_F, mean ||scale * B A||_F] over the blocks} for the SL layers (empty for full),
    on every rank (FSDP2 gathers each sharded tensor)."""
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, SLLinear):
            norms.setdefault(name.split(".", 2)[2], []).append(m.part_norms(full))  # blocks.3.attn.wq -> attn.wq
    return {kind: [sum(n[i] for n in pairs) / len(pairs) for i in (0, 1)] for kind, pairs in norms.items()}


def log_eval(step, val_loss, norms, args, log, say):
    stop_if_not_finite(val_loss, "val", step, args, log.record)
    say(f"eval step {step}: val loss {val_loss:.4f} | val ppl {perplexity(val_loss):.2f}")
    log.record(type="eval", step=step, val_loss=val_loss, val_ppl=perplexity(val_loss),
               **({"norms_S_BA": norms} if norms else {}))


def finish(args, step, signum, clock, log, say):
    """One summary line; then how to continue a run that stopped early, or what to do with a finished one.
    A run stopped by a signal exits with the conventional status, 128 + the signal's number."""
    if signum:
        log.record(type="interrupted", step=step, signal=signal.Signals(signum).name)
    log.close()
    evals = log.evals
    best = min(evals, key=lambda e: e[1]) if evals else None
    say(f"done: {clock.steps} steps (to step {step} of {args.max_steps}), {clock.tokens:,} tokens, "
        f"{(time.time() - clock.start) / 60:.1f} min" + (f", final val loss {evals[-1][1]:.4f}, best {best[1]:.4f} "
                                                          f"(step {best[0]})" if evals else "") +
        f"; checkpoint: {checkpoint.checkpoint_path(args)}")
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


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return dry_run(args)
    rank, world = parallel.setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    parallel.exit_together(claim_out_dir(args, rank), args.device)
    torch.manual_seed(args.seed)
    meta, train_data, val_data, error = load_data(args, rank, DEFAULT_DATA)
    if error is None and (args.vocab_size or meta["vocab_size"]) < meta["vocab_size"]:
        error = (f"--vocab-size {args.vocab_size} is smaller than the data's vocabulary ({meta['vocab_size']}): leave it "
                 f"out, or pass at least {meta['vocab_size']}")
    args.vocab_size = args.vocab_size or (meta or {}).get("vocab_size")
    meta_model = build_model(args, args.vocab_size) if error is None else None
    if error is None and not args.no_memory_check:
        error = memory.check_memory(args, meta_model)
    parallel.exit_together(error, args.device)  # some ranks may fail alone: all exit, none hangs
    model, raw_model = parallel.parallelize(meta_model, args, lambda: build_model(args, args.vocab_size))
    est = memory.paper_estimate(raw_model)
    say(f"{args.model} {args.method}: {est['params_total'] / 1e6:.2f}M parameters ({est['params_trainable'] / 1e6:.2f}"
        f"M trainable), {args.vocab_size} vocab | {args.device}{'' if world == 1 else f' x {world} ranks ({args.dist})'}"
        f" | {args.param_dtype} weights, {args.dtype} compute | {args.optimizer}{' per-layer' * args.per_layer}")
    optimizer = build_optimizer(raw_model, args)
    step, log = start(args, raw_model, optimizer, meta, val_data, rank, world, say, argv)
    compute = autocast(args.device, getattr(torch, args.dtype))
    batches = train_data.batches(step, args.grad_accum, args.batch_size, args.seq_len, args.seed, args.device,
                                 rank, world)
    stop_at, stop, clock, stopping = args.stop_at_step or args.max_steps, StopRequest(rank == 0), Clock(), False
    try:
        while step < stop_at:
            clock.begin()
            lr = lr_at(step, args)
            for group in optimizer.param_groups:  # one schedule for the global and the per-layer optimizers
                group["lr"] = lr * group.get("lr_ratio", 1.0)  # lr_ratio: S's values (--sparse-lr-ratio)
            loss, stopping = train_step(model, optimizer, batches, args, compute, world, stop)
            stop_if_not_finite(loss, "train", step, args, log.record)
            step += 1
            clock.end(args.batch_size * args.grad_accum * args.seq_len * world, loss)
            if step % args.log_every == 0 or step == args.max_steps:
                log_step(step, loss, lr, optimizer, clock, args, log, say)
            if step % args.eval_every == 0 or step == stop_at:
                log_eval(step, validation_loss(model, val_data, args, compute, rank, world), part_norms(raw_model),
                         args, log, say)
            if step % args.eval_every == 0 or step == stop_at or stopping:
                checkpoint.save(args, raw_model, optimizer, step, raw_model.build, meta)
            if stopping:
                break
    finally:  # an exception inside the loop leaves the signals as they were
        stop.restore()
    finish(args, step, (stop.signum or signal.SIGINT) if stopping else 0, clock, log, say)
    return raw_model


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the loop's own handler is in place: nothing trained yet, nothing to save
        print("\ninterrupted before training started: nothing to save", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
