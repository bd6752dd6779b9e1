"""
train.py's flags and the checks every flag goes through.

A flag left out takes the size's recipe (train.py's RECIPES: the paper's for 60m-7b, ours for tiny), and a
flag that cannot work stops the run with one `error:` line that names it and its rule, before anything is
allocated. Each rule is checked here once; the SL settings' rules live in sltrain.setting_errors, the
per-layer ones in optim.per_layer_conflict.
"""
import argparse
import math
import os

import torch

from model import CONFIGS
from optim import per_layer_conflict
from run import parallel
from sltrain import METHODS, setting_errors

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "stdlib")
RESUME_HELP = """
--resume continues the checkpoint's run exactly. It is refused, listing every difference, when the model
(--model --method --rank --delta --alpha --vocab-size --seq-len --seed), the numerics (--param-dtype --dtype),
the batches (--batch-size --grad-accum, the number of ranks), the optimizer state (--optimizer --per-layer
--dist --shard-size --sparse-lr-ratio) or the data (its meta.json) differ. These may change: --max-steps --lr --warmup
--grad-clip (a note says the schedule changes; left out, --lr is the run's own), --log-every --eval-every --eval-tokens
--stop-at-step --activation-checkpointing --compile, the --data path (the same meta.json elsewhere is the
same data) and --device (another kind of device continues the run, but not bit for bit: its kernels and random
streams differ).
"""
INT_FLAGS = ("batch_size", "grad_accum", "seq_len", "max_steps", "eval_every", "eval_tokens", "log_every", "gpus",
             "vocab_size", "stop_at_step", "shard_size")  # each >= 1 when given


DESCRIPTION = """Pretrain a LLaMA whose block linears are SLTrain (sparse + low-rank), low-rank or full layers.

    python train.py --model tiny                        # 2-core CPU, offline data, a few minutes
    python train.py --model 60m                         # one GPU, the paper's recipe
    python train.py --model 7b --dry-run --vocab-size 32000   # parameter count and memory, no memory used
    torchrun --nproc_per_node=8 train.py --model 7b     # FSDP2; docs/scaling.md for larger runs

Everything a run did goes to --out-dir: log.jsonl (config first, then one record per log/eval) and its
checkpoint (run/checkpoint.py), written atomically at every eval and on Ctrl-C; --resume continues it exactly."""
AFTER_HELP = """
After training: python sample.py --out-dir RUN (text), python eval.py --out-dir RUN (val loss),
python export.py --out-dir RUN --hf-dir DIR (a Hugging Face LLaMA folder).
"""


def devices():
    """What --device accepts on this machine."""
    return ["cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{n}" for n in range(torch.cuda.device_count())]


