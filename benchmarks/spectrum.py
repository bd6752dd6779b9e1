"""
Is a trained weight low-rank plus sparse? The paper's Figure 2 on any run train.py wrote.

    python benchmarks/spectrum.py --out-dir runs/q22/full-lr0.001-seed0-steps2400
    python benchmarks/spectrum.py --out-dir RUN --rank 16 --delta 0.1 --results /tmp/spectrum
    python benchmarks/spectrum.py --init tiny sltrain --init-seed 0 --results benchmarks/results/spectrum/sltrain-seed0-step0

The control (a claim that training produces a structure needs the untrained model measured the same way):
--init MODEL METHOD measures the model train.py starts from, its step 0, for `train.py --model MODEL --method
METHOD --seed S` on the offline data (vocab 257): the size's config with the run's rank, delta and alpha,
initialised by model.init_weights(S), which also draws each SL layer's support. No checkpoint is read. An
untrained sltrain layer is already W = S (B = 0), a full-rank sparse matrix: measure it before reading
structure into a trained one.

For every block linear (q, k, v, o, gate, up, down of every block) it takes the weight W the layer
computes with (a full layer's weight; for lowrank and sltrain layers W = scale * B A + S, densified)
and measures, in float64:
  - the singular values s_1 >= s_2 >= ... of W, and energy(r) = (s_1^2 + ... + s_r^2) / ||W||_F^2, the
    share of ||W||_F^2 in W_r, the best rank-r approximation (Eckart-Young: W_r keeps the top r
    singular triplets); and the effective rank exp(-sum_i p_i log p_i) with p_i = s_i / sum_j s_j
    (Roy and Vetterli), which equals k for k equal singular values and 1 for a rank-one W;
  - the residual R = W - W_r: its entries against a Gaussian of the same variance, by their excess
    kurtosis E[(x - mean)^4] / var^2 - 3 (0 for a Gaussian, > 0 for heavier tails) and a histogram;
  - the share of ||R||_F^2 a sparse matrix with nnz = floor(delta * out * in) entries captures: R on a
    uniformly random support (the paper's S; delta in expectation, whatever R is) vs R on the nnz
    largest |R_ij| (the best any support of that size can do). For an sltrain layer, also on the
    layer's own support (where its S lives).
r and delta default to the run's own (its --rank and --delta, which a full run records too); with --init, to
the size's (model.CONFIGS, train.py's defaults), and --rank / --delta / --alpha set the model's too.
Writes to --results (default: the run's own folder, RUN/spectrum/; --init has no run, so it needs --results):
spectrum.md (one row per layer) and three PNGs: singular_values.png, residual_hist.png (the last block, as the
paper's figure shows the last attention layer), sparse_capture.png.
"""
import argparse
import importlib.util
import math
import os
import sys
from dataclasses import replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from run.checkpoint import load_model  # noqa: E402
from model import CONFIGS, LLaMA  # noqa: E402
from sltrain import BLOCK_LINEARS, METHODS, SLLinear, densify, random_support, setting_errors, swap_linears  # noqa: E402

OFFLINE_VOCAB = 257  # the offline data's byte-level vocabulary (data/prepare.py), which every tiny run trained on

# -----------------------------------------------------------------------------
# the measures, on one (out, in) float64 matrix


def singular_values(W):
    """s_1 >= s_2 >= ... >= s_min(out, in) of W (float64)."""
    return torch.linalg.svdvals(W.double())


def energy(s, r):
    """Share of ||W||_F^2 = sum s_i^2 in the top r singular values."""
    s2 = s.double() ** 2
    return (s2[:r].sum() / s2.sum()).item()


def effective_rank(s):
    """exp of the entropy of p_i = s_i / sum s_j."""
    p = s.double() / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def residual(W, r):
    """R = W - W_r, W_r the best rank-r approximation (the top r singular triplets)."""
    U, s, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return W.double() - (U[:, :r] * s[:r]) @ Vh[:r]


