"""
Compile every Triton kernel of the project ahead of time for the GPUs it targets, sm_80 (A100) and
sm_90 (H100), and print each launch's resources, one JSON record a line. No GPU is needed: Triton
compiles to a cubin on any machine, ptxas logs the spills and cuobjdump reads the registers.

    python benchmarks/compile_report.py                # every kernel, every launch dtype, both archs
    python benchmarks/compile_report.py --arch 90

Each record: kernel, arch, dtype (of the activations; "bf16/fp32" is bf16 autocast over fp32
parameters), registers per thread, spills (bytes stored and loaded), shared_bytes per program, and
occupancy, the resident warps per SM over the 64 possible. kernels.py's register note reads them.
"""
import argparse
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import kernels  # noqa: E402
import optim  # noqa: E402

SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # A100, H100; both: 65,536 registers, 64 warps, 32 programs


def occupancy(registers, shared_bytes, num_warps, arch):
    """Resident warps per SM over the 64 possible. Resident programs (CTAs) are limited by registers
    (allocated per warp in units of 256), shared memory (CUDA reserves 1 KB more per program), warps
    (64) and programs (32)."""
    per_warp = -(-registers * 32 // 256) * 256
    programs = min(65536 // (per_warp * num_warps), SHARED_PER_SM[arch] // (shared_bytes + 1024), 64 // num_warps, 32)
    return programs * num_warps / 64


def launches():
    """(name, dtype, kernel, pointer types, constexprs, num_warps) for every Triton kernel of the
    project, for each dtype the code launches it with, at its default tiles. Integer arguments are
    i32; indices and pointers into them are int32 (out * in < 2^31 at every paper shape)."""
    t, index = kernels.Tiles(), dict(indices_ptr="*i32", ptr_ptr="*i32", order_ptr="*i32", row_ptr_ptr="*i32")
    # dtype: activations (and values): bf16 params, bf16 autocast over fp32 params, fp32, fp64 (tests)
    for dtype, act, values in (("bf16", "bf16", "bf16"), ("bf16/fp32", "bf16", "fp32"),
                               ("fp32", "fp32", "fp32"), ("fp64", "fp64", "fp64")):
        acc = tl.float64 if act == "fp64" else tl.float32
        for name, transposed in (("spmm_kernel[y]", False), ("spmm_kernel[dx]", True)):
            yield (name, dtype, kernels.spmm_kernel,
                   dict(index, out_ptr="*" + act, src_t_ptr="*" + act, values_ptr="*" + values),
                   dict(TRANSPOSED=transposed, ACC=acc, TILE_ROWS=t.TILE_ROWS, TILE_T=t.TILE_T), t.num_warps)
        if act == values:  # sddmm reads no values: autocast launches it as bf16
            yield ("sddmm_kernel", dtype, kernels.sddmm_kernel,
                   dict(index, dvalues_ptr="*fp64" if act == "fp64" else "*fp32", dy_t_ptr="*" + act, x_t_ptr="*" + act),
                   dict(ACC=acc, TILE_ROWS=t.TILE_ROWS, TILE_T=t.TILE_T, TOKENS_PER_PROGRAM=t.TOKENS_PER_PROGRAM),
                   t.num_warps)
    groups = inspect.signature(kernels.adamw8bit_update_).parameters["groups"].default
    for p in ("bf16", "fp32"):  # codes and lookup counts are uint8; tables, absmax and scalars fp32
        types = {a: ("*u8" if "codes" in a or "count" in a else "*fp32") if a.endswith("_ptr") else "fp32"
                 for a in kernels._adamw8bit_kernel.arg_names}
        types.update(p_ptr="*" + p, g_ptr="*" + p, seed_ptr="*i32", skip_ptr="*i32", n="i32")
        yield ("_adamw8bit_kernel", p, kernels._adamw8bit_kernel, types,
               dict(QGROUP=optim.QGROUP, GROUPS=groups, STOCHASTIC=p == "bf16"),  # bf16 weights round stochastically
               4)  # the launcher passes no num_warps: Triton's default


def compile_report(archs=(80, 90)):
    """Compile every launch ahead of time for each arch and yield its resources: registers and
    static shared memory from cuobjdump on the cubin, spill bytes from ptxas's own log."""
    from triton.backends.compiler import GPUTarget
    triton.knobs.compilation.always_compile = True  # ptxas runs (and logs) even when Triton has it cached
    triton.knobs.nvidia.dump_ptxas_log = True  # printed to stdout: the one place spill bytes appear
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for name, dtype, fn, types, constexprs, num_warps in launches():
        signature = {a: "constexpr" if a in constexprs else types.get(a, "i32") for a in fn.arg_names}
        # tensors from torch's allocator are 16-byte aligned and Triton specializes launches on it
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if signature[a][0] == "*"}
        for arch in archs:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                k = triton.compile(triton.compiler.ASTSource(fn, signature, constexprs, aligned),
                                   target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
            assert "spill stores" in log.getvalue(), "ptxas printed no spill report"
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(k.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
            res = {key: int(n) for key, n in re.findall(r"(\w+):(\d+)", usage.split("Function")[-1])}
            shared = res["SHARED"] + k.metadata.shared  # static + the dynamic amount each launch asks for
            yield dict(kernel=name, arch=arch, dtype=dtype, registers=res["REG"],
                       spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.getvalue())),
                       shared_bytes=shared, occupancy=occupancy(res["REG"], shared, num_warps, arch))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_PER_SM), default=sorted(SHARED_PER_SM),
                   help="SM versions to compile for (default: 80 90)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # then kernels.py was imported with interpreted kernels
        sys.exit("error: compile_report.py compiles real kernels: unset TRITON_INTERPRET")
    for row in compile_report(tuple(args.arch)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
