"""The Triton route (kernels.py) against the float64 PyTorch oracle (sltrain.SLLinearFunction).

On CPU the kernels run through the Triton interpreter (conftest.py sets TRITON_INTERPRET=1).
The interpreter gets bf16 arithmetic wrong, so bf16 tests check what it does right: loads,
stores and output dtypes, with a bf16-sized tolerance.
"""
import pytest
import torch

import kernels
from sltrain import SLLinear, SLLinearFunction

# SMALL: many programs, several token chunks, masked edges on every axis. LARGE: few programs (fast).
SMALL = kernels.Blocks(BLOCK_ROWS=16, BLOCK_T=16, TOKENS_PER_PROGRAM=32, TOKEN_CHUNK=48)
LARGE = kernels.Blocks(BLOCK_ROWS=64, BLOCK_T=64, TOKENS_PER_PROGRAM=64, TOKEN_CHUNK=1024)


def make_layer(n_in, n_out, rank, delta, seed=0):
    layer = SLLinear(n_in, n_out, rank, delta, alpha=2 * rank, seed=seed)
    with torch.no_grad():  # B = 0 at init would hide every B-dependent bug
        layer.B.copy_(torch.randn(n_out, rank, generator=torch.Generator().manual_seed(seed)))
    return layer


def run(fn, x, layer, dy, dtype):
    """y and the gradients (dx, dA, dB, dvalues) of fn with every input cast to dtype."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in (x, layer.A, layer.B, layer.values)]
    y = fn(*inputs, layer.indices, layer.scale)
    return (y, *torch.autograd.grad(y, inputs, dy.to(y.dtype)))


def oracle(x, layer, dy):
    return run(SLLinearFunction.apply, x, layer, dy, torch.float64)


def triton_route(blocks):
    return lambda *args: kernels.sl_linear(*args, route="triton", blocks=blocks)


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(x_shape, n_out, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(*x_shape, generator=g), torch.randn(*x_shape[:-1], n_out, generator=g)


def test_layout_is_csr_of_s_and_s_transposed():
    layer = make_layer(45, 29, 5, 0.1, seed=3)
    n_in, idx = layer.in_features, layer.indices.long()
    layout = kernels.SupportLayout(layer.indices, layer.out_features, n_in)
    mask = torch.zeros(layer.out_features, n_in, dtype=torch.bool)
    mask.view(-1)[idx] = True
    assert torch.equal(layout.row_ptr.diff(), mask.sum(1).int())
    assert torch.equal(layout.col_ptr.diff(), mask.sum(0).int())
    for i in range(layer.out_features):  # row i of S: its entries, in CSR order
        assert torch.equal(idx[layout.row_ptr[i]:layout.row_ptr[i + 1]] // n_in, torch.full_like(idx[:int(mask[i].sum())], i))
    rows, cols = idx[layout.col_order.long()] // n_in, idx[layout.col_order.long()] % n_in
    for j in range(n_in):  # column j of S: its entries, rows ascending
        seg = slice(layout.col_ptr[j], layout.col_ptr[j + 1])
        assert (cols[seg] == j).all() and torch.equal(rows[seg], mask[:, j].nonzero().flatten())


CASES = [  # (x shape, out, rank, delta, blocks)
    ((37, 45), 29, 5, 0.1, LARGE),  # odd sizes, one program per axis
    ((2, 35, 33), 50, 4, 0.2, SMALL),  # batch dims; T=70 spans two token chunks and partial blocks
    ((1, 16), 16, 16, 0.5, LARGE),  # one token, full rank
    ((19, 130), 70, 8, 0.03, SMALL),  # some rows and columns of S without entries
]


@pytest.mark.parametrize("x_shape,n_out,rank,delta,blocks", CASES)
def test_fp32_matches_fp64_oracle(x_shape, n_out, rank, delta, blocks):
    layer = make_layer(x_shape[-1], n_out, rank, delta)
    x, dy = inputs(x_shape, n_out)
    got, want = run(triton_route(blocks), x, layer, dy, torch.float32), oracle(x, layer, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("x_shape,n_out,rank,delta,blocks", CASES[:2])
def test_fp64_matches_fp64_oracle(x_shape, n_out, rank, delta, blocks):
    layer = make_layer(x_shape[-1], n_out, rank, delta)
    x, dy = inputs(x_shape, n_out)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), run(triton_route(blocks), x, layer, dy, torch.float64),
                          oracle(x, layer, dy)):
        assert a.dtype == torch.float64 and rel_err(a, b) < 1e-12, (name, rel_err(a, b))


def test_gradcheck_fp64():
    layer = make_layer(7, 6, 2, 0.3, seed=5)
    x, _ = inputs((5, 7), 6)
    args = [t.detach().double().requires_grad_() for t in (x, layer.A, layer.B, layer.values)]
    fn = lambda x, A, B, v: kernels.sl_linear(x, A, B, v, layer.indices, layer.scale, route="triton", blocks=SMALL)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8)


def test_bf16_loads_stores_and_dtypes():
    layer = make_layer(33, 40, 4, 0.2)
    x, dy = inputs((21, 33), 40)
    got, want = run(triton_route(SMALL), x, layer, dy, torch.bfloat16), oracle(x, layer, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert a.dtype == torch.bfloat16, name
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


def test_autocast_bf16_with_fp32_parameters():
    layer = make_layer(33, 40, 4, 0.2)
    x, dy = inputs((21, 33), 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(triton_route(SMALL), x, layer, dy, torch.float32)
    want = oracle(x, layer, dy)
    assert got[0].dtype == torch.bfloat16
    for name, a, b in zip(("y", "dx", "dA", "dB", "dvalues"), got, want):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))
    assert all(g.dtype == torch.float32 for g in got[1:])  # gradients come back in the parameters' dtype


def test_lowrank_layer_without_support():
    layer = make_layer(20, 24, 3, 0.0)
    x, dy = inputs((9, 20), 24)
    got, want = run(triton_route(LARGE), x, layer, dy, torch.float32), oracle(x, layer, dy)
    assert got[4].shape == (0,)
    for a, b in zip(got[:4], want[:4]):
        assert rel_err(a, b) < 1e-5


def test_nothing_of_size_out_by_in_is_saved_for_backward():
    layer = make_layer(40, 30, 2, 0.1)
    x = torch.randn(8, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kernels.sl_linear(x, layer.A, layer.B, layer.values, layer.indices, layer.scale, route="triton")
    assert saved and max(saved) < 40 * 30


def test_route_switch(monkeypatch):
    layer = make_layer(20, 24, 3, 0.2)
    x = torch.randn(9, 20)
    args = (x, layer.A, layer.B, layer.values, layer.indices, layer.scale)
    assert torch.equal(kernels.sl_linear(*args, route="dense"), SLLinearFunction.apply(*args))
    assert "SLLinearFunction" in type(kernels.sl_linear(*args).grad_fn).__name__  # auto on CPU: PyTorch route
    assert "SLLinearTriton" in type(kernels.sl_linear(*args, route="triton").grad_fn).__name__
    monkeypatch.setattr(kernels, "ROUTE", "triton")  # the module switch (SLTRAIN_ROUTE at import)
    assert "SLLinearTriton" in type(kernels.sl_linear(*args).grad_fn).__name__
    with pytest.raises(ValueError):
        kernels.sl_linear(*args, route="sparse")


def test_choose_route_follows_the_cost_model(monkeypatch):
    n_in, n_out, rank, nnz = 4096, 11008, 1024, int(0.05 * 4096 * 11008)
    monkeypatch.setattr(kernels, "SPARSE_SPEED", 0.02)  # sparse kernels at 2% of tensor-core speed
    assert kernels.choose_route(8192, n_in, n_out, rank, nnz) == "dense"  # 0.34 + 2.5 > 1 + 4r/3T
    assert kernels.choose_route(16, n_in, n_out, rank, nnz) == "triton"  # densifying B A dominates at small T
    monkeypatch.setattr(kernels, "SPARSE_SPEED", 0.2)
    assert kernels.choose_route(8192, n_in, n_out, rank, nnz) == "triton"  # 0.34 + 0.25 < 1.17


def test_layer_caches_its_layout_until_the_support_changes():
    layer, other = make_layer(30, 20, 4, 0.2, seed=1), make_layer(30, 20, 4, 0.2, seed=2)
    first = layer.support_layout()
    assert layer.support_layout() is first
    layer.load_state_dict(other.state_dict())  # a resume rewrites `indices` in place
    fresh, want = layer.support_layout(), kernels.SupportLayout(other.indices, 20, 30)
    assert fresh is not first
    for name in ("row_ptr", "col_ptr", "col_order"):
        assert torch.equal(getattr(fresh, name), getattr(want, name))
