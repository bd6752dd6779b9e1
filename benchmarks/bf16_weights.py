"""
bf16 weights: which way of writing the fp32 update back to a bf16 weight keeps the run learning?

    python benchmarks/bf16_weights.py            # 5 runs, ~5 min on 2 idle CPU cores; prints a markdown table

Trains the tiny model (AdamW, lr 1e-3, 200 steps of 16 x 64 tokens: 4 x 4 micro-steps, seed 0) with fp32 weights, then
with bf16 weights under four write-backs, and reports the final val loss, how far the RMSNorm gains
moved off 1.0, and the extra bytes per parameter each costs:
  nearest     round to the nearest bf16 (what torch's AdamW does on bf16 weights): 0 B
  stochastic  round up or down with probability by distance (optim.stochastic_round): 0 B
  kahan       a bf16 compensation buffer carries what rounding dropped into the next step: 2 B
  master      an fp32 master copy takes the update; the bf16 weight is its rounding: 4 B
optim.py's AdamW8bit uses `stochastic`; the others are defined here, by overriding its two hooks.
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import train  # noqa: E402
from run.checkpoint import read_log  # noqa: E402
from model import RMSNorm  # noqa: E402
from optim import AdamW8bit  # noqa: E402

FLAGS = ["--model", "tiny", "--lr", "1e-3", "--max-steps", "200", "--batch-size", "4", "--seq-len", "64",
         "--eval-tokens", "8192", "--log-every", "200", "--eval-every", "200", "--seed", "0"]


# (these variants ignore `bad`, the skip flag for a non-finite gradient: the runs here have none)
def nearest(opt, p, p32, state, start, end, bad):
    p[start:end].copy_(p32)


def kahan_load(opt, p, state, start, end):
    if "kahan" not in state:
        state["kahan"] = torch.zeros_like(p)  # bf16: what the last rounding dropped
    return p[start:end].float() + state["kahan"][start:end].float()


def kahan_store(opt, p, p32, state, start, end, bad):
    p[start:end].copy_(p32)
    state["kahan"][start:end].copy_(p32 - p[start:end].float())


def master_load(opt, p, state, start, end):
    if "master" not in state:
        state["master"] = p.float()  # fp32 copy
    return state["master"][start:end]  # a view: the update lands in the master copy


def master_store(opt, p, p32, state, start, end, bad):
    p[start:end].copy_(p32)


VARIANTS = {  # name: (load_param, store_param, extra bytes per parameter)
    "stochastic": (AdamW8bit.load_param, AdamW8bit.store_param, 0),
    "nearest": (AdamW8bit.load_param, nearest, 0),
    "kahan": (kahan_load, kahan_store, 2),
    "master": (master_load, master_store, 4),
}


def run(extra, load=None, store=None):
    real = AdamW8bit.load_param, AdamW8bit.store_param
    if load:
        AdamW8bit.load_param, AdamW8bit.store_param = load, store
    try:
        with tempfile.TemporaryDirectory() as out:
            model = train.main(FLAGS + ["--out-dir", out, *extra])
            val = [r for r in train_log(out) if r["type"] == "eval"][-1]["val_loss"]
    finally:
        AdamW8bit.load_param, AdamW8bit.store_param = real
    gains = torch.cat([m.weight.detach().float().flatten() for m in model.modules() if isinstance(m, RMSNorm)])
    return val, (gains != 1).float().mean().item(), (gains - 1).abs().mean().item()


def train_log(out):
    return read_log(os.path.join(out, "log.jsonl"))


def main():
    rows = [("fp32 weights", 0, *run([]))]
    for name, (load, store, extra_bytes) in VARIANTS.items():
        rows.append((f"bf16, {name}", extra_bytes, *run(["--param-dtype", "bfloat16"], load, store)))
    ref = rows[0][2]
    print(f"\ntiny, AdamW, lr 1e-3, 200 steps of 16 x 64 tokens, seed 0 ({' '.join(FLAGS)})\n")
    print("| weights, write-back | extra B/param | final val loss | vs fp32 | norm gains != 1 | mean abs(gain - 1) |")
    print("|---|---|---|---|---|---|")
    for name, extra_bytes, val, moved, dist in rows:
        print(f"| {name} | {extra_bytes} | {val:.4f} | {100 * (val - ref) / ref:+.2f}% | {100 * moved:.1f}% | {dist:.2e} |")


if __name__ == "__main__":
    main()
