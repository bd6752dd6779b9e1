"""
Decode tokens/s with the SL layers merged into one dense W against decoding from A, B and S in CSR
form (sample.py's --decode merged and --decode csr), on random weights:

    python benchmarks/decode_bench.py                  # tiny, 60m and one 7b block, on the CPU
    python benchmarks/decode_bench.py --device cuda --json

The models are the whole tiny and 60m ones and one 7b block (seven SL layers), at vocabulary 257 so
the embeddings do not hide the blocks. The two modes alternate, and each keeps its best of --repeats
runs: on a shared machine the best run is the one least disturbed by other work. The last column is
the mode sample.py's --decode auto picks (sample.choose_decode), which these measurements set.
"""
import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import CONFIGS, LLaMA  # noqa: E402
from run.flags import devices  # noqa: E402
from sample import choose_decode, generate, prepare_decode, sync  # noqa: E402
from sltrain import swap_linears  # noqa: E402

MODELS = {"tiny": None, "60m": None, "7b": 1}  # name -> blocks to keep (None: all of them)


def bench(device, models=tuple(MODELS), repeats=5, n_tokens=64):
    """One row per model: {model, blocks, merged, csr (tokens/s), auto (the mode choose_decode picks)}."""
    for name in models:
        cfg = replace(CONFIGS[name], vocab_size=257, max_seq_len=256, n_layers=MODELS[name] or CONFIGS[name].n_layers)
        with torch.device("meta"):
            model = swap_linears(LLaMA(cfg), "sltrain", cfg.rank, cfg.delta, cfg.alpha)
        model.to_empty(device=device)
        model.init_weights(seed=0).eval()
        auto = choose_decode(model)
        decoders = dict(merged=prepare_decode(copy.deepcopy(model), "merged"), csr=prepare_decode(model, "csr"))
        prompt = torch.randint(0, 257, (1, 16), device=device)
        speed = dict.fromkeys(decoders, 0.0)
        for _ in range(repeats):
            for mode, m in decoders.items():
                sync(device)
                t0 = time.perf_counter()
                generate(m, prompt, n_tokens, temperature=0)
                sync(device)
                speed[mode] = max(speed[mode], n_tokens / (time.perf_counter() - t0))
        yield dict(model=name, blocks=cfg.n_layers, **speed, auto=auto)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="where to decode (default: cpu, the machine choose_decode is "
                   "tuned on)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="(default: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode; the best counts (default: 5)")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per run (default: 64)")
    p.add_argument("--json", action="store_true", help="one JSON record per model instead of the table")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if args.repeats < 1 or args.tokens < 1:
        p.error(f"--repeats {args.repeats} --tokens {args.tokens}: both must be >= 1")
    if args.device not in devices():
        p.error(f"--device {args.device}: must be one of: {', '.join(devices())}")
    if not args.json:
        print(f"decode tokens/s on {args.device}, {torch.get_num_threads()} threads, fp32, batch 1, 16-token prompt "
              f"then {args.tokens} tokens, best of {args.repeats}")
    for row in bench(args.device, args.models, args.repeats, args.tokens):
        if args.json:
            print(json.dumps(row), flush=True)
            continue
        label = f"{row['model']} ({row['blocks']} block{'s' if row['blocks'] > 1 else ''})"
        print(f"{label:14} merged {row['merged']:8.1f} tok/s | csr {row['csr']:8.1f} tok/s | "
              f"csr / merged {row['csr'] / row['merged']:.2f} | auto: {row['auto']}", flush=True)


if __name__ == "__main__":
    main()
