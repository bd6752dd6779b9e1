"""
Prepare token streams for pretraining: <out>/train.bin, <out>/val.bin and <out>/meta.json.

Format. Each .bin file is a flat array of uint16 token ids, read back with
np.memmap(path, dtype=np.uint16, mode="r"). Documents are packed back to back with no padding,
each one followed by the end-of-text token (meta["eot_token"]), so a training batch is any
window of the stream. meta.json is written last: if it exists, the data set is complete.

Sources.
  stdlib  The offline default: the .py files of the Python standard library, one document per
          file, byte-level tokens (vocab 257). It is real, structured text, about 30 MB of it,
          present on every machine that runs this script, needs no download, and is the same
          bytes for a given Python version, so a run can be repeated exactly anywhere.
  c4      C4 English as in the paper (allenai/c4, streamed from the Hugging Face hub), GPT-2
          tokens (vocab 50257). Needs the network. --text-files streams local text files
          (one document per line) through the same code path instead, and works offline.

The split is by document: a document goes to val when a stable hash of a key (the file's
relative path, or the line of text) falls in the first VAL_PERCENT of 100 buckets, so it does
not move between runs. C4 has its own validation split and uses that.

    python data/prepare.py stdlib [--out data/stdlib] [--max-bytes N]
    python data/prepare.py c4 [--out data/c4] [--train-tokens N] [--val-tokens N]
                              [--tokenizer gpt2|byte] [--text-files a.txt b.txt ...]
"""
import argparse
import json
import os
import socket
import sys
import sysconfig
import time
import zlib

import numpy as np
import tiktoken

EOT = "<|endoftext|>"
VAL_PERCENT = 2  # ~2% of documents go to val (40 files, ~0.55 MB of the 3.11 stdlib)
HUB_HOST = "huggingface.co"


class OfflineError(RuntimeError):
    """The chosen source needs the network and there is none."""


def get_encoding(name):
    """'byte': 256 single-byte tokens + EOT = 256 (offline). 'gpt2': GPT-2 BPE, EOT = 50256."""
    if name == "byte":
        # With only single-byte ranks there is nothing to merge, so every UTF-8 byte becomes its
        # own token. The pattern only cuts text into line-sized pieces before BPE runs.
        return tiktoken.Encoding("byte", pat_str=r"[^\n]*\n|[^\n]+",
                                 mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: 256})
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")  # downloads the ranks once, then caches them
        except Exception as e:
            raise OfflineError(
                f"tiktoken could not load the GPT-2 ranks ({type(e).__name__}); it downloads them "
                "on first use. Offline: set TIKTOKEN_CACHE_DIR to a folder where tiktoken cached "
                "them on a machine with network, or use --tokenizer byte.") from e
    raise ValueError(f"unknown tokenizer {name!r}: expected 'byte' or 'gpt2'")


def is_val(key):
    return zlib.crc32(key.encode("utf-8")) % 100 < VAL_PERCENT


# -----------------------------------------------------------------------------
# writing a file so that a crash leaves the old content or the new, never a mix (checkpoints too)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd), os.close(fd)


def atomic_write(path, write, tmp=None):
    """write(f) into tmp (a binary file; default path.tmp), then move it into place durably; returns what write
    returned. A write that raises leaves no tmp behind (a kill does: run/checkpoint.remove_stale clears it at the
    next start)."""
    tmp = tmp or path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush(), os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        os.path.exists(tmp) and os.remove(tmp)
    fsync_dir(os.path.dirname(path) or ".")
    return result



# -----------------------------------------------------------------------------
# the one writer every source goes through

