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
