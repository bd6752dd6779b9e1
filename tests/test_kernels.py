"""The Triton route (kernels.py) against the float64 PyTorch oracle (sltrain.SLLinearFunction).

Every tensor lives on the `device` fixture: on a CUDA machine the kernels run compiled, on a CPU
one through the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 only there). The
interpreter gets bf16 arithmetic wrong, but the kernels convert every load to fp32 first, so the
bf16 tests check loads, stores and output dtypes with a bf16-sized tolerance on either machine.
"""
import ast
import os
import subprocess
import sys

import pytest
import torch

import kernels
import sltrain
from sltrain import SLLinear, SLLinearFunction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# SMALL: many programs, several token chunks, masked edges on every axis. LARGE: few programs (fast).
SMALL = kernels.Tiles(TILE_ROWS=16, TILE_T=16, TOKENS_PER_PROGRAM=32, TOKEN_CHUNK=48)
LARGE = kernels.Tiles(TILE_ROWS=64, TILE_T=64, TOKENS_PER_PROGRAM=64, TOKEN_CHUNK=1024)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="route 'auto' runs Triton only on CUDA tensors")


def make_layer(n_in, n_out, rank, delta, device, seed=0):
    layer = SLLinear(n_in, n_out, rank, delta, alpha=2 * rank, seed=seed)
    with torch.no_grad():  # B = 0 at init would hide every B-dependent bug
        layer.B.copy_(torch.randn(n_out, rank, generator=torch.Generator().manual_seed(seed)))
    return layer.to(device)


