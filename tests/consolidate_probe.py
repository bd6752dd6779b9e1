"""Run by tests/test_consolidate.py under torchrun: an FSDP2 model built and initialised as train.py does
it (train.py's flags), each rank's local shards saved to <--out-dir>/shards<rank>.pt, then
checkpoint.consolidate. Each rank writes <--out-dir>/held<rank>.json: the bytes of full (unsharded)
tensors it held, at most while gathering (the results of full_tensor() still alive after each call)
and at the end (every live tensor of a full parameter's shape, found by the garbage collector: on rank 0
as it writes model.pt, on the others when consolidate returns)."""
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.multiprocessing.reductions import StorageWeakRef  # noqa: E402

from run import checkpoint  # noqa: E402
from run import parallel  # noqa: E402
import train  # noqa: E402

args = train.get_args(sys.argv[1:])
rank, _ = parallel.setup(args)
model, _ = parallel.parallelize(train.build_model(args, args.vocab_size), args,
                                lambda: train.build_model(args, args.vocab_size))
state = model.state_dict()
torch.save(dict(shards={k: v.to_local().clone() for k, v in state.items() if isinstance(v, DTensor)},
                replicated={k: v.clone() for k, v in state.items() if not isinstance(v, DTensor)}),
           os.path.join(args.out_dir, f"shards{rank}.pt"))
full_shapes = {(tuple(v.shape), v.dtype) for v in state.values() if isinstance(v, DTensor)}
del state

gathered, held = [], dict(gathering=0, at_end=0)  # weak references to full_tensor()'s results; peak bytes
real_full_tensor = DTensor.full_tensor


def full_tensor(self, *args, **kwargs):
    out = real_full_tensor(self, *args, **kwargs)
    gathered.append((StorageWeakRef(out.untyped_storage()), out.untyped_storage().nbytes()))
    held["gathering"] = max(held["gathering"], sum(n for ref, n in gathered if not ref.expired()))
    return out


def measure_at_end():
    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, DTensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if (tuple(t.shape), t.dtype) in full_shapes}
    held["at_end"] = sum(storages.values())


real_atomic_write = checkpoint.atomic_write


def atomic_write(*args, **kwargs):  # rank 0, about to write model.pt: everything it gathered is alive
    measure_at_end()
    return real_atomic_write(*args, **kwargs)


DTensor.full_tensor, checkpoint.atomic_write = full_tensor, atomic_write
checkpoint.consolidate(args.out_dir, model, dict(config=vars(args), build=model.build, step=0))
if rank != 0:
    measure_at_end()
with open(os.path.join(args.out_dir, f"held{rank}.json"), "w") as f:
    json.dump(held, f)
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo FSDP2 can abort there after a correct run (REFERENCE §6)
