"""Every Triton kernel compiles for the GPUs the project targets, checked on any machine.

`python kernels.py --compile-report` compiles ahead of time for sm_80 (A100) and sm_90 (H100), no
GPU needed; it runs in a subprocess because conftest.py turns the interpreter on in this one.
"""
import json
import os
import re
import subprocess
import sys

import pytest

import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"kernel", "arch", "dtype", "registers", "spills", "shared_bytes", "occupancy"}
TRAINING_DTYPES = ("bf16", "bf16/fp32", "fp32")  # fp64 runs only in tests


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "kernels.py", "--compile-report"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def jit_kernels(path):
    """Names of the launched Triton kernels defined in a file (helpers called from them excluded)."""
    return set(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", open(os.path.join(ROOT, path)).read()))


def test_every_kernel_compiles_for_both_archs_without_spills(report):
    assert all(set(row) == KEYS for row in report)
    reported = {row["kernel"].split("[")[0] for row in report}
    assert reported == jit_kernels("kernels.py") | jit_kernels("optim.py")
    archs = {}
    for row in report:
        archs.setdefault((row["kernel"], row["dtype"]), set()).add(row["arch"])
    assert all(a == {80, 90} for a in archs.values()), archs
    assert [row for row in report if row["spills"]] == []


def test_sparse_kernels_fit_128_registers_on_sm90(report):
    rows = [r for r in report if r["arch"] == 90 and r["dtype"] in TRAINING_DTYPES and "mm_kernel" in r["kernel"]]
    assert len(rows) == 3 * len(TRAINING_DTYPES) - 1  # spmm y, spmm dx, sddmm (not launched as bf16/fp32)
    assert max(r["registers"] for r in rows) <= 128, rows


def test_occupancy_follows_the_sm_rules():
    # registers round up to 8 per thread (256 per warp); 65,536 per SM
    assert kernels.occupancy(157, 9216, 4, 90) == 12 / 64  # 160 x 32 x 4 = 20,480 per block: 3 blocks
    assert kernels.occupancy(233, 1280, 4, 90) == 8 / 64  # 240: 2 blocks
    assert kernels.occupancy(72, 5120, 4, 90) == 28 / 64  # 72: 7 blocks
    assert kernels.occupancy(255, 0, 8, 80) == 8 / 64  # 256 x 32 x 8 = 65,536: 1 block
    assert kernels.occupancy(100, 0, 1, 90) == 19 / 64  # 104 x 32 = 3,328 per warp: 19 (not 20) warps
    assert kernels.occupancy(16, 0, 4, 90) == 1.0  # 32 blocks of 4 warps: the 64-warp limit
    assert kernels.occupancy(16, 0, 1, 90) == 0.5  # 32 blocks of 1 warp: the 32-block limit
    assert kernels.occupancy(32, 80 * 1024, 4, 80) == 8 / 64  # shared: 164 KB / 81 KB = 2 blocks on an A100
    assert kernels.occupancy(32, 80 * 1024, 4, 90) == 8 / 64  # 228 KB / 81 KB = 2 on an H100
    assert kernels.occupancy(32, 60 * 1024, 4, 90) == 12 / 64  # 228 / 61 = 3 on an H100, 164 / 61 = 2 on an A100
    assert kernels.occupancy(32, 60 * 1024, 4, 80) == 8 / 64
    assert kernels.occupancy(32, 57 * 1024, 4, 90) == 12 / 64  # 57 KB + the 1 KB CUDA reserves: 3 blocks, not 4


# sddmm's compiled atomics, per launch dtype: PTX names the memory order in each atom/red instruction
SDDMM_ATOMICS = r"""
import json, re, triton, kernels
from triton.backends.compiler import GPUTarget
for name, dtype, fn, types, constexprs, num_warps in kernels.launches():
    if fn is kernels.sddmm_kernel:
        signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
        k = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps))
        print(json.dumps([dtype, re.findall(r"\b(?:atom|red)\.[\w.]+", k.asm["ptx"])]))
"""


def test_sddmm_adds_with_relaxed_atomics_on_sm90():
    """Programs over different token ranges only sum into dvalues: relaxed atomics, not Triton's default
    acq_rel, which fences the memory system at every add."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SDDMM_ATOMICS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    atomics = dict(json.loads(line) for line in out.stdout.splitlines())
    assert set(atomics) == {"bf16", "fp32", "fp64"}, atomics
    for dtype, instructions in atomics.items():
        relaxed = all(".relaxed." in i and "acq_rel" not in i for i in instructions)
        assert instructions and relaxed, (dtype, instructions)
