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

from model import Block, init_module
from sltrain import SLLinear


def setup(args):
    """Join the torchrun process group (if any) and pick this rank's device. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.dist is None:  # a sensible default: replicas for models that fit, shards for 1b and 7b
        args.dist = "none" if world == 1 else ("fsdp" if args.model in ("1b", "7b") else "ddp")
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
    """A model built on the meta device -> materialised, initialised, wrapped for --dist.

    Returns (model to call, the unwrapped model). make_meta_model() builds the same model again on
    the meta device; FSDP2 initialisation draws from it one module at a time.
    """
    for block in model.blocks:
        if args.activation_checkpointing:  # keep only each block's input; recompute the rest in backward
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile:
            block.compile()
    if args.dist == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32)
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
    """Give every rank its shard of exactly the values a single process draws with this seed.

    Random DTensor init would draw per shard, which differs from the unsharded run (and on CPU,
    repeats one stream on every rank). Instead an unsharded twin is materialised one module at a
    time (never the whole model), initialised in init_weights' order from the same seed, and each
    rank copies out its shard.
    """
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
    """This rank's file of the newest sharded checkpoint (rank<r>-of-<N>.pt: it resumes only on the
    world size that wrote it), or None when there is none."""
    pointer = os.path.join(out_dir, "latest-sharded")
    if not os.path.exists(pointer):
        return None
    return os.path.join(out_dir, open(pointer).read().strip(), f"rank{dist.get_rank()}-of-{dist.get_world_size()}.pt")


def full_state_dict(model):
    """Gather every DTensor into a full tensor (a collective: call on all ranks)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in model.state_dict().items()}


def consolidate(args, model):
    """Gather the sharded weights into one ordinary state dict, <out-dir>/model.pt (rank 0 writes)."""
    full = full_state_dict(model)
    if dist.get_rank() == 0:
        path = os.path.join(args.out_dir, "model.pt")
        atomic_write(path, lambda f: torch.save(dict(model=full, config=vars(args)), f))
        print(f"wrote {path} ({sum(v.numel() for v in full.values()) / 1e6:.2f}M values)")
    teardown(args)


# -----------------------------------------------------------------------------
# memory planning for --dry-run


def memory_plan(args, build):
    """Per-GPU memory of model states (weights, gradients, optimizer states) for the setups the
    paper compares at 7b, sharded over args.gpus GPUs by FSDP2 (support indices are buffers: every
    GPU holds them, int32, and the kernels' SupportLayout of them once the Triton route has run),
    and activation memory per sequence. build(method) -> meta model."""
    n, gb = args.gpus, 1e9
    plans = {}
    for label, method, optimizer, per_layer in (("full + AdamW", "full", "adamw", False),
                                                ("sltrain + AdamW8bit", "sltrain", "adamw8bit", False),
                                                ("sltrain + AdamW8bit + per-layer", "sltrain", "adamw8bit", True)):
        model = build(method)
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        embeddings = model.tok_emb.weight.numel() + model.lm_head.weight.numel()
        indices = sum(4 * m.nnz for m in model.modules() if isinstance(m, SLLinear))
        # kernels.SupportLayout, int32: col_order (nnz,), row_ptr (out+1,), col_ptr (in+1,)
        layout = sum(4 * (m.nnz + m.out_features + m.in_features + 2) for m in model.modules() if isinstance(m, SLLinear))
        width = params[0].element_size()  # --param-dtype: 4 or 2 bytes per weight and per gradient
        weights = width * total / n
        # per-layer: a gradient lives only until its own update, so about one tensor's worth at a time
        grads = width * max(p.numel() for p in params) / n if per_layer else width * total / n
        if optimizer == "adamw":  # torch AdamW keeps m and v in the parameters' dtype
            states = 2 * width * total / n
        else:  # 1 B per moment + an fp32 absmax per 256 (2.03 B/param); embeddings keep fp32 moments
            states = (2 + 8 / 256) * (total - embeddings) / n + 8 * embeddings / n
        plans[label] = round((weights + grads + states + indices + layout) / gb, 2)
    return dict(model_states_gb=plans, activations_gb_per_sequence=activation_plan(args, build(args.method)))


def activation_plan(args, model):
    """Bytes autograd keeps per sequence, measured: one block (and the head) runs forward on the CPU
    under bf16 autocast at two lengths; the difference per token drops the length-independent
    tensors (autocast's weight copies). The block is a dense one of the same shape: SLLinear's
    PyTorch route saves per token exactly what nn.Linear saves (its input), and densifying W on a
    CPU would take minutes. Checkpointing keeps each block's input and recomputes one block at a
    time in backward."""
    def saved_bytes(module, x, fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            fn(module, x.requires_grad_())
        return sum(seen.values())

    def per_token(module, fn, lengths=(16, 32)):
        module.to_empty(device="cpu")
        for m in module.modules():
            init_module(m)
        b = [saved_bytes(module, torch.randn(1, t, model.cfg.dim), fn) for t in lengths]
        module.to_empty(device="meta")
        return (b[1] - b[0]) / (lengths[1] - lengths[0])

    with torch.device("meta"):
        dense_block = Block(model.cfg)
    block = per_token(dense_block, lambda m, x: m(x))
    head = per_token(torch.nn.ModuleDict(dict(norm=model.norm, lm_head=model.lm_head)),
                     lambda m, x: torch.nn.functional.cross_entropy(
                         m["lm_head"](m["norm"](x)).float().flatten(0, 1),
                         torch.zeros(x.shape[1], dtype=torch.long)))
    T, L, residual = args.seq_len, model.cfg.n_layers, 4 * model.cfg.dim  # the residual stream stays fp32
    return {"no checkpointing": round(T * (L * block + head) / 1e9, 3),
            "activation checkpointing": round(T * (L * residual + block + head) / 1e9, 3)}
