"""benchmarks/spectrum.py: its measures against numpy float64 on matrices built with known singular values,
the script on real run folders, checked against a numpy re-densification of the checkpoint's factors, and its
step-0 model (--init) against train.py's own build and init, measured again in numpy float64."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # end-to-end: the script on run folders: not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import spectrum  # noqa: E402


def known_matrix(s, n_out=9, n_in=7, seed=0):
    """W = U diag(s) V^T with orthonormal U (n_out, k), V (n_in, k): its singular values are s."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((n_out, len(s))))[0]
    V = np.linalg.qr(rng.standard_normal((n_in, len(s))))[0]
    return U, np.asarray(s, dtype=np.float64), V


def test_energy_residual_and_effective_rank_on_known_singular_values():
    U, s, V = known_matrix([10.0, 5.0, 3.0, 1.0, 0.5, 0.2])
    W = torch.from_numpy((U * s) @ V.T)
    sv = spectrum.singular_values(W)
    np.testing.assert_allclose(sv.numpy(), np.r_[s, 0.0], atol=1e-12)  # 7 columns, rank 6
    for r in (1, 2, 4):
        assert spectrum.energy(sv, r) == pytest.approx((s[:r] ** 2).sum() / (s ** 2).sum(), rel=1e-12)
    # W - W_2 is the sum of the triplets 3..6
    np.testing.assert_allclose(spectrum.residual(W, 2).numpy(), (U[:, 2:] * s[2:]) @ V[:, 2:].T, atol=1e-12)
    p = s / s.sum()
    assert spectrum.effective_rank(sv) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-12)
    U, s, V = known_matrix([2.0, 2.0, 2.0])  # k equal singular values: effective rank k
    assert spectrum.effective_rank(spectrum.singular_values(torch.from_numpy((U * s) @ V.T))) == pytest.approx(3.0)


def test_excess_kurtosis():
    # by hand: [0, 0, 0, 0, 2, -2]: var 8/6, 4th moment 32/6, ratio 3 -> 0; +-1: ratio 1 -> -2
    assert spectrum.excess_kurtosis(torch.tensor([0.0, 0, 0, 0, 2, -2])) == pytest.approx(0.0, abs=1e-12)
    assert spectrum.excess_kurtosis(torch.tensor([1.0, -1, 1, -1])) == pytest.approx(-2.0, abs=1e-12)
    x = np.random.default_rng(1).laplace(size=(40, 30)) + 3.0
    d = x - x.mean()
    assert spectrum.excess_kurtosis(torch.from_numpy(x)) == pytest.approx((d ** 4).mean() / (d ** 2).mean() ** 2 - 3)


def test_captured_share_on_random_and_top_supports():
    R = np.random.default_rng(2).standard_normal((12, 10)) ** 3  # heavy-tailed, all |R_ij| distinct
    nnz = 15
    top = np.sort((R ** 2).flatten())[::-1][:nnz].sum() / (R ** 2).sum()
    Rt = torch.from_numpy(R)
    assert spectrum.captured(Rt, spectrum.top_support(Rt, nnz)) == pytest.approx(top, rel=1e-12)
    support = np.array([0, 7, 33, 119])
    assert spectrum.captured(Rt, torch.from_numpy(support)) == pytest.approx(
        (R.flatten()[support] ** 2).sum() / (R ** 2).sum(), rel=1e-12)
    g = torch.Generator().manual_seed(0)  # a uniformly random support takes nnz / numel of it on average
    shares = [spectrum.measure(Rt, 3, nnz / R.size, g)["random"] for _ in range(300)]
    assert np.mean(shares) == pytest.approx(nnz / R.size, rel=0.1)


def reference_weight(ckpt, name):
    """The block linear `name`'s W in numpy float64, straight from ckpt.pt: weight, or scale * B A + S."""
    state, config = ckpt["model"], ckpt["config"]
    if name + ".weight" in state:
        return state[name + ".weight"].double().numpy()
    A, B = state[name + ".A"].double().numpy(), state[name + ".B"].double().numpy()
    W = config["alpha"] / config["rank"] * B @ A
    W.reshape(-1)[state[name + ".indices"].numpy()] += state[name + ".values"].double().numpy()
    return W