def write_tokens(docs, enc, f, split, max_tokens=None):
    """Encode documents into the open binary file f, each followed by EOT. Stops after the
    document that reaches max_tokens, so documents stay whole. Returns (tokens, documents)."""
    n_tokens = n_docs = 0
    t0 = last = time.time()
    for text in docs:
        if not text:
            continue  # an empty document would add a lone EOT and teach nothing
        # encode_ordinary: a literal "<|endoftext|>" inside a document is text, not a separator
        ids = enc.encode_ordinary(text)
        ids.append(enc.eot_token)
        f.write(np.array(ids, dtype=np.uint16).tobytes())
        n_tokens += len(ids)
        n_docs += 1
        if time.time() - last > 5:
            last = time.time()
            print(f"  {split}: {n_docs:,} docs, {n_tokens / 1e6:.1f}M tokens, "
                  f"{n_tokens / (last - t0) / 1e6:.2f}M tok/s", flush=True)
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    print(f"  {split}: {n_docs:,} docs, {n_tokens:,} tokens in {time.time() - t0:.1f}s", flush=True)
    return n_tokens, n_docs


def write_dataset(out_dir, enc, train_docs, val_docs, meta, train_tokens=None, val_tokens=None):
    """Write train.bin, val.bin, then meta.json (source fields in `meta` plus counts) to
    out_dir. Every file is written to a temporary name and moved into place (atomic_write),
    so a crash never leaves a half-written file under a real name."""
    assert enc.n_vocab <= 2 ** 16, "token ids must fit in uint16"
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old bins are about to be replaced: no longer complete
    t0 = time.time()
    meta = dict(meta, tokenizer=enc.name, vocab_size=enc.n_vocab, eot_token=enc.eot_token,
                dtype="uint16", val_percent=VAL_PERCENT, train_tokens=0, val_tokens=0,
                n_documents={"train": 0, "val": 0})

    # val first: it is small, so a source that fails does so before the long train pass
    for split, docs, budget in (("val", val_docs, val_tokens), ("train", train_docs, train_tokens)):
        path = os.path.join(out_dir, f"{split}.bin")  # a temp name per process: two runs may prepare at once
        n_tok, n_doc = atomic_write(path, lambda f: write_tokens(docs, enc, f, split, budget),
                                    tmp=f"{path}.{os.getpid()}.tmp")
        meta[f"{split}_tokens"] = n_tok
        meta["n_documents"][split] = n_doc
    meta["seconds"] = round(time.time() - t0, 2)
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode() + b"\n"),
                 tmp=f"{meta_path}.{os.getpid()}.tmp")
    return meta


# -----------------------------------------------------------------------------
# source 1: the Python standard library (offline default)

