"""
The Triton route (kernels.py) against dense nn.Linear and the dense route, at the paper's layer shapes,
on a CUDA GPU: forward, backward and both in ms, peak extra memory, and the sparse kernels' TFLOP/s.

    python benchmarks/kernel_bench.py                 # T = 8192 tokens, bf16, every paper size
    python benchmarks/kernel_bench.py --tokens 1024 --models 1b 7b --json

Its last column is f, the sparse kernels' FLOP/s over dense nn.Linear's forward FLOP/s: the number
kernels.py's cost model turns into a route. Set sltrain.SPARSE_SPEED to f at your shapes, so that
route "auto" picks the faster route.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
import sltrain  # noqa: E402
from model import CONFIGS  # noqa: E402

# the paper's sizes as model.py defines them: name -> (dim, ffn, rank, delta); the tiny* test sizes are not
SHAPES = {name: (c.dim, c.ffn_dim, c.rank, c.delta) for name, c in CONFIGS.items() if not name.startswith("tiny")}


def bench(T=8192, dtype=torch.bfloat16, models=tuple(SHAPES)):
    """One record per (model, layer): times in ms and peak extra MB of fwd+bwd for dense nn.Linear,
    the dense route and the Triton route; TFLOP/s of the three sparse products; f."""
    from triton.testing import do_bench

    for model in models:
        d, ffn, r, delta = SHAPES[model]
        for layer, (n_in, n_out) in {"q/k/v/o": (d, d), "gate/up": (d, ffn), "down": (ffn, d)}.items():
            sl = sltrain.SLLinear(n_in, n_out, r, delta, alpha=8.0, seed=1).cuda().to(dtype)
            sl.B.data.normal_(0, 0.02)
            layout = kernels.SupportLayout(sl.indices, n_out, n_in)
            W = sl.dense_weight().detach().requires_grad_()
            x = torch.randn(T, n_in, device="cuda", dtype=dtype, requires_grad=True)
            dy = torch.randn(T, n_out, device="cuda", dtype=dtype)
            args = (sl.A, sl.B, sl.values, sl.indices, sl.scale)
            routes = {"dense": lambda: F.linear(x, W), "route": lambda: sltrain.SLLinearFunction.apply(x, *args),
                      "triton": lambda: kernels.sl_linear(x, *args, layout=layout)}
            row = dict(model=model, layer=layer, n_in=n_in, n_out=n_out, W_mb=W.numel() * W.element_size() / 1e6)
            for name, fn in routes.items():
                params = [x, W] if name == "dense" else [x, sl.A, sl.B, sl.values]

                def fwd_bwd():
                    for p in params:
                        p.grad = None
                    fn().backward(dy)
                fwd, both = do_bench(fn), do_bench(fwd_bwd)
                for p in params:
                    p.grad = None
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fwd_bwd()
                torch.cuda.synchronize()
                row[name] = dict(fwd_ms=fwd, bwd_ms=both - fwd, fwd_bwd_ms=both,
                                 mem_mb=(torch.cuda.max_memory_allocated() - base) / 1e6)
            dense_tflops = 2 * T * n_in * n_out / row["dense"]["fwd_ms"] / 1e9
            tiles, x2, dy2 = kernels.Tiles(), x.detach(), dy
            gflop = 2 * T * layout.nnz / 1e9  # per sparse product (ms -> TFLOP/s)
            t_y = do_bench(lambda: kernels.sparse_matmul(torch.zeros_like(dy2), x2, sl.values, sl.indices,
                                                         layout.row_ptr, None, n_in, tiles))
            t_dx = do_bench(lambda: kernels.sparse_matmul(torch.zeros_like(x2), dy2, sl.values, sl.indices,
                                                          layout.col_ptr, layout.col_order, n_in, tiles))
            t_dv = do_bench(lambda: kernels.sampled_dense(dy2, x2, sl.indices, layout.row_ptr, n_in, tiles,
                                                          torch.float32))
            row["sparse_tflops"] = dict(y=gflop / t_y, dx=gflop / t_dx, dvalues=gflop / t_dv)
            row["dense_tflops"] = dense_tflops
            row["f"] = (3 * gflop / (t_y + t_dx + t_dv)) / dense_tflops
            yield row


def print_table(rows, T, dtype):
    print(f"T={T} tokens, {dtype}, {torch.cuda.get_device_name()}; times in ms for dense nn.Linear, "
          f"ratios to it for the dense route (route) and the Triton route (triton); memory = peak extra MB of fwd+bwd")
    print(f"{'model':5} {'layer':8} {'in':>5} {'out':>5} | {'fwd ms':>6} {'route':>5} {'triton':>6} | "
          f"{'bwd ms':>6} {'route':>5} {'triton':>6} | {'f+b ms':>6} {'route':>5} {'triton':>6} | "
          f"{'mem MB':>6} {'route':>5} {'triton':>6} {'W MB':>5} | sparse TFLOP/s y dx dvalues | f")
    dense_tflops = []
    for row in rows:
        dense_tflops.append(row["dense_tflops"])
        cells = " | ".join(f"{row['dense'][c]:6.2f} {row['route'][c] / row['dense'][c]:5.2f} "
                           f"{row['triton'][c] / row['dense'][c]:6.2f}" for c in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "mem_mb"))
        sparse = row["sparse_tflops"]
        print(f"{row['model']:5} {row['layer']:8} {row['n_in']:5} {row['n_out']:5} | {cells} {row['W_mb']:5.1f} | "
              f"{sparse['y']:6.1f} {sparse['dx']:6.1f} {sparse['dvalues']:6.1f} | {row['f']:.3f}", flush=True)
    print(f"f = sparse-kernel TFLOP/s over dense nn.Linear forward TFLOP/s (median dense "
          f"{sorted(dense_tflops)[len(dense_tflops) // 2]:.0f}); set sltrain.SPARSE_SPEED (now {sltrain.SPARSE_SPEED}) "
          f"to the value at your shapes so route 'auto' picks the faster route.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch, T (default: 8192)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="(default: bfloat16)")
    p.add_argument("--models", nargs="+", choices=tuple(SHAPES), default=list(SHAPES), help="(default: all)")
    p.add_argument("--json", action="store_true", help="one JSON record per layer instead of the table")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if args.tokens < 1:
        p.error(f"--tokens {args.tokens}: must be >= 1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("error: kernel_bench.py times compiled kernels: unset TRITON_INTERPRET (interpreter timings are "
                 "not kernel speed)")
    if not torch.cuda.is_available():
        sys.exit("error: kernel_bench.py needs a CUDA GPU; none here, so nothing is measured")
    dtype = getattr(torch, args.dtype)
    rows = bench(args.tokens, dtype, args.models)
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    else:
        print_table(rows, args.tokens, dtype)


if __name__ == "__main__":
    main()
