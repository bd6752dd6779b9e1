"""
Sample text from a trained run, in nanoGPT's spirit:

    python sample.py --out-dir out/tiny-sltrain --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0
    python sample.py --bench      # decode tokens/s, merged W vs factorized SL layers (tiny, 60m, one 7b block)

`load_model(out_dir)` reads any run train.py writes: every method (full, lowrank, sltrain), a
single-file ckpt.pt, an FSDP2 sharded checkpoint (latest-sharded -> sharded-<step>/rank<r>-of-<N>.pt,
read by one process, no torchrun), or the model.pt of --consolidate. It returns the model in eval
mode, exactly as train.py built it, so model(ids) gives the training logits. sample.py, eval.py and
export.py all load through it. The tokenizer is the one the run's data was prepared with (log.jsonl's
config record keeps the data's meta.json), so the user never names it.

Decoding keeps a KV cache (model.py): each new token costs one token's work. It reads every weight
once per token, so it is bound by the bytes it reads, and an SL layer can be read two ways:
  --decode merged      W = scale * B A + S formed once, one dense (out, in) matrix per layer
  --decode factorized  A, B and S's CSR values and column indices (sltrain.factorized_forward):
                       rank * (in + out) + 2 * nnz numbers instead of in * out: 0.44-0.60 of them at 7b
  --decode auto        (the default) the faster of the two on the project's CPU machine, by
                       `python sample.py --bench`: factorized for 60m and up, merged for tiny (choose_decode)
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

import train
from data.prepare import OfflineError, get_encoding
from model import CONFIGS, LLaMA, Rotary
from sltrain import SLLinear, factorized_forward, swap_linears

DECODE_MODES = ("merged", "factorized")
CACHE_BYTES = 32 * 2**20  # the last-level cache of a CPU (32 MiB on the project machine): see choose_decode

# -----------------------------------------------------------------------------
# loading a run


def read_checkpoint(out_dir):
    """-> (model state dict on the CPU, the run's config (train.py's flags), checkpoint path).
    A single-file ckpt.pt first, then the newest sharded checkpoint, then a consolidated model.pt."""
    if not os.path.isdir(out_dir):
        sys.exit(f"error: no run at {out_dir}: --out-dir must be a folder train.py wrote")
    single, pointer, merged = (os.path.join(out_dir, n) for n in ("ckpt.pt", "latest-sharded", "model.pt"))
    if os.path.exists(single):
        state = safe_load(single)
        return state["model"], state["config"], single
    if os.path.exists(pointer):
        return read_sharded(out_dir, pointer)
    if os.path.exists(merged):
        state = safe_load(merged)
        return state["model"], state["config"], merged
    sys.exit(f"error: no checkpoint in {out_dir} (no ckpt.pt, latest-sharded or model.pt): a run writes one at "
             f"every eval, so train at least --eval-every steps")


def safe_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        sys.exit(f"error: the checkpoint {path} is unreadable ({type(e).__name__}): it is corrupt or truncated")


def read_sharded(out_dir, pointer):
    """Join the N rank files of an FSDP2 checkpoint into one state dict, in one process. Each
    rank saved its DTensors: FSDP2 shards every parameter along dim 0 into N chunks (torch.chunk,
    so the last ones may be shorter or empty), so concatenating the local pieces in rank order
    gives the full tensor. Buffers (the supports) are plain tensors, the same on every rank."""
    folder = os.path.join(out_dir, open(pointer).read().strip())
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if not names or not names[0].startswith("rank"):
        sys.exit(f"error: {pointer} points to {folder}, which holds no rank files: the checkpoint is incomplete")
    world = int(names[0].split("-of-")[1].split(".")[0])
    pieces, config = {}, None
    # unpickling a DTensor rebuilds its device mesh without a process group: torch logs a warning
    # that matters only to torch.compile; we only read the local tensors
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    for r in range(world):
        path = os.path.join(folder, f"rank{r}-of-{world}.pt")
        if not os.path.exists(path):
            sys.exit(f"error: {path} is missing: a sharded checkpoint needs all {world} rank files")
        state = safe_load(path)
        for k, v in state["model"].items():
            pieces.setdefault(k, []).append(v)
        config = state["config"]
        del state  # the optimizer state is not needed: one rank's file at a time
    full = {}
    for k, vs in pieces.items():
        if not isinstance(vs[0], DTensor):
            full[k] = vs[0]
            continue
        placement = vs[0].placements[0]
        if isinstance(placement, Shard):
            full[k] = torch.cat([v.to_local() for v in vs], dim=placement.dim)
        else:  # replicated: every rank holds all of it
            full[k] = vs[0].to_local()
        if full[k].shape != vs[0].shape:
            sys.exit(f"error: the shards of {k} in {folder} join to {tuple(full[k].shape)}, not {tuple(vs[0].shape)}")
    return full, config, folder


def load_model(out_dir, device="cpu"):
    """The run's model on `device`, in eval mode, built by train.build_model from the run's own
    flags. model.train_config holds those flags (a dict) and model.checkpoint the path read."""
    state, config, path = read_checkpoint(out_dir)
    model = train.build_model(argparse.Namespace(**config), config["vocab_size"])  # meta device
    model.to_empty(device=device)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        sys.exit(f"error: {path} does not fit the model its config describes: {str(e).splitlines()[0]}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Rotary):  # the RoPE tables are not saved: recompute them
                module.reset_parameters()
    model.train_config, model.checkpoint = config, path
    return model.eval()


def run_data_meta(out_dir, config):
    """The meta.json of the data the run trained on (tokenizer, vocab_size, eot_token): log.jsonl's
    config record keeps a copy (data_meta), else the data folder's own file is read."""
    meta, log = None, os.path.join(out_dir, "log.jsonl")
    if os.path.exists(log):
        for line in open(log):
            record = json.loads(line)
            if record.get("type") == "config" and "data_meta" in record:
                meta = record["data_meta"]
    path = os.path.join(config.get("data") or "", "meta.json")
    if meta is None and os.path.exists(path):
        meta = json.load(open(path))
    if meta is None or "tokenizer" not in meta:
        sys.exit(f"error: {out_dir} does not say which tokenizer its data used (no config record in its log.jsonl, "
                 f"no {path}): copy the run's log.jsonl beside its checkpoint")
    return meta


