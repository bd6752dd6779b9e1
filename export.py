"""
Export a run to the Hugging Face LLaMA layout, a folder transformers, vLLM and the llama.cpp
converters read on its own:

    python export.py --out-dir out/tiny-sltrain --hf-dir hf/tiny-sltrain
    # then, anywhere:  AutoModelForCausalLM.from_pretrained("hf/tiny-sltrain") and AutoTokenizer likewise

writes config.json, model.safetensors, generation_config.json, the tokenizer files (run/hf_tokenizer.py)
and a model card, README.md. Every block linear becomes one dense matrix: an SL layer is merged to
W = scale * B A + S (low-rank product, scale and sparse part; a low-rank layer is the same with
S = 0), so the export is an ordinary LLaMA of the full-rank size. Three details decide whether the
logits match (tests/test_export.py checks them against transformers):
  - RoPE: model.py rotates interleaved channel pairs (2i, 2i+1) of a head; transformers rotates
    halves (i, i + hd/2). Dot products q.k do not care how channels are ordered as long as q and k
    agree, so each head's q and k rows are reordered from pairs to halves, the permutation
    transformers' own LLaMA conversion applies; v and o are untouched.
  - RMSNorm eps, untied lm_head, and the vocabulary (257 for the byte-level data) go in config.json.
  - The tokenizer is the run's own tiktoken encoding, converted, so the folder encodes text to the
    ids the model trained on; <|endoftext|> ends a document, so generate stops there.
The folder is written whole or not at all: into a temporary folder beside --hf-dir, renamed into
place at the end. A folder that already holds files is replaced only with --force.
model.safetensors is written here, not by a library: an 8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then the raw bytes. This file never imports
transformers; only the tests do.
"""
import argparse
import errno
import json
import os
import shlex
import shutil
import struct
from functools import partial

import torch

from run.checkpoint import load_model, load_tokenizer, read_log, run_data_meta
from run.hf_tokenizer import write_tokenizer
from sltrain import SLLinear, densify

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
# our block linears -> transformers' names
LINEARS = (("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"), ("attn.wv", "self_attn.v_proj"),
           ("attn.wo", "self_attn.o_proj"), ("mlp.w_gate", "mlp.gate_proj"), ("mlp.w_up", "mlp.up_proj"),
           ("mlp.w_down", "mlp.down_proj"))


def pairs_to_halves(W, n_heads):
    """Reorder the rows of a q or k weight (out, in): within each head, row 2i + c (channel pair i,
    member c) moves to c * hd/2 + i. View rows as (head, hd/2, 2), swap to (head, 2, hd/2)."""
    out, n_in = W.shape
    return W.reshape(n_heads, out // n_heads // 2, 2, n_in).transpose(1, 2).reshape(out, n_in)


def dense(layer, n_heads=None):
    """The (out, in) weight a block linear applies, in fp32; q and k rows permuted for RoPE halves."""
    if isinstance(layer, SLLinear):
        W = densify(layer.A.float(), layer.B.float(), layer.values.float(), layer.indices, layer.scale)
    else:
        W = layer.weight.float()
    return pairs_to_halves(W, n_heads) if n_heads else W


def hf_weights(model):
    """(name, shape, make) for every tensor of the export; make() computes it. Functions, not
    tensors: a merged W is formed only when it is written, one layer at a time."""
    yield "model.embed_tokens.weight", model.tok_emb.weight.shape, model.tok_emb.weight.detach
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        yield prefix + "input_layernorm.weight", block.attn_norm.weight.shape, block.attn_norm.weight.detach
        yield prefix + "post_attention_layernorm.weight", block.mlp_norm.weight.shape, block.mlp_norm.weight.detach
        for ours, theirs in LINEARS:
            layer = block.get_submodule(ours)
            n_heads = model.cfg.n_heads if ours in ("attn.wq", "attn.wk") else None
            yield prefix + theirs + ".weight", (layer.out_features, layer.in_features), partial(dense, layer, n_heads)
    yield "model.norm.weight", model.norm.weight.shape, model.norm.weight.detach
    yield "lm_head.weight", model.lm_head.weight.shape, model.lm_head.weight.detach


def write_safetensors(path, entries, dtype):
    """entries: (name, shape, make) in file order. Data follows the header back to back."""
    header, offset, size = {}, 0, torch.empty((), dtype=dtype).element_size()
    for name, shape, _ in entries:
        n_bytes = size * torch.Size(shape).numel()
        header[name] = dict(dtype=SAFETENSORS_DTYPES[dtype], shape=list(shape), data_offsets=[offset, offset + n_bytes])
        offset += n_bytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad with spaces so the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))  # header length: unsigned 64-bit, little-endian
        f.write(blob)
        with torch.no_grad():
            for name, shape, make in entries:
                t = make().to(dtype).contiguous().cpu()
                assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes, little-endian on x86/ARM
    os.replace(path + ".tmp", path)
    return offset