def run(fn, x, layer, dy, dtype):
    """y and the gradients (dx, dA, dB, dvalues) of fn with every input cast to dtype."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, layer.A, layer.B, layer.values)]
    y = fn(*inputs, layer.indices, layer.scale)
    return (y, *torch.autograd.grad(y, inputs, dy.to(y.dtype)))


def oracle(x, layer, dy):
    return run(SLLinearFunction.apply, x, layer, dy, torch.float64)


def triton_route(tiles=None):
    return lambda *args: kernels.sl_linear(*args, tiles=tiles)


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(x_shape, n_out, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*x_shape, generator=g).to(device), torch.randn(*x_shape[:-1], n_out, generator=g).to(device)


def test_layout_is_csr_of_s_and_s_transposed(device):
    layer = make_layer(45, 29, 5, 0.1, device, seed=3)
    n_in, idx = layer.in_features, layer.indices.long().cpu()
    layout = kernels.SupportLayout(layer.indices, layer.out_features, n_in)
    row_ptr, col_ptr, col_order = (t.cpu() for t in (layout.row_ptr, layout.col_ptr, layout.col_order.long()))
    mask = torch.zeros(layer.out_features, n_in, dtype=torch.bool)
    mask.view(-1)[idx] = True
    assert torch.equal(row_ptr.diff(), mask.sum(1).int()) and torch.equal(col_ptr.diff(), mask.sum(0).int())
    for i in range(layer.out_features):  # row i of S: its entries, in CSR order
        assert (idx[row_ptr[i]:row_ptr[i + 1]] // n_in == i).all()
    rows, cols = idx[col_order] // n_in, idx[col_order] % n_in
    for j in range(n_in):  # column j of S: its entries, rows ascending
        seg = slice(col_ptr[j], col_ptr[j + 1])
        assert (cols[seg] == j).all() and torch.equal(rows[seg], mask[:, j].nonzero().flatten())


def test_transposed_rows_start_16_aligned(device):
    a = torch.randn(37, 5, device=device)  # 37 tokens: the rows need padding to 48
    t = kernels._transposed(a)
    assert torch.equal(t, a.t()) and t.stride() == (48, 1)  # what the kernels' tl.multiple_of promises


CASES = [  # (x shape, out, rank, delta, tiles)
    ((37, 45), 29, 5, 0.1, LARGE),  # odd sizes, one program per axis
    ((2, 35, 33), 50, 4, 0.2, SMALL),  # batch dims; T=70 spans two token chunks and partial tiles
    ((1, 16), 16, 16, 0.5, LARGE),  # one token, full rank
    ((19, 130), 70, 8, 0.03, SMALL),  # some rows and columns of S without entries
]


@pytest.mark.parametrize("x_shape,n_out,rank,delta,tiles", CASES)
def test_fp32_matches_fp64_oracle(device, x_shape, n_out, rank, delta, tiles):
    layer = make_layer(x_shape[-1], n_out, rank, delta, device)
    x, dy = inputs(x_shape, n_out, device)
    got, want = run(triton_route(tiles), x, layer, dy, torch.float32), oracle(x, layer, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


# The token counts route "auto" sends to Triton (test_choose_route_follows_the_cost_model), at the
# 1b and 7b proportions scaled down 32x and 64x (rank = dim / 4; delta .03, .05), default Tiles.
AUTO_SHAPES = {"1b gate/up": (64, 171, 16, 0.03), "7b down": (172, 64, 16, 0.05)}


@pytest.mark.parametrize("T", [1, 7, 64, 200, pytest.param(800, marks=pytest.mark.slow)])  # 800: seconds a case
@pytest.mark.parametrize("shape", AUTO_SHAPES)
def test_auto_route_shapes_match_fp64_oracle(device, shape, T):
    n_in, n_out, rank, delta = AUTO_SHAPES[shape]
    layer = make_layer(n_in, n_out, rank, delta, device, seed=T)
    x, dy = inputs((T, n_in), n_out, device, seed=T)
    got, want = run(triton_route(), x, layer, dy, torch.float32), oracle(x, layer, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("x_shape,n_out,rank,delta,tiles", CASES[:2])
def test_fp64_matches_fp64_oracle(device, x_shape, n_out, rank, delta, tiles):
    layer = make_layer(x_shape[-1], n_out, rank, delta, device)
    x, dy = inputs(x_shape, n_out, device)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), run(triton_route(tiles), x, layer, dy, torch.float64),
                          oracle(x, layer, dy)):
        assert a.dtype == torch.float64 and rel_err(a, b) < 1e-12, (name, rel_err(a, b))


def test_gradcheck_fp64(device):
    layer = make_layer(7, 6, 2, 0.3, device, seed=5)
    x, _ = inputs((5, 7), 6, device)
    args = [t.detach().double().requires_grad_() for t in (x, layer.A, layer.B, layer.values)]
    fn = lambda x, A, B, v: kernels.sl_linear(x, A, B, v, layer.indices, layer.scale, tiles=SMALL)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


def test_bf16_loads_stores_and_dtypes(device):
    layer = make_layer(33, 40, 4, 0.2, device)
    x, dy = inputs((21, 33), 40, device)
    got, want = run(triton_route(SMALL), x, layer, dy, torch.bfloat16), oracle(x, layer, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


def test_autocast_bf16_with_fp32_parameters(device):
    layer = make_layer(33, 40, 4, 0.2, device)
    x, dy = inputs((21, 33), 40, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = run(triton_route(SMALL), x, layer, dy, torch.float32)
    want = oracle(x, layer, dy)
    assert got[0].dtype == torch.bfloat16
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))
    assert all(g.dtype == torch.float32 for g in got[1:])  # gradients come back in the parameters' dtype


def test_lowrank_layer_without_support(device):
    layer = make_layer(20, 24, 3, 0.0, device)
    x, dy = inputs((9, 20), 24, device)
    got, want = run(triton_route(LARGE), x, layer, dy, torch.float32), oracle(x, layer, dy)
    assert got[4].shape == (0,)
    for a, b in zip(got[:4], want[:4]):
        assert rel_err(a, b) < 1e-5


def test_nothing_of_size_out_by_in_is_saved_for_backward(device):
    layer = make_layer(40, 30, 2, 0.1, device)
    x = torch.randn(8, 40, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kernels.sl_linear(x, layer.A, layer.B, layer.values, layer.indices, layer.scale)
    assert saved and max(saved) < 40 * 30


# -----------------------------------------------------------------------------
# the route: one decision (sltrain.route), the layout built only for the Triton route


def grad_fn_of(layer, x):
    return type(layer(x).grad_fn).__name__


def test_forced_routes_and_cpu_auto(device, monkeypatch):
    layer = make_layer(20, 24, 3, 0.2, device)
    x = torch.randn(9, 20, device=device)
    cpu_layer = make_layer(20, 24, 16, 0.2, "cpu")  # one token at rank 16: the cost model alone says Triton
    assert sltrain.choose_route(1, 20, 24, 16, cpu_layer.nnz) == "triton"
    assert sltrain.route(torch.randn(1, 20), cpu_layer) == "dense"  # but auto never takes it off CUDA
    assert "SLLinearFunction" in grad_fn_of(cpu_layer, torch.randn(1, 20))
    monkeypatch.setattr(sltrain, "ROUTE", "triton")  # what SLTRAIN_ROUTE=triton sets at import
    assert "SLLinearTriton" in grad_fn_of(layer, x)
    monkeypatch.setattr(sltrain, "ROUTE", "dense")
    assert "SLLinearFunction" in grad_fn_of(layer, x)
    monkeypatch.setattr(sltrain, "ROUTE", "sparse")
    with pytest.raises(ValueError):
        layer(x)
    monkeypatch.setattr(sltrain, "ROUTE", "triton")
    monkeypatch.setattr(sltrain, "triton_route", lambda: None)  # triton not installed
    with pytest.raises(RuntimeError, match="needs the triton package"):
        layer(x)


@needs_cuda
def test_auto_route_on_cuda_follows_the_cost_model(device):
    layer = make_layer(*AUTO_SHAPES["7b down"][:2], 16, 0.05, device)
    assert sltrain.route(torch.randn(1, 172, device=device), layer) == "triton"  # decoding: one token
    assert sltrain.route(torch.randn(8192, 172, device=device), layer) == "dense"  # a training micro-batch
    assert "SLLinearTriton" in grad_fn_of(layer, torch.randn(1, 172, device=device))


def test_choose_route_follows_the_cost_model(monkeypatch):
    n_in, n_out, rank, nnz = 4096, 11008, 1024, int(0.05 * 4096 * 11008)  # 7b gate/up
    monkeypatch.setattr(sltrain, "SPARSE_SPEED", 0.02)  # sparse kernels at 2% of tensor-core speed
    assert sltrain.choose_route(8192, n_in, n_out, rank, nnz) == "dense"  # 0.34 + 2.5 > 1 + 4r/3T
    for T in (1, 7, 64, 200):  # the token counts test_auto_route_shapes_match_fp64_oracle checks
        assert sltrain.choose_route(T, n_in, n_out, rank, nnz) == "triton"  # densifying B A dominates
    monkeypatch.setattr(sltrain, "SPARSE_SPEED", 0.2)
    assert sltrain.choose_route(8192, n_in, n_out, rank, nnz) == "triton"  # 0.34 + 0.25 < 1.17


def test_layout_is_built_only_when_the_triton_route_runs(device, monkeypatch):
    layer = make_layer(30, 20, 4, 0.2, device)
    x = torch.randn(5, 30, device=device)
    monkeypatch.setattr(sltrain, "ROUTE", "dense")
    layer(x)
    assert not hasattr(layer, "_layout")
    monkeypatch.setattr(sltrain, "ROUTE", "triton")
    layer(x)
    assert layer._layout.nnz == layer.nnz


def test_layer_caches_its_layout_until_the_support_changes(device):
    layer, other = make_layer(30, 20, 4, 0.2, device, seed=1), make_layer(30, 20, 4, 0.2, device, seed=2)
    first = kernels.support_layout(layer)
    assert kernels.support_layout(layer) is first
    layer.load_state_dict(other.state_dict())  # a resume rewrites `indices` in place
    fresh, want = kernels.support_layout(layer), kernels.SupportLayout(other.indices, 20, 30)
    assert fresh is not first
    for name in ("row_ptr", "col_ptr", "col_order"):
        assert torch.equal(getattr(fresh, name), getattr(want, name))


def test_layout_bytes_are_what_the_memory_plan_counts(device):
    layer = make_layer(45, 29, 5, 0.1, device)
    layout = kernels.SupportLayout(layer.indices, 29, 45)
    nbytes = sum(t.numel() * t.element_size() for t in (layout.row_ptr, layout.col_ptr, layout.col_order))
    assert nbytes == 4 * (layer.nnz + 29 + 45 + 2)  # memory.memory_plan's per-layer count


def imported_modules(nodes):
    return {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names} | \
           {n.module for n in nodes if isinstance(n, ast.ImportFrom)}


def test_kernels_import_no_project_module_and_sltrain_imports_kernels_only_lazily():
    """kernels.py stands alone (it reads a layer's attributes, never sltrain); sltrain imports it on first use,
    so a machine without triton trains on the dense route (tests/test_layout.py checks the whole graph)."""
    kernels_py, sltrain_py = (ast.parse(open(os.path.join(ROOT, f)).read()) for f in ("kernels.py", "sltrain.py"))
    assert "sltrain" not in imported_modules(ast.walk(kernels_py))
    assert "kernels" not in imported_modules(sltrain_py.body)  # not at import time
    lazy = next(n for n in sltrain_py.body if isinstance(n, ast.FunctionDef) and n.name == "triton_route")
    assert "kernels" in imported_modules(ast.walk(lazy))


# a fresh process: which modules `import sltrain` loads, and the route a layer takes, with SLTRAIN_ROUTE set
ROUTE_PROBE = """
import sys
{hide}
import torch, sltrain
loaded = [m for m in ("kernels", "triton") if sys.modules.get(m) is not None]
layer = sltrain.SLLinear(20, 24, 3, 0.2, alpha=6.0)
try:
    print(loaded, type(layer(torch.randn(5, 20)).grad_fn).__name__)
except RuntimeError as e:
    print(loaded, e)
"""


@pytest.mark.slow  # a fresh Python per case
@pytest.mark.parametrize("route,hide_triton,found", [
    ("triton", False, "SLLinearTritonBackward"),  # found by sltrain itself: nobody imported kernels
    ("auto", False, "SLLinearFunctionBackward"),  # CPU tensors: dense, and kernels never imported
    ("triton", True, "SLTRAIN_ROUTE=triton needs the triton package (kernels.py): pip install triton"),
    ("auto", True, "SLLinearFunctionBackward"),
])
def test_sltrain_finds_the_triton_route_by_itself(route, hide_triton, found):
    hide = "sys.modules['triton'] = None  # as if triton were not installed" if hide_triton else ""
    env = {**os.environ, "SLTRAIN_ROUTE": route, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ROUTE_PROBE.format(hide=hide)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"[] {found}\n"
