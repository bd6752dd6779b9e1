"""
Export a run to the Hugging Face LLaMA layout, the format transformers, vLLM and the llama.cpp
converters read:

    python export.py --out-dir out/tiny-sltrain --hf-dir hf/tiny-sltrain
    # then, anywhere:  transformers.LlamaForCausalLM.from_pretrained("hf/tiny-sltrain")

writes config.json and model.safetensors. Every block linear becomes one dense matrix: an SL layer
is merged to W = scale * B A + S (low-rank product, scale and sparse part; a low-rank layer is the
same with S = 0), so the export is an ordinary LLaMA of the full-rank size. Three details decide
whether the logits match (tests/test_export.py checks them against transformers):
  - RoPE: model.py rotates interleaved channel pairs (2i, 2i+1) of a head; transformers rotates
    halves (i, i + hd/2). Dot products q.k do not care how channels are ordered as long as q and k
    agree, so each head's q and k rows are reordered from pairs to halves, the permutation
    transformers' own LLaMA conversion applies; v and o are untouched.
  - RMSNorm eps, untied lm_head, and the vocabulary (257 for the byte-level data) go in config.json.
  - The tokenizer is not exported: a byte-level run's token i is byte i and 256 is <|endoftext|>; a
    GPT-2 run pairs with the GPT-2 tokenizer (AutoTokenizer.from_pretrained("openai-community/gpt2")),
    whose files cannot be made offline.
model.safetensors is written here, not by a library: an 8-byte little-endian header length, a JSON
header giving each tensor's dtype, shape and byte range, then the raw bytes. This file never imports
transformers; only the tests do.
"""
import argparse
import json
import os
import struct
import sys
from functools import partial

import torch

from sample import load_model, run_data_meta
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", help="the run's folder (train.py's --out-dir)")
    p.add_argument("--hf-dir", help="folder to write config.json and model.safetensors into")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the exported weights (default: float32)")
    args = p.parse_args(argv)
    if args.out_dir is None or args.hf_dir is None:
        sys.exit("error: --out-dir (a run's folder) and --hf-dir (where to write) are both required")
    model = load_model(args.out_dir)
    meta = run_data_meta(args.out_dir, model.train_config)
    dtype = getattr(torch, args.dtype)
    os.makedirs(args.hf_dir, exist_ok=True)
    n_bytes = write_safetensors(os.path.join(args.hf_dir, "model.safetensors"), list(hf_weights(model)), dtype)
    with open(os.path.join(args.hf_dir, "config.json"), "w") as f:
        json.dump(hf_config(model, meta, dtype), f, indent=2)
    tokenizer = {"byte": "byte-level: token i is byte i, 256 is <|endoftext|>",
                 "gpt2": "GPT-2 BPE: pair with AutoTokenizer.from_pretrained('openai-community/gpt2')"}
    print(f"wrote {args.hf_dir}/config.json and model.safetensors ({n_bytes / 1e6:.1f} MB, {args.dtype}) from "
          f"{model.checkpoint}; tokenizer {tokenizer.get(meta.get('tokenizer'), meta.get('tokenizer'))}")


if __name__ == "__main__":
    main()
