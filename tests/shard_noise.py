"""Run by tests/test_parallel.py under torchrun (2 ranks, gloo): one bf16 linear sharded by FSDP2 whose
two shards hold the same values and receive the same gradient, one AdamW8bit step, each rank's shard
saved to $OUT.rank<r>.pt. argv[1]: "torch" (the PyTorch path) or "triton" (the fused kernel, interpreted)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRITON_INTERPRET", "1")  # before optim defines its kernel

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from optim import AdamW8bit  # noqa: E402

dist.init_process_group("gloo")
torch.manual_seed(0)  # every rank alike, as train.py seeds them
layer = torch.nn.Linear(512, 16, bias=False, dtype=torch.bfloat16)  # 8,192 weights: 8-bit state
with torch.no_grad():
    layer.weight.fill_(1.0)  # rows 0-7 (rank 0's shard) equal rows 8-15 (rank 1's)
fully_shard(layer)
layer(torch.ones(4, 512, dtype=torch.bfloat16)).sum().backward()  # every row's gradient is the same
# lr 2e-3: Adam's first step moves each weight by ~lr, about half of bf16's spacing 2^-8 below 1.0,
# so stochastic rounding goes down for about half of the elements and stays at 1.0 for the rest
AdamW8bit(layer.parameters(), lr=2e-3, use_triton=sys.argv[1] == "triton").step()
torch.save(layer.weight.to_local().detach().clone(), f"{os.environ['OUT']}.rank{dist.get_rank()}.pt")
dist.barrier()
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo FSDP2 can abort there after a correct run (REFERENCE §6)