def parse_args(argv, recipes):
    """-> (parser, the flags as typed); validate() fills in the defaults and checks them."""
    tiny = recipes["tiny"]
    p = argparse.ArgumentParser(description=DESCRIPTION, epilog=RESUME_HELP + AFTER_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", choices=list(CONFIGS), help="model size (default: tiny)")
    p.add_argument("--method", default="sltrain", choices=METHODS, help="block linear layers (default: sltrain)")
    p.add_argument("--rank", type=int, help="low-rank r (default: the paper's for the size)")
    p.add_argument("--delta", type=float, help="sparse density of S (default: the paper's for the size)")
    p.add_argument("--alpha", type=float, help="scale = alpha / rank (default: the paper's for the size)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: per size and method; tiny: " +
                   ", ".join(f"{m} {lr:g}" for m, lr in tiny["lr"].items()) + "; 60m-7b: 3e-3)")
    p.add_argument("--sparse-lr-ratio", type=float, help="S's values train at this multiple of the lr, the "
                   "factors A and B at the lr itself (sltrain only, 1 for the others; default: 1)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-step (default: min(64, recipe batch); "
                   f"tiny: {tiny['batch']})")
    p.add_argument("--grad-accum", type=int, help="micro-steps per step (default: recipe batch / batch-size)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default: the paper's for the size; tiny: "
                   f"{tiny['steps']})")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: 10%% of max-steps)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="global grad-norm clip, 0 = off (default: 0)")
    p.add_argument("--eval-every", type=int, help="steps between evals and checkpoints (default: max-steps/10)")
    p.add_argument("--eval-tokens", type=int, help=f"validation tokens per eval (default: the recipe's; tiny: "
                   f"{tiny['eval_tokens']:,})")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: 10)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", metavar="DEVICE",
                   help=f"one of: {', '.join(devices())} (default: cuda when present)")
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
                   help="torch AdamW, or AdamW with 8-bit group-wise quantized moments (optim.py)")
    p.add_argument("--per-layer", action="store_true", help="step each parameter inside backward and free its "
                   "gradient at once (optim.PerLayerOptimizer); no full gradient buffer")
    p.add_argument("--dist", choices=["none", "ddp", "fsdp", "hsdp"], help="parallelism (default: none; under "
                   "torchrun ddp, or fsdp for 1b and 7b); hsdp: fsdp within each group of --shard-size ranks, "
                   "the groups replicas (docs/scaling.md)")
    p.add_argument("--shard-size", type=int, help="--dist hsdp: ranks that shard one copy of the model (default: "
                   "the ranks per node, LOCAL_WORLD_SIZE); it divides the number of ranks")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--no-memory-check", action="store_true", help="start even when the memory plan (--dry-run) "
                   "exceeds the free memory: the plan is an estimate (docs/scaling.md: how close it is)")
    p.add_argument("--gpus", type=int, help="GPUs for the --dry-run memory plan (default: WORLD_SIZE or 1)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    return p, p.parse_args(argv)


def split_batch(args, batch, world):
    """(--batch-size, --grad-accum, None) with world x batch-size x grad-accum = the recipe's global batch,
    exactly: what was not given is filled in (micro-batches up to 64); or (.., .., why it cannot split)."""
    size, accum = args.batch_size, args.grad_accum
    given = size or accum or max((d for d in range(1, 65) if batch % (world * d) == 0), default=None)
    if not (size and accum) and (given is None or batch % (world * given)):
        a = accum or -(-batch // (world * (size or 64)))
        s = size or -(-batch // (world * a))
        return size, accum, (f"{f'--batch-size {size}: ' if size else f'--grad-accum {accum}: ' if accum else ''}the "
                             f"{args.model} recipe's {batch} sequences per step do not split into {world} rank(s) x "
                             f"--batch-size x --grad-accum: pass both, e.g. --batch-size {s} --grad-accum {a} "
                             f"({world * s * a} sequences per step)")
    if size and accum:
        return size, accum, None
    return (batch // (world * given), given, None) if accum else (given, batch // (world * given), None)


def validate(p, args, recipes):
    """Fill in each default from the size's recipe and check every flag; a bad one exits with one line."""

    for name in INT_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    cfg, recipe = CONFIGS[args.model], recipes[args.model]
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    world = args.gpus if args.dry_run and args.gpus else args.world_size  # a dry run plans for --gpus processes
    args.dist = args.dist or parallel.default_dist(world, args.model)
    if args.shard_size and args.dist != "hsdp":
        p.error(f"--shard-size with --dist {args.dist}: only --dist hsdp shards within groups of ranks")
    if args.dist == "hsdp":  # a dry run plans nodes of 8 GPUs; under torchrun a copy is one node's ranks
        given = args.shard_size is not None
        local = os.environ.get("LOCAL_WORLD_SIZE", "")
        args.shard_size = args.shard_size or (min(world, 8) if args.dry_run or not local.isdigit() else int(local))
        if (args.dry_run or "WORLD_SIZE" in os.environ) and world % args.shard_size:  # else: not under torchrun
            p.error(f"--shard-size {args.shard_size}: must divide the number of ranks, {world} (copies x shard size)"
                    if given else f"--dist hsdp: the default --shard-size {args.shard_size} (the ranks per node) does "
                    f"not divide the {world} ranks: pass --shard-size")
    args.rank = cfg.rank if args.rank is None else args.rank
    args.delta = cfg.delta if args.delta is None else args.delta
    args.alpha = cfg.alpha if args.alpha is None else args.alpha
    args.max_steps = args.max_steps or recipe["steps"]
    args.lr_given = args.lr is not None  # without --lr, --resume keeps the run's own lr (checkpoint.resume)
    args.lr = recipe["lr"][args.method] if args.lr is None else args.lr
    args.sparse_lr_ratio = 1.0 if args.sparse_lr_ratio is None else args.sparse_lr_ratio
    args.warmup = max(1, args.max_steps // 10) if args.warmup is None else args.warmup
    args.batch_size, args.grad_accum, error = split_batch(args, recipe["batch"], world)
    if error:
        p.error(error)
    args.eval_every = args.eval_every or max(1, args.max_steps // 10)
    args.eval_tokens = args.eval_tokens or recipe["eval_tokens"]
    args.dtype_given = args.dtype is not None  # a dry run on a CPU plans a GPU's bf16 unless told
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") or args.dry_run else "float32")
    if args.out_dir == "" or args.data == "":
        p.error(f"--{'out-dir' if args.out_dir == '' else 'data'} '': empty (an unset shell variable?): pass a folder")
    args.out_dir = args.out_dir or os.path.join("out", f"{args.model}-{args.method}")
    args.gpus = args.gpus or world
    max_rank = min(cfg.dim, cfg.ffn_dim)  # every block linear is dim x dim, dim x ffn or ffn x dim
    for name, value, rule in setting_errors(args.rank, args.delta, args.alpha, max_rank)[:1]:
        detail = dict(rank=f" for --model {args.model}, its layers' smallest side (default: {cfg.rank})",
                      delta=" (the paper's: 0.03)", alpha="")[name]
        p.error(f"--{name} {value}: {rule}{detail}")
    per_layer = per_layer_conflict(args.grad_clip, args.dist == "ddp") if args.per_layer else None
    for ok, flag, rule in (  # (holds?, the flag as typed, what a valid value is)
            (0 < args.lr < math.inf, f"--lr {args.lr}", "must be > 0"),
            (0 < args.sparse_lr_ratio < math.inf, f"--sparse-lr-ratio {args.sparse_lr_ratio}", "must be > 0"),
            (args.sparse_lr_ratio == 1 or (args.method == "sltrain" and args.delta > 0),  # 1 changes nothing
             f"--sparse-lr-ratio with --method {args.method}" + " --delta 0" * (args.method == "sltrain"),
             "only sltrain with --delta > 0 has a sparse part S to give its own lr"),
            (0 <= args.grad_clip < math.inf, f"--grad-clip {args.grad_clip}", "must be >= 0 (0 = off)"),
            (0 <= args.warmup <= args.max_steps, f"--warmup {args.warmup}", f"must be in [0, {args.max_steps}]"),
            ((args.stop_at_step or 1) <= args.max_steps, f"--stop-at-step {args.stop_at_step}", f"must be in [1, "
             f"--max-steps {args.max_steps}] (the run stops at --max-steps anyway)"),
            (0 <= args.seed < 2**32, f"--seed {args.seed}", "must be in [0, 2**32)"),
            (args.device in devices(), f"--device {args.device}", f"must be one of: {', '.join(devices())}"),
            (not per_layer, "--grad-clip with --per-layer" if args.grad_clip > 0 else "--per-layer under DDP",
             f"{per_layer}: {'drop one' if args.grad_clip > 0 else 'use --dist fsdp or hsdp'}")):
        if not ok:
            p.error(f"{flag}: {rule}")
    return args


def get_args(argv, recipes):
    return validate(*parse_args(argv, recipes), recipes)


