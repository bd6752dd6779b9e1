"""
Everything about a run's folder (--out-dir): writing checkpoints, reading them back, resuming exactly,
and loading a finished run's model and tokenizer. train.py writes; sample.py, eval.py and export.py only read.

A folder holds log.jsonl (one JSON record per line: the config first, then train/eval records) and
  ckpt.pt                           one process or DDP: {model, optimizer, step, config, build, data_meta, rng}
  latest-sharded -> sharded-<step>/rank<r>-of-<N>.pt   FSDP2: one such file per rank, its shards as DTensors
                                    (HSDP: per rank of the first copy, N = --shard-size; every copy loads them)
  model.pt                          a sharded checkpoint gathered into one file by:
    torchrun --nproc_per_node=N -m run.checkpoint --out-dir RUN      (from the repository's folder)
`build` rebuilds the model (model.build_model): the model config (model.py) and the SL settings (sltrain.py). Every file is
written to <name>.tmp, flushed to disk, renamed over <name> and the rename flushed (the directory): after a
crash at any moment <name> holds the old content or the new. A sharded checkpoint's pointer is replaced
only after every rank has written, and a killed run's leftovers (*.tmp, sharded folders the pointer does
not name) are removed at the next start. A running train.py holds .lock: one run per folder.
"""
import argparse
import errno
import fcntl
import json
import logging
import os
import random
import shutil
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from data.prepare import OfflineError, atomic_write, fsync_dir, get_encoding
from model import Rotary, build_model
from run import parallel

# --resume continues a run exactly; these must equal the checkpoint's (run/flags.RESUME_HELP)
MODEL_KEYS = ("model", "method", "rank", "delta", "alpha", "vocab_size", "seq_len", "seed")
RUN_KEYS = ("param_dtype", "dtype", "batch_size", "grad_accum", "world_size", "optimizer", "per_layer", "dist",
            "shard_size", "sparse_lr_ratio")
SAVED_BEFORE = dict(sparse_lr_ratio=1.0, shard_size=None)  # what a checkpoint written before a key existed ran with
SCHEDULE_KEYS = ("lr", "max_steps", "warmup", "grad_clip")  # these may change: the schedule changes


# -----------------------------------------------------------------------------
# writing


def remove_stale(out_dir):
    """Rank 0 removes what a killed run left half-written: *.tmp files and folders, and sharded-* folders
    latest-sharded does not name (never pointed to, or the previous one, about to go). The others wait."""
    if parallel.is_rank0():
        pointer = os.path.join(out_dir, "latest-sharded")
        current = open(pointer).read().strip() if os.path.exists(pointer) else None
        for name in os.listdir(out_dir):  # not dotfiles: an export's staging folder (export.py) may be one
            path = os.path.join(out_dir, name)
            if not name.startswith(".") and (name.endswith(".tmp") or name.startswith("sharded-") and name != current):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    parallel.barrier()


