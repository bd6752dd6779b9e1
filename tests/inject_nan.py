"""Run by tests/test_parallel.py, under torchrun or alone: train.py, with a NaN put into one element of
the gradient that flows back into block 0's MLP output, for one sequence of the global batch
($NAN_ROW) at one step ($NAN_STEP, counted from 1; --grad-accum 1). The loss stays finite and the run
goes on: what the NaN does is up to the optimizer's skip. It reaches some gradients in every row
(B, A) and others in a few rows only (S's values, w_down's B rows), which FSDP2 shards by row."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402

STEP, ROW, RANK = int(os.environ["NAN_STEP"]), int(os.environ["NAN_ROW"]), int(os.environ.get("RANK", "0"))
real_build = train.build_optimizer


def build(model, args):
    forwards = []

    def poison(module, inputs, out):
        if not out.requires_grad:  # an eval forward
            return
        forwards.append(1)
        row = ROW - RANK * args.batch_size  # ranks hold consecutive rows of the global batch
        if len(forwards) == STEP and 0 <= row < out.shape[0]:
            out.register_hook(lambda g: g.index_put((torch.tensor([row]), torch.tensor([0]), torch.tensor([0])),
                                                    torch.tensor(float("nan"), device=g.device)))
    model.blocks[0].mlp.register_forward_hook(poison)
    return real_build(model, args)


train.build_optimizer = build
if os.environ.get("OPTIM_ALL_REDUCES"):  # count the all-reduces the optimizer launches (its skip flags)
    real_all_reduce, calls = torch.distributed.all_reduce, []

    def counting(*args, **kwargs):
        calls.extend(["optim"] if sys._getframe(1).f_code.co_filename.endswith("optim.py") else [])
        return real_all_reduce(*args, **kwargs)
    torch.distributed.all_reduce = counting
train.main(sys.argv[1:])
if os.environ.get("OPTIM_ALL_REDUCES"):
    with open(f"{os.environ['OPTIM_ALL_REDUCES']}.rank{RANK}", "w") as f:
        f.write(str(len(calls)))
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo FSDP2 can abort there after a correct run (REFERENCE §6)
