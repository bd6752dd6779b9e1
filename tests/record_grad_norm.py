"""Run by tests/test_parallel.py under torchrun: train.py as usual, and rank 0 writes the global norm
of the gradient that reaches optimizer.step (after clipping) to $GRAD_NORMS, one per step. FSDP2
gradients are DTensor shards: the norm is taken over the gathered full tensors, on every rank."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402

norms = []
real_build = train.build_optimizer


def build(model, args):
    opt = real_build(model, args)
    real_step = opt.step

    def step(*a, **k):
        full = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                for p in model.parameters() if p.grad is not None]
        norms.append(sum(g.double().pow(2).sum().item() for g in full) ** 0.5)
        return real_step(*a, **k)
    opt.step = step
    return opt


train.build_optimizer = build
train.main(sys.argv[1:])
if os.environ.get("RANK", "0") == "0":
    with open(os.environ["GRAD_NORMS"], "w") as f:
        json.dump(norms, f)
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo FSDP2 can abort there after a correct run (REFERENCE §6)
