"""
One optimizer step on one big tensor: torch AdamW against AdamW8bit (PyTorch path; on CUDA also the
fused Triton update and bitsandbytes, when installed), ms per step and state bytes per parameter.

    python benchmarks/optim_bench.py      # one 16.7M-element tensor, fp32 and bf16 weights
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from optim import AdamW8bit, kernels  # noqa: E402


def state_bytes(opt):
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def bench(numel=1 << 24, steps=5):
    """ms per step on one tensor of `numel` elements: the median of `steps` steps after 2 warm-up steps."""
    candidates = {"torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
                  "AdamW8bit (PyTorch)": lambda ps: AdamW8bit(ps, lr=1e-3, use_triton=False)}
    if torch.cuda.is_available() and kernels is not None:
        candidates["AdamW8bit (Triton)"] = lambda ps: AdamW8bit(ps, lr=1e-3, use_triton=True)
    try:
        import bitsandbytes as bnb
        candidates["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except ImportError:
        pass
    print(f"one tensor of {numel:,} elements, {torch.get_num_threads()} CPU threads, median of {steps} steps")
    print(f"| {'optimizer':<24} | device | param    | ms/step | state bytes/param |")
    print(f"|{'-' * 26}|--------|----------|---------|-------------------|")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for dtype in (torch.float32, torch.bfloat16):
            for name, make in candidates.items():
                if device == "cpu" and name not in ("torch AdamW", "AdamW8bit (PyTorch)"):
                    continue
                p = torch.nn.Parameter(torch.randn(numel, device=device, dtype=dtype))
                p.grad = torch.randn_like(p)
                opt, times = make([p]), []
                sync = torch.cuda.synchronize if device == "cuda" else lambda: None
                for _ in range(steps + 2):
                    sync()
                    t0 = time.perf_counter()
                    opt.step()
                    sync()
                    times.append(time.perf_counter() - t0)
                ms = sorted(times[2:])[steps // 2] * 1e3
                dtype_name = str(dtype).removeprefix("torch.")
                print(f"| {name:<24} | {device:<6} | {dtype_name:<8} | {ms:7.1f} | {state_bytes(opt) / numel:17.3f} |")


if __name__ == "__main__":
    bench()
