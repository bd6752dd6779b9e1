"""Run by tests/test_parallel.py under torchrun: train.py as usual, then every rank saves the weights
it holds to <--out-dir>/replica<rank>.pt (train.py's checkpoint has rank 0's only)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402

model = train.main(sys.argv[1:])
out_dir = sys.argv[sys.argv.index("--out-dir") + 1]
torch.save(model.state_dict(), os.path.join(out_dir, f"replica{os.environ['RANK']}.pt"))
sys.stdout.flush()
os._exit(0)  # skip interpreter teardown: gloo can abort there after a correct run (REFERENCE §6)