def hf_config(model, meta, dtype):
    cfg = model.cfg
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.dim,
                intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_heads, head_dim=cfg.dim // cfg.n_heads, hidden_act="silu",
                rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, vocab_size=cfg.vocab_size,
                # older transformers read rope_theta, newer ones rope_parameters
                rope_theta=cfg.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                bos_token_id=meta.get("eot_token"), eos_token_id=meta.get("eot_token"),
                torch_dtype=str(dtype).removeprefix("torch."))


def generation_config(meta):
    """What generate reads besides the weights: a document ends at <|endoftext|>, and batches pad with it."""
    eot = meta.get("eot_token")
    return dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=False)


# -----------------------------------------------------------------------------
# the model card


def run_log(out_dir):
    """log.jsonl's records (run/checkpoint.read_log: a torn or merged line is named and skipped)."""
    path = os.path.join(out_dir, "log.jsonl")
    return read_log(path) if os.path.exists(path) else []


def command(config):
    """The train.py command a config record came from, as a shell line, or None when train.main was
    called from other Python code (its argv is then that program's)."""
    argv = config.get("argv") or []
    if not argv or os.path.basename(argv[0]) != "train.py":
        return None
    world = config.get("world_size", 1)
    launcher = f"torchrun --nproc_per_node={world} train.py" if world > 1 else "python train.py"
    return " ".join([launcher] + [shlex.quote(a) for a in argv[1:]])


METHOD_TEXT = {
    "full": "full-rank weights, as a plain LLaMA (the baseline; nothing to merge)",
    "lowrank": "low-rank block linears `W = scale * B A` (rank {rank}, scale = alpha / rank = {alpha:g} / {rank}), "
               "merged here to one dense `W` each",
    "sltrain": "SLTrain: each block linear is `W = scale * B A + S`, a low-rank product (rank {rank}, scale = "
               "alpha / rank = {alpha:g} / {rank}) plus a sparse S on a fixed random support ({delta:.0%} of the "
               "entries); merged here to one dense `W = scale * B A + S` each",
}


