"""
Pretrain a LLaMA whose block linears are SLTrain (sparse + low-rank), low-rank or full layers.

    python train.py --model tiny                        # 2-core CPU, offline data, a few minutes
    python train.py --model 60m                         # one GPU, the paper's recipe
    python train.py --model 7b --dry-run --vocab-size 32000   # parameter count and memory, no memory used

The story, top to bottom: each size's recipe -> data -> model -> optimizer -> lr_at -> train_step -> the
loop in main(), which logs, evaluates and checkpoints. One training step is followed through train.py,
model.py, sltrain.py (kernels.py on the Triton route), optim.py and data/loader.py. The run around the
loop (flags, the out-dir and its checkpoints, ranks, the memory plan, signals) is behind a few calls into
run/, which you need not read to understand SLTrain. Ctrl-C (or SIGTERM) finishes the current step and
saves a checkpoint; --resume continues exactly.
"""
import math
import signal
import sys
from dataclasses import asdict, replace

import torch
from torch.distributed.tensor import DTensor

import model as models
from data.loader import load_data
from model import CONFIGS, autocast, evaluate
from optim import AdamW8bit, PerLayerOptimizer, book_skips, fp32_state_params, pending_flags
from run import checkpoint, flags, memory, parallel, session
from sltrain import SLLinear

# -----------------------------------------------------------------------------
# the recipe: each size's steps, global batch (sequences of 256 tokens), eval tokens and peak lr per method.
# The paper's for 60m-7b: 512 x 256 = 131,072 tokens per step. `tiny` is ours, sized so a 2-core CPU sees
# the loss fall within minutes: 16 x 256 = 4,096 tokens per step. Where each lr comes from: docs/scaling.md.