def save_sharded(out_dir, state, step):
    """Each rank of the first copy writes its shard file (FSDP2 has one copy; HSDP's others hold the same)."""
    rank = dist.get_rank()
    replica, shard, _, shards = parallel.shard_of_rank()
    final = os.path.join(out_dir, f"sharded-{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    if replica == 0:
        with open(os.path.join(tmp, f"rank{shard}-of-{shards}.pt"), "wb") as f:
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


def save(args, model, optimizer, step, build, meta):
    """The whole training state at `step`: everything --resume needs to continue bit for bit."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, config=vars(args),
                 build=build, data_meta=meta,  # the step and config fix the data position and the model
                 rng=dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                          cuda=torch.cuda.get_rng_state(args.device) if args.device.startswith("cuda") else None))
    if args.dist in parallel.SHARDED:
        parallel.check_replicas(model)  # HSDP saves one copy: the others must equal it
        return save_sharded(args.out_dir, state, step)
    if parallel.is_rank0():
        atomic_write(os.path.join(args.out_dir, "ckpt.pt"), lambda f: torch.save(state, f))
    parallel.barrier()


# -----------------------------------------------------------------------------
# one run per folder

_LOCK = None  # the open .lock file of this process's run: closing it releases the lock


def unlock():
    global _LOCK
    if _LOCK is not None:
        _LOCK.close()
    _LOCK = None


NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # NFS without lockd, Lustre mounted noflock, ...


def lock(out_dir):
    """Take out_dir/.lock, an OS lock (flock) held while this process lives and released by the kernel
    when it ends, kill -9 included, so it is never stale. It records "PID on HOST": on a shared filesystem the
    holder may run on another node. -> None, or why another process holds it. A filesystem without locks
    gets one warning line, and the run goes on unguarded."""
    global _LOCK
    unlock()  # this process's previous run, if any (main() called again, as tests do)
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return (f"--out-dir {out_dir} is in use by another train.py (PID {holder}): wait for it to finish or stop "
                f"it, or pass another --out-dir")
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        print(f"warning: --out-dir {out_dir} is on a filesystem without file locks ({errno.errorcode[e.errno]}): a "
              f"second run into this folder would not be stopped; this one goes on", file=sys.stderr)
    f.seek(0), f.truncate(), f.write(f"{os.getpid()} on {socket.gethostname()}"), f.flush()
    _LOCK = f
    return None


# -----------------------------------------------------------------------------
# resuming


def has_checkpoint(out_dir):
    return any(os.path.exists(os.path.join(out_dir, n)) for n in ("ckpt.pt", "latest-sharded"))


def sharded_path(out_dir):
    """This rank's file of the newest sharded checkpoint (rank<s>-of-<N>.pt, s its shard: only the layout that
    wrote it resumes), or None."""
    pointer = os.path.join(out_dir, "latest-sharded")
    if not os.path.exists(pointer):
        return None
    _, shard, _, shards = parallel.shard_of_rank()
    return os.path.join(out_dir, open(pointer).read().strip(), f"rank{shard}-of-{shards}.pt")


def checkpoint_path(args):
    if args.dist in parallel.SHARDED:
        return sharded_path(args.out_dir) or os.path.join(args.out_dir, "latest-sharded")
    return os.path.join(args.out_dir, "ckpt.pt")


def differences(state, args, meta, whole_run):
    """What differs between the checkpoint's run and this one that would break an exact resume."""
    saved = {**SAVED_BEFORE, **state["config"]}
    found = [f"{'the number of ranks' if k == 'world_size' else '--' + k.replace('_', '-')} {saved[k]} (now "
             f"{getattr(args, k)})" for k in MODEL_KEYS + (RUN_KEYS if whole_run else ()) if saved[k] != getattr(args, k)]
    was, now = ({k: v for k, v in m.items() if k != "seconds"} for m in (state["data_meta"], meta))
    return found + [f"the data's {k} {was.get(k)} (now {now.get(k)})" for k in sorted(was.keys() | now.keys())
                    if whole_run and was.get(k) != now.get(k)]  # the same meta.json at another path is the same


def resume(args, model, optimizer, meta):
    """Load --out-dir's checkpoint into model and optimizer, restore the random streams, return its step;
    refused on every rank together when it would not continue exactly."""
    path, state, error = checkpoint_path(args), None, None
    if not os.path.exists(path):
        error = (f"--resume but no checkpoint at {path}: leave out --resume to start fresh, or point --out-dir at "
                 f"the run to continue (a sharded checkpoint resumes only on the number of ranks that wrote it).")
    else:
        try:  # to the CPU, so the device never holds the checkpoint beside the state it loads into;
            # FSDP2's DTensors load where their device mesh lives (each rank holds 1/N anyway). HSDP's other
            # copies read the first copy's files, whose pickled meshes are this rank's mesh too; torch warns
            # that such a mesh lacks its groups, which matters only to torch.compile: silenced
            logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
            state = torch.load(path, map_location=args.device if args.dist in parallel.SHARDED else "cpu",
                               weights_only=False)
        except Exception as e:
            error = (f"the checkpoint {path} is unreadable ({type(e).__name__}: {e}). It is corrupt or truncated: "
                     f"restore a copy, or move it away and start fresh without --resume.")
    found = differences(state, args, meta, whole_run=True) if state is not None else []
    if found:
        error = (f"the checkpoint {path} was written by another run, and resuming it with these flags would not "
                 f"continue it exactly: {'; '.join(found)}. Resume with the checkpoint's settings, or use another "
                 f"--out-dir for a new run (train.py --help: what may change).")
    parallel.exit_together(error, args.device)  # a rank that failed alone would leave the others waiting
    if not args.lr_given:  # the run's lr, even if the default changed since
        args.lr = state["config"]["lr"]
    for k in SCHEDULE_KEYS if parallel.is_rank0() else ():
        if state["config"][k] != getattr(args, k):
            print(f"note: --{k.replace('_', '-')} is {getattr(args, k)}, the checkpoint's run had "
                  f"{state['config'][k]}: the schedule changes from step {state['step']} on")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"].cpu())  # RNG states live on the CPU whatever map_location said
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and args.device.startswith("cuda"):  # this rank's GPU: DDP replicas draw
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), args.device)  # alike, rank 0's stands for all
    return state["step"]


