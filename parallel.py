"""
Everything in nano-sltrain that knows about ranks. train.py calls it; model.py, sltrain.py and
optim.py stay single-device code that happens to work sharded.

    torchrun --nproc_per_node=8 train.py --model 350m --dist ddp     # replicas + gradient all-reduce
    torchrun --nproc_per_node=8 train.py --model 7b --dist fsdp      # FSDP2: every block sharded

DDP keeps a full replica per GPU. FSDP2 (`fully_shard` on each block, then the root) keeps 1/N of
every parameter, gradient and optimizer state per GPU, all-gathers a block's weights (in bf16)
just before it runs and reduce-scatters its gradients (in fp32) right after. SLTrain's A, B and
values shard like any parameter; the support `indices` are buffers, so every rank holds all of
them, drawn from the same per-layer seed.

Sharded checkpoints are one torch.save file per rank (DTensors and all): AdamW8bit keeps its
quantized state on the local shard as plain tensors, which torch.distributed.checkpoint would
take for replicated ones. Resume needs the same world size; `--consolidate` gathers the weights
into one ordinary state dict.
"""
import copy
import math
import os
import shutil
import sys
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import sltrain
from model import init_module
from optim import BLOCK


def default_dist(world, model):
    """--dist when not given: none in one process; under torchrun DDP replicas for the sizes whose
    replica and AdamW states fit one GPU, FSDP2 shards for 1b and 7b."""
    return "none" if world == 1 else ("fsdp" if model in ("1b", "7b") else "ddp")