def excess_kurtosis(x):
    """E[(x - mean)^4] / var^2 - 3 (population moments): 0 for a Gaussian."""
    x = x.double().flatten()
    d = x - x.mean()
    var = (d ** 2).mean()
    return ((d ** 4).mean() / var ** 2).item() - 3.0


def captured(R, support):
    """Share of ||R||_F^2 on the flat row-major positions `support`: what the best sparse matrix with
    that support (R itself there, 0 elsewhere) removes from R."""
    R2 = R.double().flatten() ** 2
    return (R2[support.long()].sum() / R2.sum()).item()


def top_support(R, nnz):
    """The flat positions of the nnz largest |R_ij|."""
    return R.abs().flatten().topk(nnz).indices


# -----------------------------------------------------------------------------
# a run's layers


def step0_model(size, method, rank, delta, alpha, seed, vocab_size=OFFLINE_VOCAB):
    """The model `train.py --model size --method method --seed seed` starts from: the size's config with the run's
    SL settings, built on the meta device, materialised on the CPU and initialised by init_weights(seed), layer k's
    support drawn from seed * 100_003 + k. vocab_size matters to the block linears too: init_weights draws the
    embedding's vocab_size x dim values first, from the same generator."""
    cfg = replace(CONFIGS[size], vocab_size=vocab_size, rank=rank, alpha=alpha, delta=delta)
    with torch.device("meta"):
        model = swap_linears(LLaMA(cfg), method, rank, delta, alpha, seed)
    model.to_empty(device="cpu")
    model.train_config = dict(method=method, rank=rank, delta=delta)
    return model.init_weights(seed).eval()


def block_weights(model):
    """[(name, W (out, in) float64, the SLLinear or None)] for every block linear, in model order."""
    out = []
    for i, block in enumerate(model.blocks):
        for name in BLOCK_LINEARS:
            layer = block.get_submodule(name)
            with torch.no_grad():  # the factors' product in float64, not in their own float32
                W = (densify(layer.A.double(), layer.B.double(), layer.values.double(), layer.indices, layer.scale)
                     if isinstance(layer, SLLinear) else layer.weight.double())
            out.append((f"blocks.{i}.{name}", W.cpu(), layer if isinstance(layer, SLLinear) else None))
    return out


def measure(W, rank, delta, generator, layer=None):
    """The row of one layer: its measures at rank r and density delta, plus what the plots need.
    generator draws the random support (never a layer's own seed: that would redraw its own support)."""
    s = singular_values(W)
    R = residual(W, rank)
    nnz = math.floor(delta * W.numel())
    row = dict(shape=tuple(W.shape), s=s, energy=energy(s, rank), eff_rank=effective_rank(s), R=R,
               kurtosis=excess_kurtosis(R), nnz=nnz,
               random=captured(R, random_support(W.numel(), nnz, generator)) if nnz else 0.0,
               top=captured(R, top_support(R, nnz)) if nnz else 0.0, own=None)
    if layer is not None and layer.nnz:
        row["own"] = captured(R, layer.indices)
    return row


# -----------------------------------------------------------------------------
# output


def table(run, method, rank, delta, rows):
    own = any(row["own"] is not None for _, row in rows)
    lines = [f"# Spectrum of {run} ({method}), r = {rank}, delta = {delta:g}", "",
             "energy(r): share of ||W||_F^2 in the top r singular values; eff. rank: exp(entropy of s / sum s); "
             "kurtosis: excess kurtosis of the entries of R = W - W_r (0 for a Gaussian); random / top: share of "
             "||R||_F^2 on a uniformly random support / on the largest |R_ij|, nnz = floor(delta * out * in)"
             + ("; own: on the layer's own support (where its S lives)" if own else "") + ".", "",
             "| layer | shape | energy(r) | eff. rank | kurtosis | random | top |" + (" own |" if own else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if own else "")]
    for name, row in rows:
        lines.append(f"| {name} | {row['shape'][0]}x{row['shape'][1]} | {row['energy']:.3f} | {row['eff_rank']:.1f} | "
                     f"{row['kurtosis']:.2f} | {row['random']:.3f} | {row['top']:.3f} |"
                     + (f" {row['own']:.3f} |" if own else ""))
    mean = {k: sum(row[k] for _, row in rows) / len(rows) for k in ("energy", "eff_rank", "kurtosis", "random", "top")}
    lines.append(f"| mean | | {mean['energy']:.3f} | {mean['eff_rank']:.1f} | {mean['kurtosis']:.2f} | "
                 f"{mean['random']:.3f} | {mean['top']:.3f} |"
                 + (f" {sum(row['own'] for _, row in rows) / len(rows):.3f} |" if own else ""))
    return "\n".join(lines) + "\n"


