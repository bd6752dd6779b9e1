"""Every Triton kernel compiles for the GPUs the project targets, checked on any machine.

`python benchmarks/compile_report.py` compiles ahead of time for sm_80 (A100) and sm_90 (H100), no
GPU needed; it runs in a subprocess because conftest.py turns the interpreter on in this one.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # ahead-of-time GPU compiles of every kernel: not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compile_report  # noqa: E402
KEYS = {"kernel", "arch", "dtype", "registers", "spills", "shared_bytes", "occupancy"}
TRAINING_DTYPES = ("bf16", "bf16/fp32", "fp32")  # fp64 runs only in tests


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "benchmarks/compile_report.py"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def jit_kernels(path):
    """Names of the launched Triton kernels defined in a file (helpers called from them excluded)."""
    return set(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", open(os.path.join(ROOT, path)).read()))


def test_every_kernel_compiles_for_both_archs_without_spills(report):
    assert all(set(row) == KEYS for row in report)
    reported = {row["kernel"].split("[")[0] for row in report}
    assert reported == jit_kernels("kernels.py")
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
    assert compile_report.occupancy(157, 9216, 4, 90) == 12 / 64  # 160 x 32 x 4 = 20,480 per program: 3 programs
    assert compile_report.occupancy(233, 1280, 4, 90) == 8 / 64  # 240: 2 programs
    assert compile_report.occupancy(72, 5120, 4, 90) == 28 / 64  # 72: 7 programs
    assert compile_report.occupancy(255, 0, 8, 80) == 8 / 64  # 256 x 32 x 8 = 65,536: 1 program
    assert compile_report.occupancy(100, 0, 1, 90) == 19 / 64  # 104 x 32 = 3,328 per warp: 19 (not 20) warps
    assert compile_report.occupancy(16, 0, 4, 90) == 1.0  # 32 programs of 4 warps: the 64-warp limit
    assert compile_report.occupancy(16, 0, 1, 90) == 0.5  # 32 programs of 1 warp: the 32-program limit
    assert compile_report.occupancy(32, 80 * 1024, 4, 80) == 8 / 64  # shared: 164 KB / 81 KB = 2 programs on an A100
    assert compile_report.occupancy(32, 80 * 1024, 4, 90) == 8 / 64  # 228 KB / 81 KB = 2 on an H100
    assert compile_report.occupancy(32, 60 * 1024, 4, 90) == 12 / 64  # 228 / 61 = 3 on an H100, 164 / 61 = 2 on an A100
    assert compile_report.occupancy(32, 60 * 1024, 4, 80) == 8 / 64
    assert compile_report.occupancy(32, 57 * 1024, 4, 90) == 12 / 64  # 57 KB + the 1 KB CUDA reserves: 3 programs, not 4


# sddmm's compiled atomics, per launch dtype: PTX names the memory order in each atom/red instruction
SDDMM_ATOMICS = r"""
import json, re, sys, triton
sys.path.insert(0, "benchmarks")
import compile_report, kernels
from triton.backends.compiler import GPUTarget
for name, dtype, fn, types, constexprs, num_warps in compile_report.launches():
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


# -----------------------------------------------------------------------------
# benchmarks/kernel_bench.py, which measures the f of kernels.py's cost model on a GPU


def test_kernel_bench_times_the_paper_sizes():
    import kernel_bench
    from model import CONFIGS
    assert "tiny-narrow" in CONFIGS  # a test size, which the bench must leave out
    assert list(kernel_bench.SHAPES) == ["60m", "130m", "350m", "1b", "7b"]
    assert kernel_bench.SHAPES["7b"] == (4096, 11008, 1024, 0.05)  # the paper's 7b: dim, ffn, rank, delta


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine it would run the bench")
def test_kernel_bench_refuses_without_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", "--models", "60m"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr == "error: kernel_bench.py needs a CUDA GPU; none here, so nothing " \
                                                 "is measured\n"
