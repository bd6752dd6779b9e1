"""
Pretrain a LLaMA whose block linears are SLTrain (sparse + low-rank), low-rank or full layers.

    python train.py --model tiny                        # 2-core CPU, offline data, a few minutes
    python train.py --model 60m                         # one GPU, the paper's recipe
    python train.py --model 7b --dry-run --vocab-size 32000   # parameter count and memory, no memory used

The story, top to bottom: config -> data -> model -> optimizer -> loop (eval, checkpoint).
Everything a run did goes to --out-dir: log.jsonl (config first, then one record per log/eval)
and ckpt.pt (written atomically; --resume continues from it exactly).
"""
import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import torch

try:
    import kernels  # noqa: F401  gives SLLinear its Triton route on CUDA (sltrain.route decides when it runs)
except ImportError:  # no triton: every layer takes the dense PyTorch route
    pass
import parallel
from data.loader import load_data
from model import CONFIGS, LLaMA, count_params
from optim import AdamW8bit, PerLayerOptimizer
from sltrain import METHODS, SLLinear, swap_linears

# -----------------------------------------------------------------------------
# config: the paper's recipe per size (steps, global batch in sequences of 256 tokens, eval
# tokens, peak lr per method): 512 x 256 = 131,072 tokens per step for every size. `tiny` is ours,
# sized so a 2-core CPU sees the loss fall within minutes: 16 x 256 = 4,096 tokens per step. LR_HELP
# says where each lr comes from.
PAPER_LRS = dict(full=3e-3, lowrank=3e-3, sltrain=3e-3)
RECIPES = {
    "tiny": dict(steps=300, batch=16, eval_tokens=65_536, lr=dict(full=1e-3, lowrank=1e-2, sltrain=1e-2)),
    # the dense model of tiny sltrain's size (model.py); tiny's lrs until benchmarks/why_sparse.py's sweep sets full's
    "tiny-narrow": dict(steps=300, batch=16, eval_tokens=65_536, lr=dict(full=1e-3, lowrank=1e-2, sltrain=1e-2)),
    "60m": dict(steps=11_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "130m": dict(steps=22_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "350m": dict(steps=65_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "1b": dict(steps=140_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
    "7b": dict(steps=150_000, batch=512, eval_tokens=10_000_000, lr=PAPER_LRS),
}
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "stdlib")
LR_HELP = """
--lr's default, per size and method (RECIPES). tiny: full 1e-3, lowrank 1e-2, sltrain 1e-2, each method's
lowest final val loss in the lr sweep of benchmarks/study.py (1e-4 ... 3e-2, 400 steps, seed 0; README,
Results). 60m to 7b: 3e-3 for every method. It is the lr of SLTrain's public scripts. They ship no
full-rank or low-rank lr (GaLore's paper tuned its baselines over {1e-2, 5e-3, 1e-3, 5e-4, 1e-4}):
full-rank keeps 3e-3, with which a public 60m run (reported on SLTrain's issue tracker) reached 30.08
perplexity, below the paper's 34.06; low-rank takes SLTrain's lr for the same factors without S, untuned.
"""
RESUME_HELP = """
--resume continues the checkpoint's run exactly. It is refused, listing every difference, when the model
(--model --method --rank --delta --alpha --vocab-size --seq-len --seed), the numerics (--param-dtype --dtype),
the batches (--batch-size --grad-accum, the number of ranks), the optimizer state (--optimizer --per-layer
--dist) or the data (its meta.json) differ. These may change: --max-steps --lr --warmup --grad-clip (a note
says the schedule changes; left out, --lr is the run's own), --log-every --eval-every --eval-tokens
--stop-at-step --activation-checkpointing --compile, the --data path (the same meta.json elsewhere is the
same data) and --device (another kind of device continues the run, but not bit for bit: its kernels and random
streams differ).
"""
# RESUME_HELP's flags: MODEL_KEYS and RUN_KEYS must match a checkpoint's; SCHEDULE_KEYS may change
MODEL_KEYS = ("model", "method", "rank", "delta", "alpha", "vocab_size", "seq_len", "seed")
RUN_KEYS = ("param_dtype", "dtype", "batch_size", "grad_accum", "world_size", "optimizer", "per_layer", "dist")
SCHEDULE_KEYS = ("lr", "max_steps", "warmup", "grad_clip")
INT_FLAGS = ("batch_size", "grad_accum", "seq_len", "max_steps", "eval_every", "eval_tokens", "log_every", "gpus",
             "vocab_size", "stop_at_step")  # each >= 1 when given


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=LR_HELP + RESUME_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(CONFIGS), help="model size (default: tiny)")
    p.add_argument("--method", default="sltrain", choices=METHODS, help="block linear layers (default: sltrain)")
    p.add_argument("--rank", type=int, help="low-rank r (default: the paper's for the size)")
    p.add_argument("--delta", type=float, help="sparse density of S (default: the paper's for the size)")
    p.add_argument("--alpha", type=float, help="scale = alpha / rank (default: the paper's for the size)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: per size and method, below)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-step (default: min(64, recipe batch))")
    p.add_argument("--grad-accum", type=int, help="micro-steps per step (default: recipe batch / batch-size)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the paper's for the size)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: 10%% of max-steps)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="global grad-norm clip, 0 = off (default: 0)")
    p.add_argument("--eval-every", type=int, help="steps between evals and checkpoints (default: max-steps/10)")
    p.add_argument("--eval-tokens", type=int, help="validation tokens per eval (default: recipe)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="autocast compute dtype (default: bfloat16 on GPU, float32 on CPU); fp16 would need a "
                   "loss scaler, so it is not offered")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype the weights are stored in; bfloat16 is the paper's pure-bf16 recipe (default: float32)")
    p.add_argument("--seed", type=int, default=0, help="init, support and data order (default: 0)")
    p.add_argument("--data", default=DEFAULT_DATA, help="folder made by data/prepare.py (default: data/stdlib, "
                   "prepared on first use)")
    p.add_argument("--out-dir", help="log and checkpoint folder (default: out/<model>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/ckpt.pt")
    p.add_argument("--vocab-size", type=int, help="model vocabulary (default: the data's)")
    p.add_argument("--dry-run", action="store_true", help="count parameters and estimate memory, then exit")
    p.add_argument("--stop-at-step", type=int, help="checkpoint and exit at this step (split a run across jobs)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="torch AdamW, or AdamW with 8-bit block-wise quantized moments (optim.py)")
    p.add_argument("--per-layer", action="store_true", help="step each parameter inside backward and free its "
                   "gradient at once (optim.py); no full gradient buffer")
    p.add_argument("--dist", choices=["none", "ddp", "fsdp"], help="parallelism (default: none; under torchrun "
                   "ddp, or fsdp for 1b and 7b)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--gpus", type=int, help="GPUs for the --dry-run memory plan (default: WORLD_SIZE or 1)")
    p.add_argument("--consolidate", action="store_true", help="with --dist fsdp: gather the newest sharded "
                   "checkpoint in --out-dir into one <out-dir>/model.pt, then exit")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)

    for name in INT_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    cfg, recipe = CONFIGS[args.model], RECIPES[args.model]
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    world = args.gpus if args.dry_run and args.gpus else args.world_size  # a dry run plans for --gpus processes
    args.dist = args.dist or parallel.default_dist(world, args.model)
    args.rank = cfg.rank if args.rank is None else args.rank
    args.delta = cfg.delta if args.delta is None else args.delta
    args.alpha = cfg.alpha if args.alpha is None else args.alpha
    args.max_steps = args.max_steps or recipe["steps"]
    args.lr_given = args.lr is not None  # without --lr, --resume keeps the run's own lr (load_checkpoint)
    args.lr = recipe["lr"][args.method] if args.lr is None else args.lr
    args.warmup = max(1, args.max_steps // 10) if args.warmup is None else args.warmup
    args.batch_size, args.grad_accum = parallel.split_batch(p, args, recipe["batch"], world)
    args.eval_every = args.eval_every or max(1, args.max_steps // 10)
    args.eval_tokens = args.eval_tokens or recipe["eval_tokens"]
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") or args.dry_run else "float32")
    args.out_dir = args.out_dir or os.path.join("out", f"{args.model}-{args.method}")
    args.gpus = args.gpus or world
    max_rank = min(cfg.dim, cfg.ffn_dim)  # every block linear is dim x dim, dim x ffn or ffn x dim
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{n}" for n in range(torch.cuda.device_count())]
    for ok, flag, rule in (  # (holds?, the flag as typed, what a valid value is)
            (1 <= args.rank <= max_rank, f"--rank {args.rank}", f"must be in [1, {max_rank}] for --model "
             f"{args.model}, its layers' smallest side (default: {cfg.rank})"),
            (0 <= args.delta < 1, f"--delta {args.delta}", "the sparse density must be in [0, 1) (the paper's: 0.03)"),
            (0 < args.alpha < math.inf, f"--alpha {args.alpha}", "must be > 0 (scale = alpha / rank)"),
            (0 < args.lr < math.inf, f"--lr {args.lr}", "must be > 0"),
            (0 <= args.grad_clip < math.inf, f"--grad-clip {args.grad_clip}", "must be >= 0 (0 = off)"),
            (0 <= args.warmup <= args.max_steps, f"--warmup {args.warmup}", f"must be in [0, {args.max_steps}]"),
            ((args.stop_at_step or 1) <= args.max_steps, f"--stop-at-step {args.stop_at_step}", f"must be in [1, "
             f"--max-steps {args.max_steps}] (the run stops at --max-steps anyway)"),
            (0 <= args.seed < 2**32, f"--seed {args.seed}", "must be in [0, 2**32)"),
            (args.device in devices, f"--device {args.device}", f"must be one of: {', '.join(devices)}"),
            (not (args.per_layer and args.grad_clip > 0), "--grad-clip with --per-layer", "clipping needs the global "
             "gradient norm, but --per-layer frees each gradient as soon as its parameter is updated: drop one"),
            (not args.consolidate or args.dist == "fsdp", "--consolidate", "gathers an FSDP2 sharded checkpoint: run "
             "it under torchrun with --dist fsdp"),
            (not (args.per_layer and args.dist == "ddp"), "--per-layer under DDP", "its hooks fire before DDP's "
             "gradient all-reduce (each rank would step on its own gradient): use --dist fsdp")):
        if not ok:
            p.error(f"{flag}: {rule}")
    return args


# -----------------------------------------------------------------------------
# model and optimizer


def build_model(args, vocab_size):
    """The model on the meta device (no memory) with the block layers swapped in;
    parallel.parallelize materialises and initialises it."""
    cfg = replace(CONFIGS[args.model], vocab_size=vocab_size, max_seq_len=args.seq_len)
    with torch.device("meta"):
        model = swap_linears(LLaMA(cfg), args.method, args.rank, args.delta, args.alpha, seed=args.seed)
    for p in model.parameters():  # parameters only: the RoPE tables stay fp32
        p.data = p.data.to(getattr(torch, args.param_dtype))
    return model


def build_optimizer(model, args):
    """AdamW or AdamW8bit (weight decay 0, as the paper). Embeddings and lm_head keep fp32 state
    under AdamW8bit (the standard advice for token embeddings). bf16 weights take AdamW as AdamW8bit
    with fp32 state everywhere (torch AdamW's math, bit for bit) for its stochastic rounding: torch's
    AdamW would round every update to the nearest bf16 and lose those below half an ulp (optim.py).
    --per-layer gives every parameter its own optimizer, stepped from backward."""

    def make(params):
        if args.optimizer == "adamw" and args.param_dtype == "float32":
            return torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        if args.optimizer == "adamw":
            return AdamW8bit(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fp32_state=True)
        embeddings = {id(model.tok_emb.weight), id(model.lm_head.weight)}
        groups = [dict(params=[p for p in params if id(p) not in embeddings]),
                  dict(params=[p for p in params if id(p) in embeddings], fp32_state=True)]
        return AdamW8bit([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                         weight_decay=0.0)

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
        return PerLayerOptimizer(named, make, grad_accum_steps=1 if args.dist == "fsdp" else args.grad_accum,
                                 units=units)
    return make([p for p in model.parameters() if p.requires_grad])


def estimate(model):
    """Parameter counts and the paper's memory estimate: bf16 weights (2 B per parameter), two bf16
    Adam moments per trainable parameter (4 B) and int64 support indices (8 B per nonzero)."""
    total, trainable = count_params(model)
    nnz = sum(m.nnz for m in model.modules() if isinstance(m, SLLinear))
    return dict(params_total=total, params_trainable=trainable, support_nnz=nnz,
                est_memory_gb=round((2 * total + 4 * trainable + 8 * nnz) / 1e9, 4))


def dry_run(args):
    vocab = args.vocab_size
    if vocab is None:
        meta_path = os.path.join(args.data, "meta.json")
        vocab = json.load(open(meta_path))["vocab_size"] if os.path.exists(meta_path) else 32000
    model = build_model(args, vocab)
    est = estimate(model)
    print(f"model {args.model} | method {args.method} | rank {args.rank} delta {args.delta} alpha {args.alpha} "
          f"| vocab {vocab}")
    print(f"parameters: {est['params_total'] / 1e6:.2f}M total, {est['params_trainable'] / 1e6:.2f}M trainable, "
          f"{est['support_nnz'] / 1e6:.2f}M sparse nonzeros")
    print(f"estimated memory (paper's count: bf16 weights + bf16 Adam moments + int64 indices): "
          f"{est['est_memory_gb']:.2f} GB")
    plan = parallel.memory_report(args, model, lambda method: build_model(
        argparse.Namespace(**{**vars(args), "method": method}), vocab))
    print(json.dumps(dict(model=args.model, method=args.method, vocab_size=vocab, gpus=args.gpus, **est, **plan)))


# -----------------------------------------------------------------------------
# checkpoints: written to a temp file, flushed to disk, renamed over the old one, and the rename
# flushed too (parallel.atomic_write), so a crash at any moment leaves either the old checkpoint or
# the new one. Under FSDP2 every rank writes its shard (parallel.save_sharded) and a pointer file
# names the newest. What a killed run left half-written is removed at the next start.


def save_checkpoint(args, rank, model, optimizer, step, meta):
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                 config=vars(args), data_meta=meta,  # the step and config fix the data position and the model
                 rng=dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                          cuda=torch.cuda.get_rng_state(args.device) if args.device.startswith("cuda") else None))
    if args.dist == "fsdp":
        return parallel.save_sharded(args.out_dir, state, step)
    if rank == 0:
        parallel.atomic_write(os.path.join(args.out_dir, "ckpt.pt"), lambda f: torch.save(state, f))
    parallel.barrier()


def has_checkpoint(args):
    return any(os.path.exists(os.path.join(args.out_dir, name)) for name in ("ckpt.pt", "latest-sharded"))


def checkpoint_path(args):
    if args.dist == "fsdp":
        return parallel.sharded_path(args.out_dir) or os.path.join(args.out_dir, "latest-sharded")
    return os.path.join(args.out_dir, "ckpt.pt")


def differences(state, args, meta, whole_run):
    """What differs between the checkpoint's run and this one that would break an exact resume."""
    saved = state["config"]
    found = [f"{'the number of ranks' if k == 'world_size' else '--' + k.replace('_', '-')} {saved[k]} (now "
             f"{getattr(args, k)})" for k in MODEL_KEYS + (RUN_KEYS if whole_run else ())
             if k in saved and saved[k] != getattr(args, k)]  # older checkpoints lack some keys
    was, now = ({k: v for k, v in m.items() if k != "seconds"} for m in (state.get("data_meta") or meta, meta))
    return found + [f"the data's {k} {was.get(k)} (now {now.get(k)})" for k in sorted(was.keys() | now.keys())
                    if whole_run and was.get(k) != now.get(k)]  # the same meta.json at another path is the same


def load_checkpoint(args, model, optimizer, meta):
    path, state, error = checkpoint_path(args), None, None
    if not os.path.exists(path):
        error = (f"--resume but no checkpoint at {path}: leave out --resume to start fresh, or point --out-dir at "
                 f"the run to continue (a sharded checkpoint resumes only on the number of ranks that wrote it).")
    else:
        try:  # to the CPU, so the device never holds the checkpoint beside the state it loads into;
            # FSDP2's DTensors load where their device mesh lives (each rank holds 1/N anyway)
            state = torch.load(path, map_location=args.device if args.dist == "fsdp" else "cpu", weights_only=False)
        except Exception as e:
            error = (f"the checkpoint {path} is unreadable ({type(e).__name__}: {e}). It is corrupt or truncated: "
                     f"restore a copy, or move it away and start fresh without --resume.")
    found = differences(state, args, meta, optimizer is not None) if state is not None else []
    if found:
        error = (f"the checkpoint {path} was written by another run, and resuming it with these flags would not "
                 f"continue it exactly: {'; '.join(found)}. Resume with the checkpoint's settings, or use another "
                 f"--out-dir for a new run (train.py --help: what may change).")
    parallel.exit_together(error, args.device)  # a rank that failed alone would leave the others waiting
    if not args.lr_given and "lr" in state["config"]:  # the run's lr, even if the default changed since
        args.lr = state["config"]["lr"]
    for k in SCHEDULE_KEYS if optimizer is not None and parallel.is_rank0() else ():
        if state["config"].get(k, getattr(args, k)) != getattr(args, k):
            print(f"note: --{k.replace('_', '-')} is {getattr(args, k)}, the checkpoint's run had "
                  f"{state['config'][k]}: the schedule changes from step {state['step']} on")
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"].cpu())  # RNG states live on the CPU whatever map_location said
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and args.device.startswith("cuda"):  # this rank's GPU: DDP replicas draw
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), args.device)  # alike, rank 0's stands for all
    return state["step"]


# -----------------------------------------------------------------------------
# the loop


def lr_at(step, args):
    """Linear warmup to --lr, then cosine down to 0.1 x lr at max-steps (the paper's schedule)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.max_steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def evaluate(model, val, args, autocast, rank, world):
    """Mean loss over the fixed val windows, summed across ranks."""
    model.eval()
    loss_sum, n_tokens = torch.zeros((), dtype=torch.float64, device=args.device), 0  # tokens: counted on the host
    for x, y in val.eval_batches(args.eval_tokens, args.batch_size, args.seq_len, args.device, rank, world):
        with autocast:
            _, loss = model(x, y)
        loss_sum += loss.double() * y.numel()
        n_tokens += y.numel()
    model.train()
    totals = torch.stack([loss_sum, torch.full((), n_tokens, dtype=torch.float64, device=args.device)])
    totals = parallel.all_reduce_sum(totals)  # (sum of losses, tokens) over the ranks
    return (totals[0] / totals[1]).item()  # the one host sync of an eval


def stop_if_not_finite(loss, split, step, args, record):
    """A NaN/Inf loss means the weights (or this batch) are broken: stop without writing a
    checkpoint, so the last good one is never overwritten."""
    if math.isfinite(loss):
        return
    record(type="error", step=step, split=split, loss=loss, message="non-finite loss")
    path = checkpoint_path(args)
    kept = f"the last good checkpoint, {path}, is untouched" if os.path.exists(path) else \
        "no checkpoint had been written yet"
    sys.exit(f"error: the {split} loss is {loss} at step {step}; {kept}. Try a lower --lr, a longer --warmup or "
             f"--grad-clip 1.0, then continue with --resume (or start again, e.g. with --dtype float32).")


def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows past 709.78


def peak_memory_gb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KB -> GB (process RSS)


def run_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return dict(argv=sys.argv, commit=commit, torch=torch.__version__, python=platform.python_version(),
                device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor())


def main(argv=None):
    args = get_args(argv)
    if args.dry_run:
        return dry_run(args)
    rank, world = parallel.setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    meta, train_data, val_data, error = load_data(args, rank, DEFAULT_DATA)
    parallel.exit_together(error, args.device)  # maybe only some ranks miss the data: all exit, none hangs
    vocab = args.vocab_size or meta["vocab_size"]
    if vocab < meta["vocab_size"]:
        sys.exit(f"error: --vocab-size {vocab} is smaller than the data's vocabulary ({meta['vocab_size']}): leave "
                 f"it out, or pass at least {meta['vocab_size']}")
    args.vocab_size = vocab

    dtype = getattr(torch, args.dtype)
    model, raw_model = parallel.parallelize(build_model(args, vocab), args, dtype, lambda: build_model(args, vocab))
    if args.consolidate:
        load_checkpoint(args, raw_model, None, meta)
        return parallel.consolidate(args, raw_model)
    est = estimate(raw_model)
    say(f"{args.model} {args.method}: {est['params_total'] / 1e6:.2f}M parameters "
        f"({est['params_trainable'] / 1e6:.2f}M trainable), {vocab} vocab | {args.device} "
        f"{'' if world == 1 else f'x {world} ranks ({args.dist}) '}| {args.param_dtype} weights, {args.dtype} "
        f"compute | {args.optimizer}{' per-layer' if args.per_layer else ''}")
    optimizer = build_optimizer(raw_model, args)

    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out-dir {args.out_dir}: cannot create it ({e.strerror}): pass a folder you can write")
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if not args.resume and has_checkpoint(args):
        sys.exit(f"error: {args.out_dir} already holds a run with a checkpoint: continue it with --resume, or use "
                 f"another --out-dir (or delete it) to start over.")
    parallel.remove_stale(args.out_dir)  # what a killed run left half-written
    step = load_checkpoint(args, raw_model, optimizer, meta) if args.resume else 0
    if args.resume and rank == 0 and os.path.exists(log_path):  # keep the records the checkpoint covers; a
        # kill inside a write leaves a torn last line, without its "}\n" (only the last: each resume rewrites)
        kept = [line for line in open(log_path) if line.endswith("}\n") and json.loads(line).get("step", 0) <= step]
        parallel.atomic_write(log_path, lambda f: f.write("".join(kept).encode()))
    log = open(log_path, "a" if args.resume else "w") if rank == 0 else None

    def record(**kv):
        if log:
            log.write(json.dumps(kv) + "\n")
            log.flush()

    record(type="config", resumed_from=step if args.resume else None, **vars(args), **est,
           model_config=asdict(raw_model.cfg), data_meta=meta, **run_info())
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * world
    say(f"{tokens_per_step:,} tokens per step ({world} x {args.batch_size} x {args.grad_accum} x {args.seq_len}), "
        f"{args.max_steps} steps from step {step}; logging to {log_path}")
    stop_at = args.stop_at_step or args.max_steps
    if step >= stop_at:
        say(f"note: the checkpoint is at step {step}, and this run stops at step {stop_at}: nothing to train")
    t_start, interval_time, interval_steps = time.time(), 0.0, 0  # tokens/s counts training time only
    batches = train_data.batches(step, args.grad_accum, args.batch_size, args.seq_len, args.seed, args.device,
                                 rank, world)
    while step < stop_at:
        t_step = time.time()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:  # one schedule for the global and the per-layer optimizers
            group["lr"] = lr
        loss_sum = torch.zeros((), device=args.device)
        for micro in range(args.grad_accum):
            last = micro == args.grad_accum - 1
            x, y = next(batches)  # train_data.random_batch(step, micro), read one batch ahead
            with parallel.no_sync(model, args, last):
                with autocast:
                    _, loss = model(x, y)
                (loss / args.grad_accum).backward()
            loss_sum += loss.detach()
        loss_sum = parallel.all_reduce_sum(loss_sum)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # the host waits for the device once per step, here, after the whole step is queued (AdamW8bit's
        # skip booking waits first; the loss is ready by then). A non-finite loss stops the run before
        # any checkpoint holds this update (per-layer updates have run inside backward anyway).
        train_loss = loss_sum.item() / (args.grad_accum * world)
        stop_if_not_finite(train_loss, "train", step, args, record)
        step += 1
        interval_time, interval_steps = interval_time + time.time() - t_step, interval_steps + 1

        if step % args.log_every == 0 or step == args.max_steps:
            tok_s = tokens_per_step * interval_steps / interval_time
            eta = (args.max_steps - step) * interval_time / interval_steps
            mem = peak_memory_gb(args.device)
            skipped = getattr(optimizer, "skipped", 0)  # AdamW8bit: tensor updates skipped for NaN/Inf gradients
            say(f"step {step:>6}/{args.max_steps} | loss {train_loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"peak mem {mem:.2f} GB | eta {eta / 60:.1f} min" + (f" | skipped {skipped}" if skipped else ""))
            record(type="train", step=step, loss=train_loss, lr=lr, tokens_per_s=tok_s, peak_mem_gb=mem,
                   skipped_updates=skipped, elapsed_s=time.time() - t_start)
            interval_time, interval_steps = 0.0, 0
        if step % args.eval_every == 0 or step == stop_at:
            val_loss = evaluate(model, val_data, args, autocast, rank, world)
            stop_if_not_finite(val_loss, "val", step, args, record)
            val_ppl = perplexity(val_loss)
            say(f"eval step {step}: val loss {val_loss:.4f} | val ppl {val_ppl:.2f}")
            record(type="eval", step=step, val_loss=val_loss, val_ppl=val_ppl)
            save_checkpoint(args, rank, raw_model, optimizer, step, meta)
    if log:
        log.close()
    say(f"use the model:\n  python sample.py --out-dir {args.out_dir} --max-new-tokens 200\n"
        f"  python eval.py --out-dir {args.out_dir}\n  python export.py --out-dir {args.out_dir} --hf-dir {args.out_dir}/hf")
    parallel.teardown(args)
    return raw_model


if __name__ == "__main__":
    main()