def load_tokenizer(out_dir, config):
    """The tiktoken encoding the run's data was prepared with."""
    name = run_data_meta(out_dir, config)["tokenizer"]
    try:
        return get_encoding(name)
    except (OfflineError, ValueError) as e:
        sys.exit(f"error: the run's tokenizer {name!r} cannot be loaded: {e}")


# -----------------------------------------------------------------------------
# decoding


def prepare_decode(model, mode):
    """Make every SL layer decode one way (see the module docstring). Merged swaps in a dense
    nn.Linear; factorized keeps the layer and routes its forward through sltrain.factorized_forward."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, SLLinear):
                continue
            if mode == "factorized":
                child.forward = partial(factorized_forward, child)
            else:
                dense = nn.Linear(child.in_features, child.out_features, bias=False, device=child.A.device,
                                  dtype=child.A.dtype)
                with torch.no_grad():
                    dense.weight.copy_(child.dense_weight())
                setattr(parent, name, dense)
    return model


def choose_decode(model):
    """The faster decode mode in `python sample.py --bench` on the project's CPU machine: factorized
    once the merged SL weights outgrow the cache (60m: 101 MB; each token streams them from memory,
    so fewer bytes win), merged while they fit (tiny: 3 MB; the cost is per operation, and merged
    runs one matmul where factorized runs three and a sparse product)."""
    merged_bytes = sum(m.in_features * m.out_features * m.A.element_size()
                       for m in model.modules() if isinstance(m, SLLinear))
    return "factorized" if merged_bytes > CACHE_BYTES else "merged"


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


def bench(device, repeats=5, n_tokens=64):
    """Decode tokens/s with merged vs factorized SL layers: the whole tiny and 60m models and one 7b
    block (seven SL layers), vocab 257 so the embeddings do not hide the blocks; random weights. The two
    modes alternate, and each keeps its best of `repeats` runs: on a shared machine the best run is
    the one least disturbed by other work."""
    print(f"decode tokens/s on {device}, {torch.get_num_threads()} threads, fp32, batch 1, 16-token prompt then "
          f"{n_tokens} tokens, best of {repeats}")
    for name, n_layers in (("tiny", None), ("60m", None), ("7b", 1)):
        cfg = replace(CONFIGS[name], vocab_size=257, max_seq_len=256, n_layers=n_layers or CONFIGS[name].n_layers)
        with torch.device("meta"):
            model = swap_linears(LLaMA(cfg), "sltrain", cfg.rank, cfg.delta, cfg.alpha)
        model.to_empty(device=device)
        model.init_weights(seed=0).eval()
        auto = choose_decode(model)
        models = dict(merged=prepare_decode(copy.deepcopy(model), "merged"),
                      factorized=prepare_decode(model, "factorized"))
        prompt = torch.randint(0, 257, (1, 16), device=device)
        speed = dict.fromkeys(models, 0.0)
        for _ in range(repeats):
            for mode, m in models.items():
                sync(device)
                t0 = time.perf_counter()
                generate(m, prompt, n_tokens, temperature=0)
                sync(device)
                speed[mode] = max(speed[mode], n_tokens / (time.perf_counter() - t0))
        label = f"{name} ({cfg.n_layers} block{'s' if cfg.n_layers > 1 else ''})"
        print(f"{label:14} " + " | ".join(f"{mode} {s:8.1f} tok/s" for mode, s in speed.items()) +
              f" | factorized / merged {speed['factorized'] / speed['merged']:.2f} | auto: {auto}")


# -----------------------------------------------------------------------------
# the script


def check_flags(p, args):
    """One line per bad value, naming the flag and its rule (train.py's form)."""
    devices = ["cpu"] + ["cuda"] * torch.cuda.is_available() + [f"cuda:{n}" for n in range(torch.cuda.device_count())]
    for ok, flag, rule in (  # (holds?, the flag as typed, what a valid value is)
            (args.max_new_tokens >= 0, f"--max-new-tokens {args.max_new_tokens}", "must be >= 0"),
            (0 <= args.temperature < math.inf, f"--temperature {args.temperature}", "must be a finite number >= 0 (0 = "
             "greedy)"),  # a NaN fails every comparison, so it lands here too
            (args.top_k >= 0, f"--top-k {args.top_k}", "must be >= 0 (0 = all tokens)"),
            (0 <= args.seed < 2**32, f"--seed {args.seed}", "must be in [0, 2**32)"),
            (args.device in devices, f"--device {args.device}", f"must be one of: {', '.join(devices)}")):
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
                   help="how SL layers decode: one merged dense W, or from the factors; auto picks the faster "
                   "for the model's size (default: auto)")
    p.add_argument("--bench", action="store_true", help="time merged vs factorized decoding, then exit")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    check_flags(p, args)
    if args.bench:
        return bench(args.device)
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
    print(text)
    print(f"--- {args.max_new_tokens} tokens in {seconds:.2f} s: {args.max_new_tokens / seconds:,.0f} tokens/s "
          f"({decode} decode, {args.device}, {model.checkpoint})", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
