"""
Everything in nano-sltrain that knows about ranks. train.py calls it; model.py, sltrain.py and
optim.py stay single-device code that happens to work sharded.

    torchrun --nproc_per_node=8 train.py --model 350m --dist ddp     # replicas + gradient all-reduce
    torchrun --nproc_per_node=8 train.py --model 7b --dist fsdp      # FSDP2: every block sharded
    torchrun --nnodes=4 --nproc_per_node=8 ... --dist hsdp            # shard in a node, replicate across

DDP keeps a full replica per GPU. FSDP2 (`fully_shard` on each block, then the root) keeps 1/N of
every parameter, gradient and optimizer state per GPU, all-gathers a block's weights (in bf16)
just before it runs and reduce-scatters its gradients (in fp32) right after. SLTrain's A, B and
values shard like any parameter; the support `indices` are buffers, so every rank holds all of
them, drawn from the same per-layer seed.

HSDP is FSDP2 on a 2-D mesh (replicas x shard group): each group of --shard-size ranks (default: one
node's, LOCAL_WORLD_SIZE) holds one sharded copy, so the all-gathers and reduce-scatters stay inside a
node, and only the gradient shards are all-reduced across the copies (one per node), not every weight.

Checkpoints, sharded ones included, live in run/checkpoint.py; the memory plan in run/memory.py.
"""
import os
import sys
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from model import Rotary, init_module

SHARDED = ("fsdp", "hsdp")  # the --dist modes whose checkpoints are one file per shard
_MESH = None  # HSDP's (replicate, shard) device mesh; FSDP2 uses its default, every rank in one shard group


def default_dist(world, model):
    """--dist when not given: none in one process; under torchrun DDP replicas for the sizes whose
    replica and AdamW states fit one GPU, FSDP2 shards for 1b and 7b."""
    return "none" if world == 1 else ("fsdp" if model in ("1b", "7b") else "ddp")


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
    if args.dist == "hsdp":
        global _MESH
        _MESH = init_device_mesh(torch.device(args.device).type, (world // args.shard_size, args.shard_size),
                                 mesh_dim_names=("replicate", "shard"))
    return dist.get_rank(), dist.get_world_size()


def shard_of_rank():
    """(replica, shard, replicas, shards) of this rank: which copy it is in and which shard of it it holds.
    FSDP2: one copy of world shards; HSDP: the mesh's coordinate."""
    if _MESH is not None:
        (replica, shard), (replicas, shards) = _MESH.get_coordinate(), _MESH.shape
        return replica, shard, replicas, shards
    return 0, dist.get_rank(), 1, dist.get_world_size()


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


def parallelize(model, args, make_meta_model, load=False):
    """A model built on the meta device -> materialised, initialised, wrapped for --dist: returns (model
    to call, the unwrapped model). make_meta_model() builds the same model again on the meta device;
    FSDP2 initialisation draws from it one module at a time. load: a checkpoint's weights and supports are
    loaded next (--resume, consolidation), so only what no checkpoint holds, the RoPE tables, is computed:
    no support is drawn only to be overwritten (224 of them, about a minute, at 7b)."""
    for block in model.blocks:
        if args.activation_checkpointing:  # keep only each block's input; recompute the rest in backward
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile:
            block.compile()
    if args.dist in SHARDED:
        # Weights are all-gathered as stored (--param-dtype) and bf16 compute comes from train.py's
        # autocast, exactly as in one process and DDP. A bf16 param_dtype here would also cast every
        # block's input, making the residual stream bf16 under FSDP2 only (another model: the losses
        # differed by 3e-4 at step 1 on the tiny model); with fp32 weights it costs 2x the all-gather
        # bytes, which --param-dtype bfloat16 (the paper's recipe) halves again. Gradients reduce in fp32.
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=_MESH, mp_policy=mp)
        fully_shard(model, mesh=_MESH, mp_policy=mp)
        model.to_empty(device=args.device)
        if load:
            compute_unsaved(model)
            return model, model  # the supports come from the rank files, all written from the same buffers
        init_sharded(model, make_meta_model(), args.seed, args.device)
        check_replicated_buffers(model)
        check_replicas(model)
        return model, model
    model.to_empty(device=args.device)
    if load:
        compute_unsaved(model)
    else:
        model.init_weights(seed=args.seed)
    if args.dist == "ddp":
        if not load:  # loaded buffers come from one checkpoint file, the same on every rank
            check_replicated_buffers(model)
        # buffers (RoPE tables, the supports) are identical and never change: no per-forward broadcast
        return DistributedDataParallel(model, device_ids=[torch.device(args.device).index]
                                       if args.device.startswith("cuda") else None, broadcast_buffers=False), model
    return model, model


@torch.no_grad()
def compute_unsaved(model):
    """What a checkpoint does not hold: the RoPE tables (non-persistent buffers, a function of the config)."""
    for module in model.modules():
        if isinstance(module, Rotary):
            module.reset_parameters()


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


@torch.no_grad()
def check_replicas(model):
    """HSDP: every copy must hold the same shards (only the first copy's are saved). They start equal and get
    equal gradients, so they stay equal only if every update is the same on every copy: stochastic rounding
    draws per shard, never per rank (optim.shard_rank). Compares checksums across the copies; run at init
    and at every checkpoint."""
    if _MESH is None or _MESH.shape[0] == 1:
        return
    names, sums = [], []
    for name, p in model.named_parameters():  # sums in float64 without a float64 copy of the shard
        local = p.to_local()
        names.append(name)
        sums += [local.sum(dtype=torch.float64), torch.linalg.vector_norm(local, dtype=torch.float64)]
    lo, hi = torch.stack(sums), torch.stack(sums)  # two collectives for the whole model
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=_MESH.get_group("replicate"))
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=_MESH.get_group("replicate"))
    same = torch.isclose(lo, hi, rtol=0, atol=0, equal_nan=True).view(-1, 2).all(dim=1)
    differ = [name for name, ok in zip(names, same.tolist()) if not ok]
    # the ranks of the other shards may hold equal copies: every rank learns of a drift, so none waits alone
    any_differ = all_reduce_sum(torch.tensor([len(differ)], device=lo.device))
    if any_differ.item():
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        where = differ[0] + more if differ else "another shard's parameters"
        raise RuntimeError(f"HSDP copies of {where} differ: the replicas of a shard must update alike "
                           f"(stochastic rounding seeded by the shard, not the rank)")


def no_sync(model, args, last_micro_step):
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-step."""
    if args.dist in SHARDED:
        model.set_requires_gradient_sync(last_micro_step)
    elif args.dist == "ddp" and not last_micro_step:
        return model.no_sync()
    return torch.enable_grad()  # a context that changes nothing
