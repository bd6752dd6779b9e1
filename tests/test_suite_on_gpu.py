"""The suite passes on a GPU as written. Tests that compare a rerun, a resume or a killed run bit for bit,
or a result with a CPU-logged figure at ulp tolerance, run on the CPU on every machine: a GPU's kernels and
random streams differ from the CPU's (its atomics reorder float sums), and a one-GPU machine cannot host
two ranks. Their flag sets must say --device cpu, or on a CUDA machine train.py would take the GPU by
default. Checked here, on any machine, against the flag sets themselves."""
import pytest

import conftest
import test_consolidate
import test_memory
import test_parallel
import test_reliability
import test_run_folder

FLAG_SETS = {  # name: the flags, and what its tests compare
    "conftest.TINY_RUN": conftest.TINY_RUN,  # sample/eval/export against the run's CPU-logged eval
    "test_reliability.SMALL": test_reliability.SMALL,  # resume and refusals, bit for bit
    "test_reliability.FAULT_FLAGS": test_reliability.FAULT_FLAGS,  # kills at any point, then resume, bit for bit
    "test_parallel.COMMON": test_parallel.COMMON,  # 2 gloo ranks against one process
    "test_parallel.BF16": test_parallel.BF16,
    "test_parallel.NAN": test_parallel.NAN,
    "test_run_folder.FLAGS": test_run_folder.FLAGS,  # signals, then resume, bit for bit
    "test_consolidate.FLAGS": test_consolidate.FLAGS,  # 2 gloo ranks
    "test_memory.COMMON": test_memory.COMMON,  # the plan against a CPU run's own tensors and RSS
}


@pytest.mark.parametrize("name", FLAG_SETS)
def test_flag_sets_compared_bit_for_bit_pin_the_cpu(name):
    flags = FLAG_SETS[name]
    assert ["--device", "cpu"] in [flags[i:i + 2] for i in range(len(flags) - 1)], name


@pytest.mark.slow  # collects the whole suite in a subprocess
def test_the_gpu_marker_selects_the_device_tests_and_no_cpu_only_one():
    """`pytest -m gpu` (what benchmarks/gpu_check.py runs in a short GPU window) collects every test that takes the
    `device` fixture, from the kernels, the layer, the model, the loop and the optimizer, and none of the CPU-only
    training tests (each several minutes on a CPU, and pinned to it)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu"], cwd=root,
                         capture_output=True, text=True, timeout=300).stdout
    ids = [line for line in out.splitlines() if "::" in line]
    files = {i.split("::")[0] for i in ids}
    assert {"tests/test_kernels.py", "tests/test_sltrain.py", "tests/test_model.py", "tests/test_loop.py",
            "tests/test_optim.py"} <= files, files
    for cpu_only in ("test_optim.py::test_tiny_model_val_loss_adamw_vs_adamw8bit",
                     "test_loop.py::test_bf16_weights_learn_like_fp32_weights", "test_parallel.py", "test_reliability.py"):
        assert not [i for i in ids if cpu_only in i], cpu_only