def model_card(model, meta, records, n_params, n_bytes, dtype, folder):
    """README.md of the export: what the model is, how it was trained (from the run's log), its size and
    how to load it."""
    cfg, run = model.cfg, model.train_config
    configs = [r for r in records if r.get("type") == "config"]
    evals = [r for r in records if r.get("type") == "eval"]
    name = f"{run['model']}-{run['method']}"
    source = meta.get("source", "?")
    data = {"stdlib": f"the .py files of the Python {meta.get('python_version', '')} standard library (offline)",
            "c4": "C4 English (allenai/c4)"}.get(source, source)
    if meta.get("text_files"):
        data = f"local text files ({', '.join(os.path.basename(f) for f in meta['text_files'])})"
    tokenizer = {"byte": "byte-level: token i is byte i, `<|endoftext|>` = 256",
                 "gpt2": "GPT-2 BPE, `<|endoftext|>` = 50256"}.get(meta.get("tokenizer"), meta.get("tokenizer"))
    lines = [f"# {name}", "",
             f"A LLaMA of nano-sltrain's `{run['model']}` size ({cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} "
             f"heads, ffn {cfg.ffn_dim}, context {cfg.max_seq_len} tokens, vocab {cfg.vocab_size}), trained from "
             f"scratch with " + METHOD_TEXT[run["method"]].format(**run) + ". The folder holds an ordinary "
             "`LlamaForCausalLM`: transformers needs no custom code.", "", "## Training", "",
             f"- Data: {data}; its training split holds {meta.get('train_tokens', 0):,} tokens.",
             f"- Tokenizer: {tokenizer} (tokenizer.json, converted from the run's tiktoken encoding)."]
    tokens_per_step = run["batch_size"] * run["grad_accum"] * run["seq_len"] * run.get("world_size", 1)
    if evals:
        last = evals[-1]
        lines += [f"- Steps: {last['step']:,} of {run['max_steps']:,}, {last['step'] * tokens_per_step:,} tokens "
                  f"({tokens_per_step:,} per step).",
                  f"- Final validation loss {last['val_loss']:.4f} (perplexity {last['val_ppl']:.2f}) at step "
                  f"{last['step']:,}, on {run['eval_tokens']:,} held-out tokens."]
    else:
        lines.append("- Steps, tokens and validation loss: not known (no eval record in the run's log.jsonl).")
    commands = [command(c) for c in configs]
    if commands and all(commands):
        lines += ["- Command" + (", then each resume" if len(commands) > 1 else "") + ":", "", "```"] + commands + ["```"]
    else:
        lines.append("- Command: train.py was run from Python code, not from a shell; the flags are in the "
                     "config record of the run's log.jsonl." if configs else "- Command: not known (no log.jsonl).")
    lines += ["", "## Size", "",
              f"{n_params:,} parameters on disk ({n_bytes / 1e6:.1f} MB, {dtype}): the dense model's count, since "
              f"every merged layer is a full out x in matrix. The trained model held "
              f"{sum(p.numel() for p in model.parameters()):,}.", "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f"tok, model = AutoTokenizer.from_pretrained({folder!r}), AutoModelForCausalLM.from_pretrained({folder!r})",
              f"print(tok.decode(model.generate(**tok('def ', return_tensors='pt'), max_new_tokens="
              f"{min(100, cfg.max_seq_len // 2)}, do_sample=True, temperature=0.8, top_k=50)[0]))", "```", "",
              "It samples: greedy decoding (`do_sample=False`) of a small model repeats a few tokens over and over, "
              "which is the model, not the export.", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the folder: written beside the target, renamed into place


def staging_folder(target):
    """A new empty folder beside `target` (same file system, so the final rename is atomic)."""
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    for n in range(100):
        path = os.path.join(parent, f".{base}.export-{os.getpid()}-{n}.tmp")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "too many leftover temporary folders", parent)


def alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    return True


