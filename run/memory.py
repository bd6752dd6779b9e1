"""
How much memory a run needs, counted before anything is allocated: train.py's `--dry-run` prints it,
and train.py checks it against the free memory before the first step.

Two counts, for two questions:
  paper_estimate  the paper's table: bf16 weights + two bf16 Adam moments + int64 support indices.
                  It reproduces the paper's figures (tests/test_train.py) and compares methods.
  memory_plan     what one GPU of this run holds: weights, gradients and optimizer state as this run
                  stores them (dtype, optimizer, per-layer, accumulation, DDP or FSDP2 on N GPUs),
                  buffers, the kernels' support layouts, and the activations one micro-batch saves
                  for backward, found by running the model on fake tensors (shapes only).
tests/test_memory.py checks every line of the plan against the tensors a real CPU run allocates.
"""
import copy
import json
import os

import torch

import sltrain
from model import autocast, count_params
from optim import MIN_8BIT_SIZE, fp32_state_params, state_bytes


GB = 1e9


def size(n_bytes):
    """Bytes in the unit a person reads: MB below 1 GB (the tiny model's 2.61 MB, not 0.00 GB), else GB."""
    return f"{n_bytes / 1e6:.2f} MB" if n_bytes < GB else f"{n_bytes / GB:.2f} GB"


# -----------------------------------------------------------------------------
# the paper's count


def paper_estimate(model):
    """Parameter counts and the paper's memory estimate: bf16 weights (2 B per parameter), two bf16
    Adam moments per trainable parameter (4 B) and int64 support indices (8 B per nonzero)."""
    total, trainable = count_params(model)
    nnz = sum(m.nnz for m in model.modules() if isinstance(m, sltrain.SLLinear))
    n_bytes = 2 * total + 4 * trainable + 8 * nnz
    return dict(params_total=total, params_trainable=trainable, support_nnz=nnz, est_memory_bytes=n_bytes,
                est_memory_gb=round(n_bytes / GB, 4))


# -----------------------------------------------------------------------------
# the plan (--dry-run): the bytes one GPU holds, counted without allocating anything


def model_state_bytes(model, optimizer, per_layer, grad_accum, dist, shards, layouts):
    """Bytes one GPU holds for the weights, gradients, optimizer state and buffers of a meta model
    (its parameters in the run's --param-dtype). FSDP2 divides the first three by the GPUs that shard
    one copy (`shards`: every GPU, or HSDP's --shard-size); buffers
    (support indices, RoPE tables) are on every GPU, and with `layouts` (builds_layouts) the kernels'
    SupportLayout of each support, int32: col_order (nnz,), row_ptr (out+1,), col_ptr (in+1,)."""
    params = list(model.parameters())
    sharded = dist in ("fsdp", "hsdp")
    n = shards if sharded else 1
    width = params[0].element_size()  # 4 or 2 bytes per weight and per gradient
    total = sum(p.numel() for p in params)
    if sharded and grad_accum > 1:
        # FSDP2 keeps each gradient unsharded, fp32, on every GPU until the last micro-step's reduce-scatter
        grads = 4 * total + (0 if per_layer else width * total / n)
    elif per_layer and (grad_accum == 1 or sharded):
        grads = width * max(p.numel() for p in params) / n  # each gradient is freed by its own update
    else:  # all of them, accumulated over the micro-steps (per-layer steps on the last one)
        grads = width * total * (2 if dist == "ddp" else 1) / n  # DDP copies them into all-reduce buckets
    embeddings = {id(p) for p in fp32_state_params(model)}  # fp32 state under AdamW8bit (train.build_optimizer)
    states = 0
    for p in params:
        numel = p.numel() / n
        if optimizer == "adamw" and width == 4:  # torch AdamW: fp32 m and v, a 4-byte step count
            states += 8 * numel + 4
        else:  # AdamW8bit (also AdamW on bf16 weights, with fp32 state everywhere)
            eight_bit = optimizer == "adamw8bit" and id(p) not in embeddings and numel >= MIN_8BIT_SIZE
            states += state_bytes(numel, eight_bit)
    layers = [m for m in model.modules() if isinstance(m, sltrain.SLLinear)]
    layout = sum(4 * (m.nnz + m.out_features + m.in_features + 2) for m in layers)
    return dict(weights=width * total / n, gradients=grads, optimizer_state=states,
                buffers=sum(b.nbytes for b in model.buffers()), support_layout=layout if layouts else 0)


