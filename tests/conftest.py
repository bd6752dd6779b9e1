import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Without a GPU the Triton kernels run through the interpreter; it must be switched on before
# kernels.py is imported (the @triton.jit decorators read it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """The tests that take the `device` fixture are the ones a GPU runs on the GPU: marked `gpu`, so
    `pytest -m gpu` (benchmarks/gpu_check.py) selects them and nothing CPU-only."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def device():
    """Where tests put models and tensors: "cuda" on a GPU machine (Triton kernels compiled), else
    "cpu" (Triton kernels interpreted). Build every tensor a test feeds to a model or kernel on it."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small offline data set (the first ~1 MB of the stdlib), prepared once for the whole run."""
    from data.prepare import prepare_stdlib
    path = str(tmp_path_factory.mktemp("data") / "stdlib")
    prepare_stdlib(path, max_bytes=1_000_000)
    return path


# the flags of a quick tiny run: a few steps, one eval and checkpoint at the end. On the CPU on every
# machine: tests compare it with 2-rank gloo runs (a one-GPU machine cannot host two NCCL ranks).
TINY_RUN = ["--model", "tiny", "--seq-len", "64", "--batch-size", "4", "--max-steps", "3", "--eval-every", "3",
            "--eval-tokens", "2048", "--log-every", "1", "--grad-accum", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_run(data_dir, tmp_path_factory):
    """tiny_run(method) -> the folder of a 3-step train.py run of that method (made once per session)."""
    import train
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"run-{method}")
            train.main(TINY_RUN + ["--method", method, "--data", data_dir, "--out-dir", str(out)])
            runs[method] = str(out)
        return runs[method]
    return get