def plot(folder, run, rank, delta, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = dict(zip(BLOCK_LINEARS, plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows:
        kind = name.split(".", 2)[2]
        s = row["s"] / row["s"][0]
        ax.plot(range(1, len(s) + 1), s, color=colors[kind], alpha=0.7, lw=1,
                label=kind if name.startswith("blocks.0.") else None)
    ax.axvline(rank, color="k", ls=":", label=f"r = {rank}")
    ax.set(yscale="log", xlabel="index i", ylabel="s_i / s_1", title=f"{run}\nsingular values of every block linear")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(os.path.join(folder, "singular_values.png"), dpi=100)
    last = [(n, row) for n, row in rows if n.startswith(rows[-1][0].rsplit(".", 2)[0] + ".")]
    fig, axes = plt.subplots(2, 4, figsize=(12, 5))
    for ax, (name, row) in zip(axes.flat, last):
        x = (row["R"] / row["R"].std()).flatten().numpy()
        ax.hist(x, bins=80, density=True, color="tab:blue", alpha=0.7, label="R / sd(R)")
        grid = np.linspace(x.min(), x.max(), 200)
        ax.plot(grid, np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), "k--", lw=1, label="N(0, 1)")
        ax.set(yscale="log", ylim=(1e-4, 2), title=f"{name.split('.', 2)[2]}: kurtosis {row['kurtosis']:+.2f}")
        ax.title.set_fontsize(9)
    axes.flat[0].legend(fontsize=7)
    axes.flat[-1].axis("off")
    fig.suptitle(f"{run}: entries of R = W - W_r (r = {rank}), block {len(rows) // len(BLOCK_LINEARS) - 1}")
    fig.tight_layout(), fig.savefig(os.path.join(folder, "residual_hist.png"), dpi=100)
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.25), 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [row["top"] for _, row in rows], 0.4, label="top-|R| support (best)")
    ax.bar(x + 0.2, [row["random"] for _, row in rows], 0.4, label="uniformly random support (paper's)")
    if rows[0][1]["own"] is not None:
        ax.plot(x, [row["own"] for _, row in rows], "k.", label="the layer's own support (S's)")
    ax.set_xticks(x, [n.replace("blocks.", "").replace("attn.", "").replace("mlp.", "") for n, _ in rows],
                  rotation=90, fontsize=7)
    ax.set(ylabel="share of ||W - W_r||_F^2", title=f"{run}\ncaptured by a sparse matrix at delta = {delta:g}")
    ax.legend(fontsize=7), fig.tight_layout(), fig.savefig(os.path.join(folder, "sparse_capture.png"), dpi=100)
    plt.close("all")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--out-dir", help="a run folder train.py wrote (its ckpt.pt, or a sharded or consolidated "
                       "checkpoint): its trained weights")
    which.add_argument("--init", nargs=2, metavar=("MODEL", "METHOD"), help="the step-0 model of `train.py --model "
                       "MODEL --method METHOD` instead: built and initialised as train.py does, no checkpoint read")
    p.add_argument("--init-seed", type=int, help="with --init: the run's --seed (default: 0)")
    p.add_argument("--alpha", type=float, help="with --init: the run's --alpha (default: the size's)")
    p.add_argument("--rank", type=int, help="r of W_r (default: the run's --rank; with --init, also the model's)")
    p.add_argument("--delta", type=float, help="density of the sparse matrix (default: the run's --delta; with "
                   "--init, also the model's)")
    p.add_argument("--seed", type=int, default=2**31 - 1, help="seed of the random supports, one generator for all "
                   "layers in order (default: 2**31 - 1; a layer's own seed, run seed * 100003 + k, would redraw its "
                   "own support)")
    p.add_argument("--results", help="where the table and PNGs go (default: RUN/spectrum; --init needs it)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")
    args = p.parse_args(argv)
    if args.init is None and (args.alpha is not None or args.init_seed is not None):
        p.error("--alpha and --init-seed describe the model --init builds; a run's model is its checkpoint's")
    if args.init is not None:
        size, method = args.init
        if size not in CONFIGS:
            p.error(f"--init {size}: the model must be one of {', '.join(CONFIGS)}")
        if method not in METHODS:
            p.error(f"--init {size} {method}: the method must be one of {', '.join(METHODS)}")
        if args.results is None:
            p.error("--init has no run folder to write into: name one with --results")
    if args.init is not None:  # the model it builds: sltrain's own rules (one home: sltrain.setting_errors)
        cfg = CONFIGS[size]
        for name, value, rule in setting_errors(cfg.rank if args.rank is None else args.rank,
                                                cfg.delta if args.delta is None else args.delta,
                                                cfg.alpha if args.alpha is None else args.alpha,
                                                min(cfg.dim, cfg.ffn_dim))[:1]:
            p.error(f"--{name} {value}: {rule} for --init {size}")
    if args.rank is not None and args.rank < 1:
        p.error(f"--rank {args.rank}: must be >= 1")
    if args.delta is not None and not 0 <= args.delta < 1:
        p.error(f"--delta {args.delta}: the sparse density must be in [0, 1)")
    if importlib.util.find_spec("matplotlib") is None:  # checked before the work: the plots are the point
        p.exit(1, "error: matplotlib is not installed: pip install -r requirements-dev.txt (or pip install matplotlib)\n")
    if args.init is None:
        model = load_model(args.out_dir)  # exits with one `error:` line for a folder that holds no run
        run = os.path.basename(os.path.normpath(args.out_dir))
        folder = args.results or os.path.join(args.out_dir, "spectrum")
    else:
        cfg = CONFIGS[size]
        model = step0_model(size, method, cfg.rank if args.rank is None else args.rank,
                            cfg.delta if args.delta is None else args.delta,
                            cfg.alpha if args.alpha is None else args.alpha, args.init_seed or 0)
        run, folder = f"{size}-{method}-seed{args.init_seed or 0}-step0", args.results
    config = model.train_config
    rank = config["rank"] if args.rank is None else args.rank
    delta = config["delta"] if args.delta is None else args.delta
    smallest = min(min(layer.in_features, layer.out_features) for block in model.blocks
                   for layer in (block.get_submodule(n) for n in BLOCK_LINEARS))
    if not rank < smallest:
        p.error(f"--rank {rank}: must be in [1, {smallest - 1}], below the smallest layer's side, so W - W_r is not 0")
    os.makedirs(folder, exist_ok=True)
    weights = block_weights(model)
    rows, generator = [], torch.Generator().manual_seed(args.seed)
    for i, (name, W, layer) in enumerate(weights):
        rows.append((name, measure(W, rank, delta, generator, layer)))
        row = rows[-1][1]
        print(f"spectrum: [{i + 1:>2}/{len(weights)}] {name:<22} {W.shape[0]}x{W.shape[1]}  energy({rank}) "
              f"{row['energy']:.3f}  eff. rank {row['eff_rank']:.1f}  kurtosis {row['kurtosis']:+.2f}  "
              f"captured: random {row['random']:.3f} top {row['top']:.3f}", flush=True)
    text = table(run, config["method"], rank, delta, rows)
    with open(os.path.join(folder, "spectrum.md"), "w") as f:
        f.write(text)
    plot(folder, run, rank, delta, rows)
    print(f"spectrum: wrote spectrum.md, singular_values.png, residual_hist.png, sparse_capture.png to {folder}")
    return rows


if __name__ == "__main__":
    main()