@pytest.mark.parametrize("method", ["full", "sltrain"])
def test_script_on_a_run_folder(tiny_run, tmp_path, method):
    run = tiny_run(method)
    rows = dict(spectrum.main(["--out-dir", run, "--results", str(tmp_path), "--rank", "8"]))
    assert len(rows) == 4 * 7
    for png in ("singular_values.png", "residual_hist.png", "sparse_capture.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    table = (tmp_path / "spectrum.md").read_text()
    assert "r = 8, delta = 0.03" in table  # delta from the run's config, r from the flag
    ckpt = torch.load(os.path.join(run, "ckpt.pt"), map_location="cpu", weights_only=False)
    for name in ("blocks.0.attn.wq", "blocks.3.mlp.w_down"):
        W = reference_weight(ckpt, name)
        s = np.linalg.svd(W, compute_uv=False)
        assert rows[name]["energy"] == pytest.approx((s[:8] ** 2).sum() / (s ** 2).sum(), rel=1e-9)
        Usv = np.linalg.svd(W, full_matrices=False)
        R = W - (Usv[0][:, :8] * Usv[1][:8]) @ Usv[2][:8]
        nnz = int(0.03 * W.size)
        top = np.sort((R ** 2).flatten())[::-1][:nnz].sum() / (R ** 2).sum()
        assert rows[name]["top"] == pytest.approx(top, rel=1e-6)
        assert f"| {name} | {W.shape[0]}x{W.shape[1]} | {rows[name]['energy']:.3f} |" in table
        if method == "sltrain":  # the share of R on the layer's own support
            own = ckpt["model"][name + ".indices"].numpy()
            assert rows[name]["own"] == pytest.approx((R.flatten()[own] ** 2).sum() / (R ** 2).sum(), rel=1e-6)
            assert rows[name]["own"] != pytest.approx(rows[name]["random"])  # a support of its own draw


def test_results_default_to_the_run_folder(tiny_run):
    run, start = tiny_run("full"), time.time() - 1
    spectrum.main(["--out-dir", run, "--rank", "8"])
    for name in ("spectrum.md", "singular_values.png", "residual_hist.png", "sparse_capture.png"):
        assert os.path.getmtime(os.path.join(run, "spectrum", name)) >= start
    assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results", "spectrum", os.path.basename(run)))
    written = [os.path.join(folder, name) for folder, dirs, files in os.walk(ROOT)
               if ".git" not in folder.split(os.sep) for name in files
               if name in ("spectrum.md", "singular_values.png", "residual_hist.png", "sparse_capture.png")
               and os.path.getmtime(os.path.join(folder, name)) >= start]
    assert written == [], written  # nothing inside the repository


def train_py_step0(method, seed):
    """The model train.py starts from, by its own code: train.build_model (the run's build), materialised and
    initialised as run/parallel.py's one-process path does (to_empty, init_weights(args.seed))."""
    import train
    args = train.get_args(["--model", "tiny", "--method", method, "--seed", str(seed), "--device", "cpu"])
    model = train.build_model(args, spectrum.OFFLINE_VOCAB)
    model.to_empty(device="cpu")
    return model.init_weights(seed=args.seed)


@pytest.mark.parametrize("method", ["full", "sltrain"])
def test_step0_is_train_py_init_measured_in_float64(tmp_path, method):
    rows = dict(spectrum.main(["--init", "tiny", method, "--init-seed", "1", "--results", str(tmp_path)]))
    assert "Spectrum of tiny-" + method + "-seed1-step0 (" + method + "), r = 32, delta = 0.03" in (
        tmp_path / "spectrum.md").read_text()  # tiny's defaults: r 32, delta 0.03
    reference = train_py_step0(method, seed=1)
    ours = spectrum.step0_model("tiny", method, 32, 0.03, 8.0, 1)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    name = "blocks.2.mlp.w_down"
    layer = reference.get_submodule(name)
    if method == "sltrain":  # B = 0 at step 0: W is S alone, densified here in numpy
        assert not layer.B.any()
        W = np.zeros(layer.out_features * layer.in_features)
        W[layer.indices.numpy()] = layer.values.detach().double().numpy()
        W = W.reshape(layer.out_features, layer.in_features)
    else:
        W = layer.weight.detach().double().numpy()
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    R = (W - (U[:, :32] * s[:32]) @ Vt[:32]).flatten()
    d = R - R.mean()
    assert rows[name]["energy"] == pytest.approx((s[:32] ** 2).sum() / (s ** 2).sum(), rel=1e-9)
    assert rows[name]["kurtosis"] == pytest.approx((d ** 4).mean() / (d ** 2).mean() ** 2 - 3, rel=1e-6)
    nnz = int(0.03 * W.size)
    assert rows[name]["top"] == pytest.approx(np.sort(R ** 2)[::-1][:nnz].sum() / (R ** 2).sum(), rel=1e-6)
    if method == "sltrain":
        own = layer.indices.numpy()
        assert rows[name]["own"] == pytest.approx((R[own] ** 2).sum() / (R ** 2).sum(), rel=1e-6)
        assert rows[name]["kurtosis"] > 10  # W = S at 3% density: heavy-tailed before any training


def test_bad_input_gives_one_error_line(tmp_path, tiny_run):
    script = os.path.join(ROOT, "benchmarks", "spectrum.py")
    for argv in (["--out-dir", str(tmp_path / "missing")], ["--out-dir", str(tmp_path)],
                 ["--out-dir", tiny_run("full"), "--rank", "128"], ["--init", "tiny", "sltrain"],
                 ["--init", "huge", "full", "--results", str(tmp_path)],
                 ["--init", "tiny", "dense", "--results", str(tmp_path)],
                 ["--out-dir", tiny_run("full"), "--init-seed", "1"]):
        result = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (argv, result.stderr)