PAPER_LRS = dict(full=3e-3, lowrank=3e-3, sltrain=3e-3)
RECIPES = {
    "tiny": dict(steps=300, batch=16, eval_tokens=65_536, lr=dict(full=1e-3, lowrank=1e-2, sltrain=1e-2)),
    # the dense model of tiny sltrain's size (model.py): full's lr from its own sweep (benchmarks/why_sparse.py;
    # 400 steps, seed 0: 3e-3 best of 1e-4 ... 1e-2), tiny's for the others (untuned at this size)
    "tiny-narrow": dict(steps=300, batch=16, eval_tokens=65_536, lr=dict(full=3e-3, lowrank=1e-2, sltrain=1e-2)),
    "60m": dict(steps=11_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "130m": dict(steps=22_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "350m": dict(steps=65_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "1b": dict(steps=140_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "7b": dict(steps=150_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
}
TABLE_VOCAB = {"tiny": 257, "tiny-narrow": 257}  # the README's parameter counts: the offline data's vocabulary
PAPER_VOCAB = 32000  # for the paper's sizes, the paper's (its LLaMA/T5 tokenizer)
DEFAULT_DATA = flags.DEFAULT_DATA


def get_args(argv=None):
    """The flags (run/flags.py: --help, and one `error:` line for a flag that cannot work), each left out
    taken from RECIPES."""
    return flags.get_args(argv, RECIPES)


# -----------------------------------------------------------------------------
# model and optimizer


def build_model(args, vocab_size):
    """The model on the meta device (no memory) with the block layers swapped in, and what rebuilds it
    (kept in every checkpoint); run/parallel.parallelize materialises and initialises it."""
    cfg = replace(CONFIGS[args.model], vocab_size=vocab_size, max_seq_len=args.seq_len, rank=args.rank,
                  alpha=args.alpha, delta=args.delta)  # the run's own SL settings, as `sl` has them
    sl = dict(method=args.method, rank=args.rank, delta=args.delta, alpha=args.alpha, seed=args.seed)
    build = dict(model_config=asdict(cfg), sl=sl, param_dtype=args.param_dtype)
    model = models.build_model(**build)
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
        # FSDP2 skips the reduce-scatter on all but the last micro-step (run/parallel.no_sync), and only
        # then does a shard's gradient (and its hook) arrive: one hook call per step. In one process
        # every micro-step's backward calls the hook. FSDP2's units (run/parallel.parallelize: each block,
        # then the root) reconcile their non-finite flags once each.
        units = None
        if args.dist in parallel.SHARDED:
            units = [[n for n, _ in named if n.startswith(f"blocks.{i}.")] for i in range(len(model.blocks))]
            units.append([n for n, _ in named if not n.startswith("blocks.")])
        accum = 1 if args.dist in parallel.SHARDED else args.grad_accum  # FSDP2 and HSDP: one hook call a step
        optimizer = PerLayerOptimizer(named, make, grad_accum_steps=accum, units=units)
    else:
        optimizer = make([p for p in model.parameters() if p.requires_grad])
    optimizer.book_skips_in_step = False  # train_step books AdamW8bit's skips with the step's one read
    return optimizer


# -----------------------------------------------------------------------------
# the schedule, one step, an eval


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
        with parallel.no_sync(model, args, micro == args.grad_accum - 1):  # DDP/FSDP2: reduce on the last only
            with autocast:
                _, loss = model(x, y)
            (loss / args.grad_accum).backward()
        loss_sum += loss.detach()
    # the loss and a stop request travel in one all-reduce (a no-op in one process), so every rank stops together
    totals = parallel.all_reduce_sum(torch.stack([loss_sum, torch.full((), float(stop.signum > 0), device=args.device)]))
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    optimizer.step()  # with --per-layer the updates already ran inside backward; this checks they all did
    optimizer.zero_grad(set_to_none=True)
    # the host waits for the device once per step, here, after the whole step is queued: the loss, the stop
    # request and AdamW8bit's non-finite flags (optim.py: a tensor with a NaN/Inf gradient is skipped) in one read
    flags = pending_flags(optimizer)
    loss_sum, stops, *flags = torch.cat([totals, torch.stack(flags)]).tolist() if flags else totals.tolist()
    book_skips(optimizer, flags)
    return loss_sum / (args.grad_accum * world), stops > 0


def validation_loss(model, val, args, autocast, rank, world):
    """Mean loss over the fixed val windows, summed across ranks."""
    batches = val.eval_batches(args.eval_tokens, args.batch_size, args.seq_len, args.device, rank, world)
    loss_sum, n_tokens = evaluate(model, batches, autocast, args.device)
    totals = parallel.all_reduce_sum(torch.stack([loss_sum, torch.full((), n_tokens, dtype=torch.float64,
                                                                        device=args.device)]))
    return (totals[0] / totals[1]).item()  # the one host sync of an eval


def part_norms(model):
    """{layer type: [mean ||S||_F, mean ||scale * B A||_F] over the blocks} for the SL layers (empty for full),
    on every rank (FSDP2 gathers each sharded tensor)."""
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, SLLinear):
            norms.setdefault(name.split(".", 2)[2], []).append(m.part_norms(full))  # blocks.3.attn.wq -> attn.wq
    return {kind: [sum(n[i] for n in pairs) / len(pairs) for i in (0, 1)] for kind, pairs in norms.items()}


# -----------------------------------------------------------------------------
# the loop


def parameters(args, meta_model):
    """'11.03M parameters (11.03M trainable)', and at which vocabulary when the README's table counts at another."""
    est = memory.paper_estimate(meta_model)
    text = f"{est['params_total'] / 1e6:.2f}M parameters ({est['params_trainable'] / 1e6:.2f}M trainable)"
    table_vocab = TABLE_VOCAB.get(args.model, PAPER_VOCAB)
    if args.vocab_size == table_vocab:
        return f"{text}, vocab {args.vocab_size}"
    at_table = memory.paper_estimate(build_model(args, table_vocab))["params_total"]
    return (f"{text} at the data's vocabulary of {args.vocab_size} ({at_table / 1e6:.2f}M at the {table_vocab} the "
            f"README's table counts with)")


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return memory.dry_run(args, build_model, RECIPES[args.model])
    rank, world = parallel.setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    created = session.new_folder(args.out_dir)  # what a refused start removes again
    parallel.exit_together(session.claim_out_dir(args, rank), args.device)  # one run per folder
    torch.manual_seed(args.seed)
    with session.refusals_leave_no_folder(args, rank, created):  # a start refused below leaves no new folder
        # data
        meta, train_data, val_data, error = load_data(args, rank, DEFAULT_DATA)
        if error is None and (args.vocab_size or meta["vocab_size"]) < meta["vocab_size"]:
            error = (f"--vocab-size {args.vocab_size} is smaller than the data's vocabulary ({meta['vocab_size']}): "
                     f"leave it out, or pass at least {meta['vocab_size']}")
        args.vocab_size = args.vocab_size or (meta or {}).get("vocab_size")
        # model: built on the meta device, checked against the free memory, then materialised (and wrapped for --dist)
        meta_model = build_model(args, args.vocab_size) if error is None else None
        if error is None and not args.no_memory_check:
            error = memory.check_memory(args, meta_model)
        parallel.exit_together(error, args.device)  # some ranks may fail alone: all exit, none hangs
        layout = args.dist + (f": {world // args.shard_size} copies of {args.shard_size}" if args.dist == "hsdp" else "")
        say(f"{args.model} {args.method}: {parameters(args, meta_model)} | {args.device}"
            f"{'' if world == 1 else f' x {world} ranks ({layout})'} | {args.param_dtype} weights, {args.dtype} "
            f"compute | {args.optimizer}{' per-layer' * args.per_layer}")
        session.cpu_note(args, meta_model, world, say)  # a GPU-sized recipe on a CPU: how long a step will take
        model, raw_model = parallel.parallelize(meta_model, args, lambda: build_model(args, args.vocab_size),
                                                load=args.resume)  # --resume: the checkpoint's weights, not new ones
        # optimizer, and the checkpoint to continue (--resume) with the log
        optimizer = build_optimizer(raw_model, args)
        step, log = session.start(args, raw_model, optimizer, meta, val_data, rank, world, say, argv)
    # the loop
    compute = autocast(args.device, getattr(torch, args.dtype))
    batches = train_data.batches(step, args.grad_accum, args.batch_size, args.seq_len, args.seed, args.device,
                                 rank, world)
    stop_at, stop, clock, stopping = args.stop_at_step or args.max_steps, session.StopRequest(rank == 0), \
        session.Clock(), False
    try:
        while step < stop_at:
            clock.begin()
            lr = lr_at(step, args)
            for group in optimizer.param_groups:  # one schedule for the global and the per-layer optimizers
                group["lr"] = lr * group.get("lr_ratio", 1.0)  # lr_ratio: S's values (--sparse-lr-ratio)
            loss, stopping = train_step(model, optimizer, batches, args, compute, world, stop)
            session.stop_if_not_finite(loss, "train", step, args, log.record)
            step += 1
            clock.end(args.batch_size * args.grad_accum * args.seq_len * world, loss)
            if step % args.log_every == 0 or step == args.max_steps:
                session.log_step(step, loss, lr, optimizer, clock, args, log, say)
            if step % args.eval_every == 0 or step == stop_at:
                session.log_eval(step, validation_loss(model, val_data, args, compute, rank, world),
                                 part_norms(raw_model), args, log, say)
            if step % args.eval_every == 0 or step == stop_at or stopping:
                checkpoint.save(args, raw_model, optimizer, step, raw_model.build, meta)
            if stopping:
                break
    finally:  # an exception inside the loop leaves the signals as they were
        stop.restore()
    session.finish(args, step, (stop.signum or signal.SIGINT) if stopping else 0, clock, log, say)
    return raw_model


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before the loop's own handler is in place: nothing trained yet, nothing to save
        print("\ninterrupted before training started: nothing to save", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