def builds_layouts(args, model):
    """Whether the SL layers build SupportLayouts: if the Triton route runs (a dry run plans for GPUs) for a
    micro-batch or for the last eval batch (part-filled when data.loader.eval_batches' windows run out)."""
    windows = max(1, args.eval_tokens // args.seq_len)
    last_eval = max(args.gpus, windows - windows % args.gpus) // args.gpus % args.batch_size  # sequences
    return sltrain.takes_triton(model, {args.batch_size * args.seq_len, last_eval * args.seq_len} - {0},
                                cuda=args.dry_run or args.device.startswith("cuda"))


def activation_bytes(model, batch_size, seq_len, dtype):
    """Bytes one training forward of a (batch_size, seq_len) micro-batch leaves for backward, counted by running
    a copy of the meta model on fake tensors (shapes and dtypes only, no memory) under autocast to `dtype`:
    every tensor autograd saves, less parameters and buffers, plus the logits the caller holds. Returns
      plain:        all of it;
      checkpointed: with activation checkpointing, what is saved outside the blocks plus each
                    block's input (a block keeps nothing else);
      recompute:    the most one block saves, alive again while backward recomputes it.
    The fused attention (flash, on GPU and CPU) saves q, k, v, its output and the log-sum-exp. The model
    runs the dense route here; SLLinear's Triton route (kernels.py) saves z = x A^T as well, not counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # meta tensors that autocast accepts as "cpu"
    model = copy.deepcopy(model)
    size, saved, blocks, inputs, keep = {}, set(), [], set(), []  # storage id -> bytes; sets of ids

    def key(t):
        keep.append(t)  # alive until we are done, so no id is reused
        size[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t.untyped_storage()._cdata

    def pack(t):
        saved.add(key(t))
        if blocks and blocks[-1] is not None:
            blocks[-1].add(key(t))
        return t

    def enter(block, args):
        inputs.add(key(args[0]))
        blocks.append(set())

    def leave(block, args, out):
        blocks.append(None)  # back outside the blocks

    route, sltrain.ROUTE = sltrain.ROUTE, "dense"  # fake tensors run PyTorch ops only, not Triton kernels
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        for block in model.blocks:
            block.register_forward_pre_hook(enter)
            block.register_forward_hook(leave)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
        state = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), idx]}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                autocast("cpu", dtype):
            logits, loss = model(idx, idx)
    sltrain.ROUTE = route
    blocks = [b for b in blocks if b is not None]
    outside = saved - set().union(*blocks) - state
    count = lambda ids: sum(size[i] for i in ids)
    return dict(plain=count(saved - state | {key(logits)}),
                checkpointed=count(outside | inputs | {key(logits)}),
                recompute=max(count(b - state) for b in blocks))


def shard_gpus(args):
    """The GPUs that shard one copy of the model: all of them (FSDP2), --shard-size (HSDP), else 1."""
    return args.gpus if args.dist == "fsdp" else args.shard_size if args.dist == "hsdp" else 1


def memory_plan(args, model):
    """Bytes one GPU holds in this run: weights, gradients, optimizer state, buffers, activations of one
    micro-batch and (with --activation-checkpointing) one recomputed block, for the run's meta model."""
    plan = model_state_bytes(model, args.optimizer, args.per_layer, args.grad_accum, args.dist, shard_gpus(args),
                             builds_layouts(args, model))
    acts = activation_bytes(model, args.batch_size, args.seq_len, getattr(torch, args.dtype))
    ckpt = args.activation_checkpointing
    plan.update(activations=acts["checkpointed" if ckpt else "plain"], recompute=acts["recompute"] if ckpt else 0)
    return dict(**plan, total=sum(plan.values()))


def memory_report(args, model, build, recipe_tokens, recipe_lr):
    """Print the plan for this run, and the model states of the setups the paper compares at 7b with
    this run's other flags; build(method) -> meta model; recipe_*: the size's recipe (train.RECIPES).
    Returns both, in GB, for the JSON line."""
    tokens = args.gpus * args.batch_size * args.grad_accum * args.seq_len
    print(f"tokens per step: {tokens:,} = {args.gpus} GPU(s) x {args.batch_size} sequences x {args.grad_accum} "
          f"micro-steps x {args.seq_len} tokens ({tokens / recipe_tokens:.3g} x the recipe's {recipe_tokens:,}); "
          f"lr {args.lr:g} (the recipe's: {recipe_lr:g})")
    plan = memory_plan(args, model)
    print(f"\nmemory per GPU, planned: {args.param_dtype} weights, {args.dtype} compute, {args.optimizer}"
          f"{' per-layer' if args.per_layer else ''}, {args.grad_accum} micro-step(s) of {args.batch_size} x "
          f"{args.seq_len} tokens{', activation checkpointing' if args.activation_checkpointing else ''}, "
          f"--dist {args.dist} on {args.gpus} GPU(s)" + (f", {args.gpus // args.shard_size} copies of "
                                                             f"{args.shard_size}" if args.dist == "hsdp" else ""))
    accumulating = args.grad_accum > 1
    notes = dict(gradients="unsharded fp32 while FSDP2 accumulates" if args.dist in ("fsdp", "hsdp") and accumulating else
                 "kept between micro-steps: per-layer steps on the last" if args.per_layer and accumulating else
                 "one tensor's at a time (per-layer)" if args.per_layer else
                 "and DDP's all-reduce buckets" if args.dist == "ddp" else "",
                 buffers="support indices and RoPE tables", support_layout="the kernels' (Triton route, GPU)",
                 activations="saved for backward, and the logits", recompute="one block recomputed in backward")
    notes["total"] = "this run's plan: what the memory check compares with the free memory"
    for name, b in plan.items():
        print(f"  {name:<16} {size(b):>10}  {notes.get(name, '')}")
    setups, layouts = {}, builds_layouts(args, build("sltrain"))  # the layouts of sltrain's layers
    for label, method, optimizer, per_layer in (("full + AdamW", "full", "adamw", False),
                                                ("sltrain + AdamW8bit", "sltrain", "adamw8bit", False),
                                                ("sltrain + AdamW8bit + per-layer", "sltrain", "adamw8bit", True)):
        states = model_state_bytes(build(method), optimizer, per_layer, args.grad_accum, args.dist, shard_gpus(args),
                                   layouts)
        setups[label] = sum(states.values())
    print("\nmodel states per GPU (weights, gradients, optimizer state, buffers) of the paper's 7b comparison, "
          "with this run's dtype, micro-steps and GPUs:")
    for label, b in setups.items():
        print(f"  {label:<36} {size(b):>10}")
    setups = {label: round(b / GB, 2) for label, b in setups.items()}
    return dict(tokens_per_step=tokens, memory_plan_gb={k: round(v / GB, 3) for k, v in plan.items()},
                model_states_gb=setups)


MEMINFO = "/proc/meminfo"  # MemAvailable: what the kernel can give a process without swapping


def check_memory(args, model):
    """Stop before allocating anything when this run's plan (the one --dry-run prints) does not fit in 90% of
    its device's free memory. On a CPU the Python and torch runtime comes on top: peak RSS minus the plan
    measured 0.49-0.75 GB on the tiny and 60m models (docs/reliability.md), so 1 GB is added."""
    plan = memory_plan(args, model)["total"]
    if args.device.startswith("cuda"):
        free, runtime, where = torch.cuda.mem_get_info(args.device)[0], 0, f"free on {args.device}"
    else:
        with open(MEMINFO) as f:
            free = 1024 * int(next(line for line in f if line.startswith("MemAvailable:")).split()[1])
        runtime, where = 1e9, "available to this machine (MemAvailable)"
    local = 1 if args.device.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # share the RAM
    if local * (plan + runtime) <= 0.9 * free:
        return None
    need = (f"{plan / 1e9:.1f} GB per GPU" if args.device.startswith("cuda") else
            f"{plan / 1e9:.1f} GB of tensors per process (+ 1 GB for the Python and torch runtime)"
            + (f", {local} processes on this machine" if local > 1 else ""))
    return (f"this run plans {need}, and {free / 1e9:.1f} GB is {where}: lower it with --batch-size (and "
            f"--grad-accum to keep the step), --seq-len, --activation-checkpointing, --param-dtype bfloat16 or "
            f"--per-layer (--dry-run shows each line), or pass --no-memory-check to start anyway")


# -----------------------------------------------------------------------------
# train.py --dry-run


def dry_run(args, build_model, recipe):
    """train.py --dry-run: the parameter count, the paper's estimate and this run's plan; build_model(args,
    vocab) -> the meta model, recipe: the size's (train.RECIPES)."""
    vocab = args.vocab_size
    if vocab is None:
        meta_path = os.path.join(args.data, "meta.json")
        vocab = json.load(open(meta_path))["vocab_size"] if os.path.exists(meta_path) else 32000
    model = build_model(args, vocab)
    est = paper_estimate(model)
    gpu_default = args.device == "cpu" and not args.dtype_given  # a plan for the GPUs the run is meant for
    compute = (f"{args.dtype} compute planned (a GPU run's default; on cpu this run computes in float32)"
               if gpu_default else f"{args.dtype} compute on {args.device}")
    print(f"model {args.model} | method {args.method} | rank {args.rank} delta {args.delta} alpha {args.alpha} "
          f"| vocab {vocab} | {compute}")
    print(f"parameters: {est['params_total'] / 1e6:.2f}M total, {est['params_trainable'] / 1e6:.2f}M trainable, "
          f"{est['support_nnz'] / 1e6:.2f}M sparse nonzeros")
    print(f"the paper's memory estimate (bf16 weights + bf16 Adam moments + int64 indices; the README table's): "
          f"{size(est['est_memory_bytes'])}")
    plan = memory_report(args, model, lambda method: build_model(replace_args(args, method=method), vocab),
                         recipe["batch"] * 256, recipe["lr"][args.method])
    print(json.dumps(dict(model=args.model, method=args.method, vocab_size=vocab, gpus=args.gpus, **est, **plan)))


def replace_args(args, **changes):
    return type(args)(**{**vars(args), **changes})
