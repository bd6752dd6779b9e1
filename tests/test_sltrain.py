"""SLLinear against a float64 dense recomputation of W = scale * B @ A + S."""
import math

import pytest
import torch

from sltrain import SLLinear, SLLinearFunction, random_support, row_ptr, swap_linears


def reference_weight(layer):
    """Dense W in float64, built independently of sltrain.densify: S from (row, col) pairs."""
    A, B, values = layer.A.detach().double(), layer.B.detach().double(), layer.values.detach().double()
    idx = layer.indices.long()
    S = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    S[idx // layer.in_features, idx % layer.in_features] = values
    return layer.alpha / layer.rank * B @ A + S  # scale = alpha / r (the paper)


SHAPES = [(16, 16, 4, 0.1), (37, 53, 5, 0.07), (64, 24, 24, 0.03), (7, 3, 1, 0.5), (40, 33, 8, 0.0)]


@pytest.mark.parametrize("in_f,out_f,rank,delta", SHAPES)
def test_forward_and_grads_match_float64_reference(in_f, out_f, rank, delta, device):
    """The layer on the test device (a GPU where there is one: the route its cost model picks) against
    autograd through the dense float64 formula on the CPU."""
    torch.manual_seed(in_f * out_f)
    layer = SLLinear(in_f, out_f, rank, delta, alpha=16.0, seed=3)
    with torch.no_grad():
        layer.B.normal_()  # B = 0 at init would hide half of the gradient paths
    x = torch.randn(2, 5, in_f, requires_grad=True)
    dy = torch.randn(2, 5, out_f)
    layer.to(device)
    y = layer(x.to(device)).cpu()
    y.backward(dy)
    layer.cpu()  # its gradients with it

    # reference: autograd through the float64 dense formula, with S as a dense masked parameter
    A = layer.A.detach().double().requires_grad_()
    B = layer.B.detach().double().requires_grad_()
    S = torch.zeros(out_f, in_f, dtype=torch.float64)
    idx = layer.indices.long()
    S[idx // in_f, idx % in_f] = layer.values.detach().double()
    S.requires_grad_()
    xr = x.detach().double().requires_grad_()
    yr = xr @ (layer.alpha / layer.rank * B @ A + S).t()
    yr.backward(dy.double())

    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), yr, **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    torch.testing.assert_close(layer.A.grad.double(), A.grad, **tol)
    torch.testing.assert_close(layer.B.grad.double(), B.grad, **tol)
    torch.testing.assert_close(layer.values.grad.double(), S.grad.view(-1)[idx], **tol)
    torch.testing.assert_close(layer.dense_weight().double(), reference_weight(layer), **tol)


def test_gradcheck_float64():
    layer = SLLinear(9, 7, 3, 0.3, alpha=6.0, seed=1).double()
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    fn = lambda x, A, B, v: SLLinearFunction.apply(x, A, B, v, layer.indices, layer.scale)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, layer.A, layer.B, layer.values))


def test_no_dense_weight_is_saved_for_backward():
    in_f, out_f = 48, 40
    layer = SLLinear(in_f, out_f, 8, 0.05, alpha=8.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(torch.randn(3, in_f, requires_grad=True))
    assert saved, "the hook saw nothing: the test would pass vacuously"
    assert all(math.prod(s) < out_f * in_f for s in saved), saved
    y.sum().backward()


def test_support_is_sorted_unique_in_range_and_deterministic():
    layer = SLLinear(100, 70, 10, 0.03, alpha=1.0, seed=7)
    idx = layer.indices
    assert idx.dtype == torch.int32 and idx.numel() == math.floor(0.03 * 100 * 70) == layer.nnz
    assert torch.all(idx[1:] > idx[:-1]) and idx.min() >= 0 and idx.max() < 100 * 70
    assert torch.equal(idx, SLLinear(100, 70, 10, 0.03, alpha=1.0, seed=7).indices)
    assert not torch.equal(idx, SLLinear(100, 70, 10, 0.03, alpha=1.0, seed=8).indices)
    layer.reset_parameters()  # a resume that re-derives the support gets the same one
    assert torch.equal(idx, layer.indices)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_row_ptr_delimits_each_row_of_s(dtype):
    """row_ptr (csr_forward's and the Triton route's CSR offsets) against counting a dense mask's rows."""
    layer = SLLinear(45, 29, 5, 0.1, alpha=1.0, seed=3)  # some rows without entries, at 10% of 45 columns
    mask = torch.zeros(29, 45, dtype=torch.bool)
    mask.view(-1)[layer.indices.long()] = True
    ptr = row_ptr(layer.indices.to(dtype), 29, 45)
    assert ptr.dtype == dtype and ptr.shape == (30,) and ptr[0] == 0
    assert torch.equal(ptr.diff(), mask.sum(1).to(dtype))
    assert torch.equal(row_ptr(torch.empty(0, dtype=dtype), 3, 4), torch.zeros(4, dtype=dtype))  # lowrank: no S


@pytest.mark.parametrize("nnz", [3, 20])  # the rejection branch and the randperm branch
def test_random_support_is_uniform(nnz):
    n, draws = 40, 3000
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(n)
    for _ in range(draws):
        s = random_support(n, nnz, g)
        assert s.numel() == nnz and s.unique().numel() == nnz
        counts[s] += 1
    expected = draws * nnz / n
    # each count is Binomial(draws, nnz/n): allow 5 standard deviations
    sd = math.sqrt(draws * nnz / n * (1 - nnz / n))
    assert (counts - expected).abs().max() < 5 * sd, counts


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        SLLinear(16, 8, 9, 0.1, 1.0)
    with pytest.raises(ValueError, match="rank"):
        SLLinear(16, 8, 0, 0.1, 1.0)
    with pytest.raises(ValueError, match="delta"):
        SLLinear(16, 8, 4, 1.0, 1.0)
    with pytest.raises(ValueError, match="delta"):
        SLLinear(16, 8, 4, -0.1, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        SLLinear(16, 8, 4, 0.1, 0.0)
    with pytest.raises(ValueError, match="method"):
        swap_linears(torch.nn.Module(), "sparse")


def test_autocast_bf16_dtypes():
    layer = SLLinear(32, 24, 4, 0.1, alpha=4.0)
    x = torch.randn(5, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.A.grad.dtype == layer.values.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.double() @ reference_weight(layer).t(), rtol=3e-2, atol=3e-2)


def test_swap_replaces_exactly_the_block_linears():
    from model import CONFIGS, LLaMA
    from dataclasses import replace
    cfg = replace(CONFIGS["tiny"], vocab_size=64)
    for method, delta in (("lowrank", 0.0), ("sltrain", cfg.delta)):
        model = swap_linears(LLaMA(cfg), method, cfg.rank, cfg.delta, cfg.alpha)
        sls = [m for m in model.modules() if isinstance(m, SLLinear)]
        assert len(sls) == 7 * cfg.n_layers and all(m.delta == delta for m in sls)
        assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.tok_emb, torch.nn.Embedding)
        assert len({tuple(m.indices[:5].tolist()) for m in sls if m.nnz >= 5}) == sum(m.nnz >= 5 for m in sls)
    model = swap_linears(LLaMA(cfg), "full")
    assert not any(isinstance(m, SLLinear) for m in model.modules())