def publish(staging, target):
    """Move the finished folder `staging` to `target`. An old export steps aside first and is deleted
    last, so a crash at any point leaves the old export or the new one (or, between the two renames,
    the old one under its aside name), never a mixture."""
    for name in os.listdir(staging):  # on disk before the rename makes them visible
        with open(os.path.join(staging, name), "rb") as f:
            os.fsync(f.fileno())
    aside = None
    if os.path.isdir(target) and os.listdir(target):
        aside = staging.removesuffix(".tmp") + ".old.tmp"
        os.rename(target, aside)
    try:
        os.rename(staging, target)  # onto a missing or empty folder
    except OSError:
        if aside:
            os.rename(aside, target)
        raise
    fd = os.open(os.path.dirname(target), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    if aside:  # the new export is in place: a failure to delete the old one must not say otherwise
        shutil.rmtree(aside, ignore_errors=True)
    parent, base = os.path.split(target)
    for name in os.listdir(parent):  # what exports killed part way (kill -9, power cut) left: only now, with
        pid = name.removeprefix(f".{base}.export-").split("-")[0]  # the new export in place, is it garbage
        if name.startswith(f".{base}.export-") and name.endswith(".tmp") and pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def check_target(p, args):
    """Refuse, before any work, a --hf-dir that cannot or must not be replaced. --force replaces an
    earlier export only (config.json and model.safetensors): never a folder of other files, such as a home."""
    if not args.hf_dir or not args.out_dir:
        p.error(f"--{'hf-dir' if not args.hf_dir else 'out-dir'} '': empty (an unset shell variable?): pass a folder")
    target, run = os.path.abspath(args.hf_dir), os.path.abspath(args.out_dir)
    if os.path.commonpath([target, run]) == target:
        p.error(f"--hf-dir {args.hf_dir}: must not be the run's folder or hold it (--out-dir {args.out_dir}): the "
                f"export replaces the whole folder; pass a new one, such as {os.path.join(args.out_dir, 'hf')}")
    above = target
    while not os.path.lexists(above):  # the nearest existing part of the path must be a folder
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        where = "is a file" if above == target else f"is under {above}, a file"
        p.error(f"--hf-dir {args.hf_dir}: {where}, not a folder: pass a folder to write the export into")
    held = sorted(os.listdir(target)) if os.path.isdir(target) else []
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    if held and not args.force:
        p.error(f"--hf-dir {args.hf_dir}: already holds {len(held)} file(s) ({shown}): pass --force to replace "
                f"them with this export, or choose another folder")
    if held and not {"config.json", "model.safetensors"} <= set(held):
        p.error(f"--hf-dir {args.hf_dir}: holds files that are not an export (no config.json and model.safetensors: "
                f"{shown}); --force replaces an earlier export only: choose another folder")
    return target


# -----------------------------------------------------------------------------
# the script


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", help="the run's folder (train.py's --out-dir)")
    p.add_argument("--hf-dir", help="folder to write the export into (made whole, then renamed into place)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the exported weights (default: float32)")
    p.add_argument("--force", action="store_true", help="replace an --hf-dir that already holds files")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if args.out_dir is None or args.hf_dir is None:
        p.error("--out-dir (a run's folder) and --hf-dir (where to write) are both required")
    target = check_target(p, args)
    staging = None
    try:
        try:
            staging = staging_folder(target)
        except OSError as e:
            p.error(f"--hf-dir {args.hf_dir}: cannot write there ({e.strerror or e}): pass a folder you can write")
        model = load_model(args.out_dir)
        meta = run_data_meta(args.out_dir, model.train_config)
        enc = load_tokenizer(args.out_dir, model.train_config)
        dtype = getattr(torch, args.dtype)
        entries = list(hf_weights(model))
        try:
            n_bytes = write_safetensors(os.path.join(staging, "model.safetensors"), entries, dtype)
            files = {"config.json": hf_config(model, meta, dtype), "generation_config.json": generation_config(meta)}
            for name, content in files.items():
                with open(os.path.join(staging, name), "w") as f:
                    json.dump(content, f, indent=2)
            write_tokenizer(staging, enc, meta["eot_token"], model.cfg.max_seq_len)
            n_params = sum(torch.Size(shape).numel() for _, shape, _ in entries)
            card = model_card(model, meta, run_log(args.out_dir), n_params, n_bytes, args.dtype, args.hf_dir)
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
                f.write(card)
            publish(staging, target)
        except OSError as e:
            p.error(f"--hf-dir {args.hf_dir}: writing the export failed ({e.strerror or e}): nothing was replaced")
    finally:
        if staging and os.path.isdir(staging):  # an error or Ctrl-C part way: the target is untouched
            shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.hf_dir}: config.json, generation_config.json, model.safetensors ({n_bytes / 1e6:.1f} MB, "
          f"{args.dtype}), tokenizer files ({meta['tokenizer']}) and README.md, from {model.checkpoint}")


if __name__ == "__main__":
    main()