# -----------------------------------------------------------------------------
# reading a finished run (sample.py, eval.py, export.py: one process, no torchrun)


def read_log(path):
    """The records of a log.jsonl. A line that is not one JSON record (torn by a kill, or two records
    merged by two writers) is named in one line on stderr and skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
                records.append(record)
            except ValueError:
                if line.strip():
                    print(f"note: {path} line {n} is not one JSON record (torn or merged): skipped", file=sys.stderr)
    return records


def safe_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        sys.exit(f"error: the checkpoint {path} is unreadable ({type(e).__name__}): it is corrupt or truncated")


def read_sharded(out_dir, pointer):
    """Join the N rank files of an FSDP2 checkpoint into one state, in one process: FSDP2 shards every
    parameter along dim 0 into N chunks (torch.chunk: the last may be short or empty), so the local pieces
    in rank order concatenate to the full tensor. Buffers (the supports) are the same on every rank."""
    folder = os.path.join(out_dir, open(pointer).read().strip())
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not names or not names[0].startswith("rank"):
        sys.exit(f"error: {pointer} points to {folder}, which holds no rank files: the checkpoint is incomplete")
    world = int(names[0].split("-of-")[1].split(".")[0])
    pieces, state = {}, None
    # unpickling a DTensor rebuilds its device mesh without a process group: torch logs a warning
    # that matters only to torch.compile; we only read the local tensors
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    for r in range(world):
        path = os.path.join(folder, f"rank{r}-of-{world}.pt")
        if not os.path.exists(path):
            sys.exit(f"error: {path} is missing: a sharded checkpoint needs all {world} rank files")
        state = safe_load(path)
        for k, v in state.pop("model").items():
            pieces.setdefault(k, []).append(v)
        state.pop("optimizer")  # not needed: one rank's file at a time
    full = {}
    for k, vs in pieces.items():
        if not isinstance(vs[0], DTensor):
            full[k] = vs[0]
            continue
        placement = vs[0].placements[-1]  # HSDP: (Replicate(), Shard(0)) on its (copies, shards) mesh
        if isinstance(placement, Shard):
            full[k] = torch.cat([v.to_local() for v in vs], dim=placement.dim)
        else:  # replicated: every rank holds all of it
            full[k] = vs[0].to_local()
        if full[k].shape != vs[0].shape:
            sys.exit(f"error: the shards of {k} in {folder} join to {tuple(full[k].shape)}, not {tuple(vs[0].shape)}")
    return dict(state, model=full), folder


def read_checkpoint(out_dir):
    """-> (state, on the CPU, and its path): ckpt.pt first, then the newest sharded checkpoint, then model.pt."""
    if not os.path.isdir(out_dir):
        sys.exit(f"error: no run at {out_dir}: --out-dir must be a folder train.py wrote")
    single, pointer, gathered = (os.path.join(out_dir, n) for n in ("ckpt.pt", "latest-sharded", "model.pt"))
    if os.path.exists(single):
        return safe_load(single), single
    if os.path.exists(pointer):
        return read_sharded(out_dir, pointer)
    if os.path.exists(gathered):
        return safe_load(gathered), gathered
    sys.exit(f"error: no checkpoint in {out_dir} (no ckpt.pt, latest-sharded or model.pt): a run writes one at "
             f"every eval, so train at least --eval-every steps")


def load_model(out_dir, device="cpu"):
    """The run's model on `device`, in eval mode, exactly as train.py built it (model(ids) gives the
    training logits): any method, a single, sharded or gathered checkpoint. model.train_config holds
    the run's flags (a dict) and model.checkpoint the path read."""
    state, path = read_checkpoint(out_dir)
    model = build_model(**state["build"])
    model.to_empty(device=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        sys.exit(f"error: {path} does not fit the model its config describes: {str(e).splitlines()[0]}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Rotary):  # the RoPE tables are not saved: recompute them
                module.reset_parameters()
    model.train_config, model.checkpoint = state["config"], path
    return model.eval()


def load_tokenizer(out_dir, config):
    """The tiktoken encoding the run's data was prepared with."""
    name = run_data_meta(out_dir, config)["tokenizer"]
    try:
        return get_encoding(name)
    except (OfflineError, ValueError) as e:
        sys.exit(f"error: the run's tokenizer {name!r} cannot be loaded: {e}")


def run_data_meta(out_dir, config):
    """The meta.json of the data the run trained on (tokenizer, vocab_size, eot_token): log.jsonl's
    config record keeps a copy (data_meta), else the data folder's own file is read."""
    meta, log = None, os.path.join(out_dir, "log.jsonl")
    for record in read_log(log) if os.path.exists(log) else []:
        if record.get("type") == "config" and "data_meta" in record:
            meta = record["data_meta"]
    path = os.path.join(config.get("data") or "", "meta.json")
    if meta is None and os.path.exists(path):
        meta = json.load(open(path))
    if meta is None or "tokenizer" not in meta:
        sys.exit(f"error: {out_dir} does not say which tokenizer its data used (no config record in its log.jsonl, "
                 f"no {path}): copy the run's log.jsonl beside its checkpoint")
    return meta


# -----------------------------------------------------------------------------
# gathering a sharded checkpoint into one file: torchrun --nproc_per_node=N -m run.checkpoint --out-dir RUN


def consolidate(out_dir, model, state):
    """Gather the sharded weights into one ordinary state dict, <out-dir>/model.pt, on rank 0's host. Every rank
    joins each full_tensor() collective; the others drop the result at once (7b, bf16, 8 ranks: 6.3 GB, not 50)."""
    full, rank0 = {}, dist.get_rank() == 0
    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        if rank0:
            full[name] = value.cpu()
    if rank0:
        path = os.path.join(out_dir, "model.pt")
        atomic_write(path, lambda f: torch.save(dict(model=full, config=state["config"], build=state["build"],
                                                     step=state["step"]), f))
        print(f"wrote {path}: step {state['step']}, {sum(v.numel() for v in full.values()) / 1e6:.2f}M values")


def main(argv=None):
    p = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m run.checkpoint", description=(
        "Gather a run's FSDP2 checkpoint (one shard file per rank) into one <out-dir>/model.pt that sample.py, eval.py\n"
        "and export.py read. Run it from the repository's folder, with as many ranks as trained the run\n"
        "(FSDP2: one per shard file; HSDP: every copy's ranks, as in training)."),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True, help="the folder of a run trained with --dist fsdp or hsdp")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.out_dir, "latest-sharded")):
        p.error(f"--out-dir {args.out_dir}: holds no sharded checkpoint (latest-sharded): nothing to gather")
    if "LOCAL_RANK" not in os.environ:
        p.error("runs under torchrun, one rank per shard file: torchrun --nproc_per_node=N -m run.checkpoint --out-dir RUN")
    log = os.path.join(args.out_dir, "log.jsonl")
    configs = [r for r in read_log(log) if r.get("type") == "config"] if os.path.exists(log) else []
    trained = configs[-1] if configs else {}  # the layout that wrote the shards (no log: FSDP2 on every rank)
    dist_mode = "hsdp" if trained.get("dist") == "hsdp" else "fsdp"
    shard_size = trained.get("shard_size")
    world, trained_world = int(os.environ.get("WORLD_SIZE", "1")), trained.get("world_size")
    if dist_mode == "hsdp" and world != trained_world:
        p.error(f"--out-dir {args.out_dir} was trained with --dist hsdp on {trained_world} ranks ({shard_size} per "
                f"copy): gather it on as many, torchrun --nproc_per_node=... -m run.checkpoint (now {world})")
    run = argparse.Namespace(dist=dist_mode, shard_size=shard_size, device=args.device, activation_checkpointing=False,
                             compile=False, seed=0)
    parallel.setup(run)  # torchrun's process group, the mesh that wrote the shards (the weights are loaded below)
    path = sharded_path(args.out_dir)
    parallel.exit_together(None if os.path.exists(path) else f"{path} is missing: the sharded checkpoint is "
                           f"incomplete, or it was written by another number of ranks", run.device)
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)  # as in resume()
    state = torch.load(path, map_location=run.device, weights_only=False)
    model, _ = parallel.parallelize(build_model(**state["build"]), run, lambda: build_model(**state["build"]), load=True)
    model.load_state_dict(state.pop("model"))
    consolidate(args.out_dir, model, state)  # rank 0 writes model.pt after the last collective
    sys.stdout.flush()
    # no barrier, no teardown: ranks waiting in one while rank 0 writes 14-28 GB (7b) would hit the collective
    # timeout; every rank is done with the others here. os._exit also skips interpreter teardown, where gloo
    # FSDP2 can abort after a correct run.
    os._exit(0)


if __name__ == "__main__":
    main()