def split_batch(p, args, batch, world):
    """(--batch-size, --grad-accum) with world x batch-size x grad-accum = the recipe's global batch,
    exactly: what was not given is filled in (micro-batches up to 64), or the run is refused."""
    size, accum = args.batch_size, args.grad_accum
    given = size or accum or max((d for d in range(1, 65) if batch % (world * d) == 0), default=None)
    if not (size and accum) and (given is None or batch % (world * given)):
        a = accum or -(-batch // (world * (size or 64)))
        s = size or -(-batch // (world * a))
        p.error(f"{f'--batch-size {size}: ' if size else f'--grad-accum {accum}: ' if accum else ''}the {args.model} "
                f"recipe's {batch} sequences per step do not split into {world} rank(s) x --batch-size x --grad-accum:"
                f" pass both, e.g. --batch-size {s} --grad-accum {a} ({world * s * a} sequences per step)")
    return (size, accum) if size and accum else (batch // (world * given), given) if accum else \
        (given, batch // (world * given))


def setup(args):
    """Join the torchrun process group (if any) and pick this rank's device. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dist == "none":
        if world > 1:
            sys.exit("error: --dist none under torchrun would train independent copies; use --dist ddp or fsdp")
        return 0, 1
    if "LOCAL_RANK" not in os.environ:
        sys.exit(f"error: --dist {args.dist} runs under torchrun: torchrun --nproc_per_node=N train.py ...")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def teardown(args):
    if args.dist != "none" and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def exit_together(error, device):
    """Exit on every rank if any rank has an error message, so no rank waits alone in a collective."""
    if dist.is_initialized():
        failed = all_reduce_sum(torch.tensor([error is not None], dtype=torch.int32, device=device))
        if failed.item() and error is None:
            error = "another rank failed (see its message above)"
    if error is not None:
        sys.exit(f"error: {error}")


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def parallelize(model, args, dtype, make_meta_model):
    """A model built on the meta device -> materialised, initialised, wrapped for --dist: returns (model
    to call, the unwrapped model). make_meta_model() builds the same model again on the meta device;
    FSDP2 initialisation draws from it one module at a time."""
    for block in model.blocks:
        if args.activation_checkpointing:  # keep only each block's input; recompute the rest in backward
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile:
            block.compile()
    if args.dist == "fsdp":
        # Weights are all-gathered as stored (--param-dtype) and bf16 compute comes from train.py's
        # autocast, exactly as in one process and DDP. A bf16 param_dtype here would also cast every
        # block's input, making the residual stream bf16 under FSDP2 only (another model: the losses
        # differed by 3e-4 at step 1 on the tiny model); with fp32 weights it costs 2x the all-gather
        # bytes, which --param-dtype bfloat16 (the paper's recipe) halves again. Gradients reduce in fp32.
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        model.to_empty(device=args.device)
        init_sharded(model, make_meta_model(), args.seed, args.device)
        check_replicated_buffers(model)
        return model, model
    model.to_empty(device=args.device)
    model.init_weights(seed=args.seed)
    if args.dist == "ddp":
        check_replicated_buffers(model)
        # buffers (RoPE tables, the supports) are identical and never change: no per-forward broadcast
        return DistributedDataParallel(model, device_ids=[torch.device(args.device).index]
                                       if args.device.startswith("cuda") else None, broadcast_buffers=False), model
    return model, model


@torch.no_grad()
def init_sharded(model, twin, seed, device):
    """Give every rank its shard of exactly the values a single process draws with this seed. Random
    DTensor init would draw per shard, which differs from the unsharded run (and on CPU, repeats one
    stream on every rank). Instead an unsharded twin is materialised one module at a time (never the
    whole model), initialised in init_weights' order from the same seed, and each rank copies out its shard."""
    torch.manual_seed(seed)
    for twin_module, module in zip(twin.modules(), model.modules()):
        if twin_module is twin or not (list(twin_module.parameters(recurse=False)) or
                                      list(twin_module.buffers(recurse=False))):
            continue
        twin_module.to_empty(device=device, recurse=False)
        init_module(twin_module)
        for name, full in [*twin_module.named_parameters(recurse=False), *twin_module.named_buffers(recurse=False)]:
            target = getattr(module, name)
            if isinstance(target, DTensor):
                full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            target.copy_(full)
        twin_module.to_empty(device="meta", recurse=False)  # free it again


def check_replicated_buffers(model):
    """Every rank must hold the same buffers (the SLTrain supports above all): compare checksums."""
    if not dist.is_initialized():
        return
    for name, buf in model.named_buffers():
        local = torch.stack([buf.double().sum(), (buf.double() * torch.arange(buf.numel(), device=buf.device)
                                                  .view(buf.shape)).sum()])  # order-sensitive
        lo, hi = local.clone(), local.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"buffer {name} differs between ranks: every rank must draw the same SLTrain support "
                               f"(same --seed, same code)")


def no_sync(model, args, last_micro_step):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step."""
    if args.dist == "fsdp":
        model.set_requires_gradient_sync(last_micro_step)
    elif args.dist == "ddp" and not last_micro_step:
        return model.no_sync()
    return torch.enable_grad()  # a context that changes nothing


# -----------------------------------------------------------------------------
# checkpoint files. Every file is written to <name>.tmp, flushed to disk, renamed over <name>, and
# the rename is flushed too (the directory), so after a crash at any moment, power cuts included,
# <name> holds either the old content or the new. Sharded checkpoints: out_dir/sharded-<step>/
# rank<r>-of-<N>.pt, and a pointer file naming the newest, replaced only after every rank has
# written, so a crash leaves the previous complete checkpoint in force. A killed run's leftovers
# (*.tmp, sharded directories the pointer does not name) are removed at the next start.


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(f) into path.tmp (a binary file), then move it into place durably."""
    with open(path + ".tmp", "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_dir(os.path.dirname(path) or ".")


def remove_stale(out_dir):
    """Rank 0 removes what a killed run left half-written: *.tmp files and folders, and sharded-*
    folders that latest-sharded does not name (renamed into place but never pointed to, or the
    previous one, about to be deleted). The others wait."""
    if is_rank0():
        pointer = os.path.join(out_dir, "latest-sharded")
        current = open(pointer).read().strip() if os.path.exists(pointer) else None
        for name in os.listdir(out_dir):
            path = os.path.join(out_dir, name)
            if name.endswith(".tmp") or (name.startswith("sharded-") and name != current):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    barrier()


def save_sharded(out_dir, state, step):
    rank, world = dist.get_rank(), dist.get_world_size()
    final = os.path.join(out_dir, f"sharded-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    with open(os.path.join(tmp, f"rank{rank}-of-{world}.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    dist.barrier()
    if rank == 0:
        fsync_dir(tmp)  # every rank's file entry is on disk
        shutil.rmtree(final, ignore_errors=True)  # a leftover of this step's name is never the pointer's
        os.replace(tmp, final)
        fsync_dir(out_dir)
        pointer = os.path.join(out_dir, "latest-sharded")
        previous = open(pointer).read().strip() if os.path.exists(pointer) else None
        atomic_write(pointer, lambda f: f.write(os.path.basename(final).encode()))
        if previous and previous != os.path.basename(final):
            shutil.rmtree(os.path.join(out_dir, previous), ignore_errors=True)
    dist.barrier()


def sharded_path(out_dir):
    """This rank's file of the newest sharded checkpoint (rank<r>-of-<N>.pt: only its world size resumes), or None."""
    pointer = os.path.join(out_dir, "latest-sharded")
    if not os.path.exists(pointer):
        return None
    return os.path.join(out_dir, open(pointer).read().strip(), f"rank{dist.get_rank()}-of-{dist.get_world_size()}.pt")


def consolidate(args, model):
    """Gather the sharded weights into one ordinary state dict, <out-dir>/model.pt, on rank 0's host.
    full_tensor() is a collective every rank joins, tensor by tensor; the other ranks drop each result
    at once and never hold more than one full tensor (7b in bf16 on 8 ranks: 6.3 GB in all, not 50)."""
    full, rank0 = {}, dist.get_rank() == 0
    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if rank0:
            full[name] = value.cpu()
    if rank0:
        path = os.path.join(args.out_dir, "model.pt")
        atomic_write(path, lambda f: torch.save(dict(model=full, config=vars(args)), f))
        print(f"wrote {path} ({sum(v.numel() for v in full.values()) / 1e6:.2f}M values)")
    teardown(args)


# -----------------------------------------------------------------------------
# the memory plan (--dry-run): the bytes one GPU holds, counted without allocating anything.
# tests/test_memory.py checks every line of it against the tensors a real run allocates.

GB = 1e9
PAPER_TOKENS_PER_STEP, PAPER_LR = 512 * 256, 3e-3  # the public SLTrain scripts, every size


def model_state_bytes(model, optimizer, per_layer, grad_accum, dist, gpus, layouts):
    """Bytes one GPU holds for the weights, gradients, optimizer state and buffers of a meta model
    (its parameters in the run's --param-dtype). FSDP2 divides the first three by the GPUs; buffers
    (support indices, RoPE tables) are on every GPU, and with `layouts` (builds_layouts) the kernels'
    SupportLayout of each support, int32: col_order (nnz,), row_ptr (out+1,), col_ptr (in+1,)."""
    params = list(model.parameters())
    n = gpus if dist == "fsdp" else 1
    width = params[0].element_size()  # 4 or 2 bytes per weight and per gradient
    total = sum(p.numel() for p in params)
    if dist == "fsdp" and grad_accum > 1:
        # FSDP2 keeps each gradient unsharded, fp32, on every GPU until the last micro-step's reduce-scatter
        grads = 4 * total + (0 if per_layer else width * total / n)
    elif per_layer and (grad_accum == 1 or dist == "fsdp"):
        grads = width * max(p.numel() for p in params) / n  # each gradient is freed by its own update
    else:  # all of them, accumulated over the micro-steps (per-layer steps on the last one)
        grads = width * total * (2 if dist == "ddp" else 1) / n  # DDP copies them into all-reduce buckets
    embeddings = {id(model.tok_emb.weight), id(model.lm_head.weight)}
    states = 0
    for p in params:
        numel = p.numel() / n
        if optimizer == "adamw" and width == 4:  # torch AdamW: fp32 m and v, a 4-byte step count
            states += 8 * numel + 4
        elif optimizer == "adamw" or id(p) in embeddings or numel < 4096:  # fp32 state: AdamW on bf16
            states += 8 * numel  # weights (train.build_optimizer), AdamW8bit's fp32_state and min_8bit_size
        else:  # m and v: one byte per element and an fp32 absmax per block of 256
            states += 2 * (numel + 4 * math.ceil(numel / BLOCK))
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
    The fused attention (flash, on GPU and CPU) saves q, k, v, its output and the log-sum-exp. SLLinear's
    Triton route (kernels.py) saves z = x A^T as well, not counted here."""
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

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        for block in model.blocks:
            block.register_forward_pre_hook(enter)
            block.register_forward_hook(leave)
        idx = torch.zeros(batch_size, seq_len, dtype=torch.long)
        state = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), idx]}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype, enabled=dtype != torch.float32):
            logits, loss = model(idx, idx)
    blocks = [b for b in blocks if b is not None]
    outside = saved - set().union(*blocks) - state
    count = lambda ids: sum(size[i] for i in ids)
    return dict(plain=count(saved - state | {key(logits)}),
                checkpointed=count(outside | inputs | {key(logits)}),
                recompute=max(count(b - state) for b in blocks))


def memory_plan(args, model):
    """Bytes one GPU holds in this run: weights, gradients, optimizer state, buffers, activations of one
    micro-batch and (with --activation-checkpointing) one recomputed block, for the run's meta model."""
    plan = model_state_bytes(model, args.optimizer, args.per_layer, args.grad_accum, args.dist, args.gpus,
                             builds_layouts(args, model))
    acts = activation_bytes(model, args.batch_size, args.seq_len, getattr(torch, args.dtype))
    ckpt = args.activation_checkpointing
    plan.update(activations=acts["checkpointed" if ckpt else "plain"], recompute=acts["recompute"] if ckpt else 0)
    return dict(**plan, total=sum(plan.values()))


def memory_report(args, model, build):
    """Print the plan for this run, and the model states of the setups the paper compares at 7b with
    this run's other flags; build(method) -> meta model. Returns both, in GB, for the JSON line."""
    tokens = args.gpus * args.batch_size * args.grad_accum * args.seq_len
    print(f"tokens per step: {tokens:,} = {args.gpus} GPU(s) x {args.batch_size} sequences x {args.grad_accum} "
          f"micro-steps x {args.seq_len} tokens ({tokens / PAPER_TOKENS_PER_STEP:.3g} x the paper's "
          f"{PAPER_TOKENS_PER_STEP:,}); lr {args.lr:g} (the paper's: {PAPER_LR:g})")
    plan = memory_plan(args, model)
    print(f"\nmemory per GPU, planned: {args.param_dtype} weights, {args.dtype} compute, {args.optimizer}"
          f"{' per-layer' if args.per_layer else ''}, {args.grad_accum} micro-step(s) of {args.batch_size} x "
          f"{args.seq_len} tokens{', activation checkpointing' if args.activation_checkpointing else ''}, "
          f"--dist {args.dist} on {args.gpus} GPU(s)")
    accumulating = args.grad_accum > 1
    notes = dict(gradients="unsharded fp32 while FSDP2 accumulates" if args.dist == "fsdp" and accumulating else
                 "kept between micro-steps: per-layer steps on the last" if args.per_layer and accumulating else
                 "one tensor's at a time (per-layer)" if args.per_layer else
                 "and DDP's all-reduce buckets" if args.dist == "ddp" else "",
                 buffers="support indices and RoPE tables", support_layout="the kernels' (Triton route, GPU)",
                 activations="saved for backward, and the logits", recompute="one block recomputed in backward")
    for name, b in plan.items():
        print(f"  {name:<16} {b / GB:8.2f} GB  {notes.get(name, '')}")
    setups, layouts = {}, builds_layouts(args, build("sltrain"))  # the layouts of sltrain's layers
    for label, method, optimizer, per_layer in (("full + AdamW", "full", "adamw", False),
                                                ("sltrain + AdamW8bit", "sltrain", "adamw8bit", False),
                                                ("sltrain + AdamW8bit + per-layer", "sltrain", "adamw8bit", True)):
        states = model_state_bytes(build(method), optimizer, per_layer, args.grad_accum, args.dist, args.gpus, layouts)
        setups[label] = round(sum(states.values()) / GB, 2)
    print("\nmodel states per GPU (weights, gradients, optimizer state, buffers) of the paper's 7b comparison, "
          "with this run's dtype, micro-steps and GPUs:")
    for label, gb in setups.items():
        print(f"  {label:<36} {gb:8.2f} GB")
    return dict(tokens_per_step=tokens, memory_plan_gb={k: round(v / GB, 3) for k, v in plan.items()},
                model_states_gb=setups)
