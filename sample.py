"""
Sample text from a trained run, in nanoGPT's spirit:

    python sample.py --out-dir out/tiny-sltrain --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0

The model comes from run/checkpoint.load_model: any run train.py writes (every method; a single, sharded
or gathered checkpoint), in eval mode, exactly as train.py built it. The tokenizer is the one the run's
data was prepared with (log.jsonl's config record keeps the data's meta.json), so the user never names it.

Decoding keeps a KV cache (model.py): each new token costs one token's work. It reads every weight
once per token, so it is bound by the bytes it reads, and an SL layer can be read two ways:
  --decode merged  W = scale * B A + S formed once, one dense (out, in) matrix per layer
  --decode csr     A, B, and S as a CSR matrix: its values and column indices (sltrain.csr_forward),
                   rank * (in + out) + 2 * nnz numbers instead of in * out: 0.44-0.60 of them at 7b
  --decode auto    (the default) the faster of the two on the project's CPU machine, as
                   `python benchmarks/decode_bench.py` measures: csr for 60m and up, merged for tiny
                   (choose_decode)
"""
import argparse
import math
import sys
import time
from functools import partial

import torch
import torch.nn as nn

from run.checkpoint import load_model, load_tokenizer
from run.flags import devices
from sltrain import SLLinear, csr_forward

DECODE_MODES = ("merged", "csr")
CACHE_BYTES = 32 * 2**20  # the last-level cache of a CPU (32 MiB on the project machine): see choose_decode

# -----------------------------------------------------------------------------
# decoding


def prepare_decode(model, mode):
    """Make every SL layer decode one way (see the module docstring). Merged swaps in a dense
    nn.Linear; csr keeps the layer and routes its forward through sltrain.csr_forward."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, SLLinear):
                continue
            if mode == "csr":
                child.forward = partial(csr_forward, child)
            else:
                dense = nn.Linear(child.in_features, child.out_features, bias=False, device=child.A.device,
                                  dtype=child.A.dtype)
                with torch.no_grad():
                    dense.weight.copy_(child.dense_weight())
                setattr(parent, name, dense)
    return model


def choose_decode(model):
    """The faster decode mode in `python benchmarks/decode_bench.py` on the project's CPU machine: csr
    once the merged SL weights outgrow the cache (60m: 101 MB; each token streams them from memory,
    so fewer bytes win), merged while they fit (tiny: 3 MB; the cost is per operation, and merged
    runs one matmul where csr runs three and a sparse product)."""
    merged_bytes = sum(m.in_features * m.out_features * m.A.element_size()
                       for m in model.modules() if isinstance(m, SLLinear))
    return "csr" if merged_bytes > CACHE_BYTES else "merged"


def next_token(logits, temperature, top_k, generator):
    """logits (B, V) -> sampled ids (B, 1). temperature 0 is greedy; top_k keeps the k likeliest."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """ids (B, T) -> (B, T + max_new_tokens). The prompt runs once (prefill); then each token runs
    alone against the KV cache. The model knows max_seq_len positions (its RoPE table, the length it
    was trained on): when the cache is full, decoding restarts from the last half of the window, one
    prefill per max_seq_len / 2 tokens, so the cost per token stays flat."""
    window = model.cfg.max_seq_len
    model.setup_cache()
    context = ids[:, -window:]
    logits = model(context, start_pos=0)[0][:, -1]  # (B, V)
    pos = context.shape[1]
    for _ in range(max_new_tokens):
        new = next_token(logits, temperature, top_k, generator)  # (B, 1)
        ids = torch.cat([ids, new], dim=1)
        if pos == window:  # no position left: refill the cache from the newest half window
            context = ids[:, -max(1, window // 2):]
            logits, pos = model(context, start_pos=0)[0][:, -1], context.shape[1]
        else:
            logits, pos = model(new, start_pos=pos)[0][:, -1], pos + 1
    model.setup_cache(enabled=False)
    return ids


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# -----------------------------------------------------------------------------
# the script


def check_flags(p, args):
    """One line per bad value, naming the flag and its rule (train.py's form)."""
    for ok, flag, rule in (  # (holds?, the flag as typed, what a valid value is)
            (args.max_new_tokens >= 0, f"--max-new-tokens {args.max_new_tokens}", "must be >= 0"),
            (0 <= args.temperature < math.inf, f"--temperature {args.temperature}", "must be a finite number >= 0 (0 = "
             "greedy)"),  # a NaN fails every comparison, so it lands here too
            (args.top_k >= 0, f"--top-k {args.top_k}", "must be >= 0 (0 = all tokens)"),
            (0 <= args.seed < 2**32, f"--seed {args.seed}", "must be in [0, 2**32)"),
            (args.device in devices(), f"--device {args.device}", f"must be one of: {', '.join(devices())}")):
        if not ok:
            p.error(f"{flag}: {rule}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", help="the run's folder (train.py's --out-dir)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens, 0 = all (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (default: 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decode", choices=("auto",) + DECODE_MODES, default="auto",
                   help="how SL layers decode: one merged dense W, or from A, B and S in CSR form; auto picks the "
                   "faster for the model's size (default: auto)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    check_flags(p, args)
    if args.out_dir is None:
        p.error("--out-dir is required: the folder of a run train.py wrote")

    model = load_model(args.out_dir, args.device)
    vocab, window = model.cfg.vocab_size, model.cfg.max_seq_len
    if args.top_k > vocab:
        p.error(f"--top-k {args.top_k}: must be in [0, {vocab}], the model's vocabulary (0 = all)")
    decode = choose_decode(model) if args.decode == "auto" else args.decode
    prepare_decode(model, decode)
    enc = load_tokenizer(args.out_dir, model.train_config)
    prompt = enc.encode(args.prompt, allowed_special="all") or [enc.eot_token]  # empty: a new document
    if max(prompt) >= vocab:
        sys.exit(f"error: the prompt has tokens beyond the model's vocabulary of {vocab}")
    if len(prompt) + args.max_new_tokens > window:  # generate's sliding window: allowed, but say what it means
        print(f"note: the {len(prompt)}-token prompt and --max-new-tokens {args.max_new_tokens} pass the model's "
              f"context of {window} tokens: " + (f"it reads the prompt's last {window} tokens only, and " if
              len(prompt) > window else "") + f"past {window} tokens each new token sees the newest "
              f"{window // 2} to {window} tokens, never the text before them", file=sys.stderr)
    ids = torch.tensor([prompt], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    sync(args.device)
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, generator)
    sync(args.device)
    seconds = time.perf_counter() - t0
    text = enc.decode(out[0].tolist())
    print(text, flush=True)  # all of it out before the stats line (stderr is unbuffered, stdout is not)
    print(f"\n--- {args.max_new_tokens} tokens in {seconds:.2f} s: {args.max_new_tokens / seconds:,.0f} tokens/s "
          f"({decode} decode, {args.device}, {model.checkpoint})", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
