"""checkpoint.consolidate (python -m run.checkpoint) under torchrun, 2 CPU ranks (gloo), against the shards
themselves: model.pt is every rank's local shard put back together, and only rank 0 holds the model
(tests/consolidate_probe.py records the full tensors each rank holds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # a torchrun spawn: not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "tiny", "--vocab-size", "257", "--seq-len", "64", "--dist", "fsdp", "--device", "cpu"]


def test_consolidate_puts_the_shards_together_on_rank0_only(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "consolidate_probe.py"), *FLAGS, "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"shards{rank}.pt", weights_only=True) for rank in (0, 1)]
    full = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    sharded = ranks[0]["shards"]
    assert full.keys() == sharded.keys() | ranks[0]["replicated"].keys() and len(sharded) > 50
    for name, local in sharded.items():  # FSDP2 shards dim 0: rank 0 holds the first rows
        assert torch.equal(full[name], torch.cat([local, ranks[1]["shards"][name]])), name
    for name, value in ranks[0]["replicated"].items():  # buffers: the same on every rank
        assert torch.equal(full[name], value) and torch.equal(value, ranks[1]["replicated"][name]), name

    model_bytes = sum(full[name].nbytes for name in sharded)
    largest = max(full[name].nbytes for name in sharded)
    assert 5 * largest < model_bytes  # a rank that holds the model cannot pass for one holding one tensor
    held = [json.load(open(tmp_path / f"held{rank}.json")) for rank in (0, 1)]
    print(f"\nfull tensors held (bytes): rank 0 {held[0]}, rank 1 {held[1]}; model {model_bytes}, largest {largest}")
    assert held[0]["at_end"] >= model_bytes  # rank 0 writes the whole model
    # rank 1 holds one gathered tensor at a time, two while the previous result is being dropped (when Python
    # frees it is not ours to time): far from the model, which is over 5x the largest tensor (asserted above)
    assert held[1]["gathering"] <= 2 * largest and held[1]["at_end"] <= 2 * largest, held[1]
