import json
import os
import subprocess
import sys
import sysconfig
import time
import zlib

import numpy as np
import pytest

from data import prepare
from data.prepare import OfflineError, get_encoding, prepare_c4, prepare_stdlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_BYTES = 300_000


def read_bin(path):
    return np.memmap(path, dtype=np.uint16, mode="r")


def split_docs(tokens, eot):
    """Token stream -> list of documents (arrays without their EOT); the stream must end in EOT."""
    assert len(tokens) > 0 and tokens[-1] == eot
    ends = np.flatnonzero(tokens == eot)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[s:e] for s, e in zip(starts, ends)]


def check_meta_matches_bins(out, meta):
    assert json.load(open(out / "meta.json")) == meta
    assert meta["dtype"] == "uint16"
    for split in ("train", "val"):
        tokens = read_bin(out / f"{split}.bin")
        assert os.path.getsize(out / f"{split}.bin") == 2 * meta[f"{split}_tokens"]
        assert len(tokens) == meta[f"{split}_tokens"] > 0
        assert len(split_docs(tokens, meta["eot_token"])) == meta["n_documents"][split]
        assert tokens.max() < meta["vocab_size"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.fixture(scope="module")
def stdlib_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("stdlib")
    return out, prepare_stdlib(str(out), max_bytes=MAX_BYTES)


def test_stdlib_meta_and_counts(stdlib_out):
    out, meta = stdlib_out
    assert meta["source"] == "stdlib" and meta["tokenizer"] == "byte"
    assert meta["vocab_size"] == 257 and meta["eot_token"] == 256
    assert meta["python_version"] == sys.version.split()[0]
    assert meta["stdlib_path"] == sysconfig.get_paths()["stdlib"]
    check_meta_matches_bins(out, meta)
    # each split reads until its share of max_bytes is reached (and never shrinks bytes)
    assert meta["train_tokens"] - meta["n_documents"]["train"] >= 0.98 * MAX_BYTES


def test_stdlib_first_document_is_first_train_file(stdlib_out):
    # Reference: the file on disk. The first train file is, per the documented rule, the
    # first non-empty .py file in sorted relative-path order whose crc32 is not in val.
    out, meta = stdlib_out
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in ("site-packages", "dist-packages")]
        rels += [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                 for f in files if f.endswith(".py")]
    train = [r for r in sorted(rels) if zlib.crc32(r.encode()) % 100 >= prepare.VAL_PERCENT]
    first = next(open(os.path.join(root, r), "rb").read() for r in train
                 if os.path.getsize(os.path.join(root, r)) > 0)
    doc = split_docs(read_bin(out / "train.bin"), 256)[0]
    assert bytes(doc.astype(np.uint8)) == first
    assert get_encoding("byte").decode(doc.tolist()) == first.decode("utf-8")


def test_stdlib_deterministic(stdlib_out, tmp_path):
    out, _ = stdlib_out
    prepare_stdlib(str(tmp_path), max_bytes=MAX_BYTES)
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_byte_encoding_is_utf8_bytes():
    # The byte tokenizer must be exactly the UTF-8 bytes, for any text (reference: str.encode).
    enc = get_encoding("byte")
    text = "def f(x):\r\n    return 'héllo 中文 🙂' \t\n\n<|endoftext|> \x00\ufffd"
    assert enc.encode_ordinary(text) == list(text.encode("utf-8"))
    assert enc.n_vocab == 257 and enc.eot_token == 256


def text_lines():
    return [f"line {i}: {'héllo wörld 中文 🙂' * (i % 3)} {i * i}" for i in range(400)]


def test_text_files_byte_tokenizer(tmp_path):
    lines = text_lines()
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines[:200]) + "\n\n" + "\n".join(lines[200:]) + "\n",
                    encoding="utf-8")
    out = tmp_path / "out"
    meta = prepare_c4(str(out), tokenizer="byte", text_files=[str(path)])
    assert meta["source"] == "text_files" and meta["vocab_size"] == 257
    check_meta_matches_bins(out, meta)
    # Reference: each non-empty line's UTF-8 bytes, in file order; each split is a subsequence.
    ref = [l.encode("utf-8") for l in lines]
    docs = {s: [bytes(d.astype(np.uint8)) for d in split_docs(read_bin(out / f"{s}.bin"), 256)]
            for s in ("train", "val")}
    assert docs["val"] and docs["train"]
    assert docs["val"] == [r for r in ref if r in set(docs["val"])]
    assert docs["train"] == [r for r in ref if r not in set(docs["val"])]

    # A token budget keeps whole documents: stop after the one that reaches it.
    meta = prepare_c4(str(tmp_path / "small"), train_tokens=1000, val_tokens=1,
                      tokenizer="byte", text_files=[str(path)])
    lens = np.cumsum([len(d) + 1 for d in docs["train"]])
    assert meta["train_tokens"] == lens[np.searchsorted(lens, 1000)]
    assert meta["n_documents"]["val"] == 1


def test_c4_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(OfflineError, match="(?s)needs the network.*HF_DATASETS_OFFLINE.*stdlib"):
        prepare_c4(str(tmp_path / "c4"))
    assert time.time() - t0 < 10
    assert not (tmp_path / "c4").exists()


def test_c4_unreachable_hub_fails_fast(monkeypatch, tmp_path):
    # Simulate no route to the hub, so the test never downloads C4 on a machine with network.
    def refuse(*args, **kwargs):
        raise OSError("simulated: no network")
    for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(prepare.socket, "create_connection", refuse)
    with pytest.raises(OfflineError, match="(?s)cannot reach huggingface.co.*prepare.py stdlib"):
        prepare_c4(str(tmp_path / "c4"))


def test_gpt2_ranks_missing_fails_clearly(monkeypatch):
    def no_download(name):
        raise ConnectionError("simulated: no network")
    monkeypatch.setattr(prepare.tiktoken, "get_encoding", no_download)
    with pytest.raises(OfflineError, match="TIKTOKEN_CACHE_DIR"):
        get_encoding("gpt2")


def test_c4_cli_offline_message(tmp_path):
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(REPO, "data", "prepare.py"), "c4",
                        "--out", str(tmp_path / "c4")], env=env, capture_output=True, text=True)
    assert time.time() - t0 < 10
    assert r.returncode != 0
    assert "needs the network" in r.stderr and "prepare.py stdlib" in r.stderr
    assert "Traceback" not in r.stderr
