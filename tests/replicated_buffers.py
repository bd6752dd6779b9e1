"""Run by tests/test_parallel.py under torchrun: parallel.check_replicated_buffers passes when every
rank drew the same support and raises when one rank used another seed."""
import sys

import torch
import torch.distributed as dist

from run import parallel
from sltrain import SLLinear

dist.init_process_group("gloo")
same = torch.nn.Sequential(SLLinear(64, 48, 8, 0.05, alpha=8.0, seed=1))
parallel.check_replicated_buffers(same)
other = torch.nn.Sequential(SLLinear(64, 48, 8, 0.05, alpha=8.0, seed=1 + dist.get_rank()))
try:
    parallel.check_replicated_buffers(other)
    sys.exit("a different support on rank 1 was not caught")
except RuntimeError as e:
    assert "differs between ranks" in str(e)
dist.destroy_process_group()
print("replicated-buffer check ok")