def stdlib_files(root):
    """Relative paths (with '/') of the stdlib's .py files, sorted, without installed packages."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        rel = os.path.relpath(dirpath, root)
        paths += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/")
                  for f in filenames if f.endswith(".py")]
    return sorted(paths)


def stdlib_documents(root, split, max_bytes=None):
    """Yield the text of each file of `split`. With max_bytes, val reads about VAL_PERCENT% of
    it and train the rest; the file that crosses the budget is still read whole."""
    budget = None
    if max_bytes is not None:
        share = VAL_PERCENT / 100 if split == "val" else 1 - VAL_PERCENT / 100
        budget = max_bytes * share
    used = 0
    for rel in stdlib_files(root):
        if is_val(rel) != (split == "val"):
            continue
        if budget is not None and used >= budget:
            return
        with open(os.path.join(root, rel), "rb") as f:
            raw = f.read()
        used += len(raw)
        # a few test files are deliberately not UTF-8; their bad bytes become U+FFFD
        yield raw.decode("utf-8", errors="replace")


def prepare_stdlib(out_dir="data/stdlib", max_bytes=None):
    """Tokenize the Python stdlib bytewise into out_dir; return the meta dict."""
    root = sysconfig.get_paths()["stdlib"]
    print(f"stdlib: {root} (Python {sys.version.split()[0]}) -> {out_dir}", flush=True)
    meta = dict(source="stdlib", python_version=sys.version.split()[0], stdlib_path=root,
                n_files_found=len(stdlib_files(root)), max_bytes=max_bytes,
                encoding_errors="replace")
    return write_dataset(out_dir, get_encoding("byte"), stdlib_documents(root, "train", max_bytes),
                         stdlib_documents(root, "val", max_bytes), meta)


# -----------------------------------------------------------------------------
# source 2: C4 English from the hub, or local text files through the same path

def require_network(host=HUB_HOST, timeout=3.0):
    """Fail in seconds, not after a long hang inside datasets, when the hub is unreachable."""
    flags = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
             if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
    if flags:
        reason = f"{'/'.join(flags)} is set"
    elif os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return  # a direct connect says nothing when traffic goes through a proxy
    else:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return
        except OSError as e:
            reason = f"cannot reach {host}:443 ({e})"
    raise OfflineError(
        f"c4 streams allenai/c4 from the Hugging Face hub and needs the network: {reason}.\n"
        "Offline, use the stdlib data set (python data/prepare.py stdlib), or tokenize local "
        "files: python data/prepare.py c4 --text-files a.txt b.txt --tokenizer byte")


def c4_documents(split, text_files=None, seed=42, buffer_size=10_000):
    """Yield document texts. Hub: train is buffer-shuffled with `seed`, val is C4's validation
    split in order. Local files: each line is a document, in file order, split by is_val."""
    from datasets import load_dataset  # imported here: the stdlib path should not pay for it
    if text_files:
        ds = load_dataset("text", data_files=list(text_files), split="train", streaming=True)
        return (ex["text"] for ex in ds if is_val(ex["text"]) == (split == "val"))
    ds = load_dataset("allenai/c4", "en", split="train" if split == "train" else "validation",
                      streaming=True)
    if split == "train":
        ds = ds.shuffle(seed=seed, buffer_size=buffer_size)
    return (ex["text"] for ex in ds)


def prepare_c4(out_dir="data/c4", train_tokens=100_000_000, val_tokens=10_000_000,
               tokenizer="gpt2", text_files=None, seed=42):
    """Tokenize C4 (or local text files) into out_dir up to the token budgets; return meta."""
    if not text_files:
        require_network()
    enc = get_encoding(tokenizer)
    source = "text_files" if text_files else "c4"
    print(f"{source} -> {out_dir}: {train_tokens:,} train / {val_tokens:,} val tokens", flush=True)
    meta = dict(source=source, train_token_budget=train_tokens, val_token_budget=val_tokens)
    if text_files:
        meta["text_files"] = [os.path.abspath(p) for p in text_files]
    else:
        meta.update(dataset="allenai/c4", config="en", val_split="validation", shuffle_seed=seed)
    return write_dataset(out_dir, enc, c4_documents("train", text_files, seed),
                         c4_documents("val", text_files, seed), meta, train_tokens, val_tokens)


# -----------------------------------------------------------------------------

def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="source", required=True)
    s = sub.add_parser("stdlib", help="the Python standard library, byte tokens (offline)")
    s.add_argument("--out", default=os.path.join(here, "stdlib"), help="output folder")
    s.add_argument("--max-bytes", type=int, default=None,
                   help="read about this many bytes of source in all (for quick tests)")
    c = sub.add_parser("c4", help="C4 English from the hub (network), or local --text-files")
    c.add_argument("--out", default=os.path.join(here, "c4"), help="output folder")
    c.add_argument("--train-tokens", type=int, default=100_000_000, help="train token budget")
    c.add_argument("--val-tokens", type=int, default=10_000_000, help="val token budget")
    c.add_argument("--tokenizer", choices=("gpt2", "byte"), default="gpt2")
    c.add_argument("--text-files", nargs="+", default=None, metavar="FILE",
                   help="local text files, one document per line, instead of the hub (offline)")
    c.add_argument("--seed", type=int, default=42, help="shuffle seed for C4 train")
    args = p.parse_args()
    t0 = time.time()
    try:
        if args.source == "stdlib":
            meta = prepare_stdlib(args.out, args.max_bytes)
        else:
            meta = prepare_c4(args.out, args.train_tokens, args.val_tokens, args.tokenizer,
                              args.text_files, args.seed)
    except OfflineError as e:
        sys.exit(f"error: {e}")
    print(f"done in {time.time() - t0:.1f}s: {meta['train_tokens']:,} train tokens, "
          f"{meta['val_tokens']:,} val tokens, {meta['n_documents']} documents -> {args.out}")


if __name__ == "__main__":
    main()
