"""hf_tokenizer.py against tiktoken: the tokenizer.json it writes, loaded by the `tokenizers` library
(a test dependency through transformers), must give tiktoken's ids. Two encodings: the project's
byte-level one, and a small GPT-2-style BPE learned here from stdlib text (permuted byte ranks, a few
dozen merges, GPT-2's regex), so the merge reconstruction is checked without the network."""
import collections
import inspect
import json
import random
import re
import textwrap

import pytest
import tiktoken
from tokenizers import Tokenizer

from run import hf_tokenizer
from data.prepare import get_encoding

GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # tiktoken's gpt2 pat_str
EDGE_CASES = [
    "", " ", "\n", "  \n\n\t \r\n   x  ", "\t\t\tdef f():\n\t\treturn 1\n", "a" * 300, " " * 50 + "b", "\n" * 9,
    "".join(map(chr, range(0x40))),  # every control character, then punctuation and digits
    "a\x1cb\x1dc\x1e d\x1f e\x85f\u2028g\u2029h\u3000i\u00a0j\u200bk\ufeffl",  # whitespace by some definitions only
    "naïve café déjà vu — ñandú über straße", "日本語のテキスト、中文。", "🎉🎉 emoji 👩‍👩‍👧 e\u0301 Å",
    "it's we're I'll they've she'd IT'S don't", "1234567 3.14 x2 ٣٤٥ ½", "<|endoftext|>", "a<|endoftext|>b<|endo",
    "\x00\x7f\u0080\u00ff\u0100\uffff\U0010ffff", "\ud7ff\ue000", "   \t  \n  \r  \x0b\x0c",
]


def learn_bpe(text, n_merges, seed=0):
    """A tiktoken Encoding of GPT-2's kind: 256 byte tokens in a shuffled rank order (GPT-2's are not
    in byte order either), then merges learned greedily: the most frequent adjacent pair becomes the
    next rank. Words come from a coarse stand-in for GPT-2's regex (python's re has no \\p{L}).
    -> (encoding, the merged pairs in the order learned)."""
    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks, pairs_learned = {bytes([b]): r for r, b in enumerate(order)}, []
    words = collections.Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(r" ?\w+| ?[^\w\s]+|\s+", text))
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        pairs_learned.append((a, b))
        merged = collections.Counter()
        for w, n in words.items():
            out = []
            for part in w:
                if out and out[-1] == a and part == b:
                    out[-1] = a + b
                else:
                    out.append(part)
            merged[tuple(out)] += n
        words = merged
    enc = tiktoken.Encoding("small-gpt2-style", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": len(ranks)})
    return enc, pairs_learned


def stdlib_lines(n):
    """n varied lines of real text: the source of json.decoder and email.utils, comments and all."""
    import email.utils
    import json.decoder
    lines = inspect.getsource(json.decoder).splitlines(keepends=True) + \
        inspect.getsource(email.utils).splitlines(keepends=True)
    return lines[:n]


def load(tmp_path, enc, eot):
    hf_tokenizer.write_tokenizer(str(tmp_path), enc, eot, 1024)
    return Tokenizer.from_file(str(tmp_path / "tokenizer.json"))


@pytest.fixture(scope="module")
def small_bpe():
    # text with multi-byte letters weighted in, so some merges join UTF-8 continuation bytes
    return learn_bpe(inspect.getsource(textwrap) + " naïve café déjà vu ñandú über straße" * 60, n_merges=60)[0]


def test_learned_bpe_exercises_the_conversion(small_bpe):
    """The test encoding must hold what the conversion has to get right: merges of merges (tokens of
    3+ bytes), merges inside multi-byte UTF-8 characters, whitespace runs."""
    tokens = [b for b in small_bpe.token_byte_values() if len(b) > 1]
    assert len(tokens) == 60
    assert any(len(b) >= 4 for b in tokens) and any(b.isspace() and len(b) > 1 for b in tokens)
    assert any(any(x >= 0x80 for x in b) for b in tokens)


def test_gpt2_style_bpe_gives_tiktokens_ids(small_bpe, tmp_path):
    tok = load(tmp_path, small_bpe, small_bpe.eot_token)
    texts = stdlib_lines(400) + EDGE_CASES
    merged = 0
    for text in texts:
        ids = small_bpe.encode(text, allowed_special="all")
        assert tok.encode(text).ids == ids, repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == small_bpe.decode(ids), repr(text)
        merged += sum(i >= 256 for i in ids)
    assert merged > 1000  # the merges fire: the ids are not bytes in disguise
    # one document, many pieces: long inputs cut the same way
    whole = "".join(texts)
    assert tok.encode(whole).ids == small_bpe.encode(whole, allowed_special="all")


def test_merges_are_the_learned_pairs(tmp_path):
    """The merge list equals the pairs learn_bpe joined, in its order: the training record itself is
    the oracle here, where the test above checks the ids."""
    enc, learned = learn_bpe(inspect.getsource(textwrap) + " naïve café déjà vu ñandú über straße" * 60, 60)
    load(tmp_path, enc, enc.eot_token)
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    back = {c: b for b, c in hf_tokenizer.bytes_to_unicode().items()}
    assert [tuple(bytes(back[c] for c in part) for part in merge.split(" ")) for merge in merges] == learned


def test_byte_to_unicode_table_is_gpt2s():
    """Checked against its definition: printable Latin-1 maps to itself, the rest to U+0100 on."""
    table = hf_tokenizer.bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_byte_level_tokenizer_equals_the_projects(tmp_path):
    """data/prepare.py's "byte" encoding: every byte its own id, <|endoftext|> = 256, any text."""
    enc = get_encoding("byte")
    tok = load(tmp_path, enc, enc.eot_token)
    rng = random.Random(0)
    randoms = ["".join(chr(rng.choice([rng.randrange(0x20), rng.randrange(0x80), rng.randrange(0x800),
                                       rng.randrange(0xd800), rng.randrange(0x10000, 0x110000)]))
                       for _ in range(rng.randrange(1, 60))) for _ in range(200)]
    for text in stdlib_lines(200) + EDGE_CASES + randoms:
        ids = enc.encode(text, allowed_special="all")
        assert tok.encode(text).ids == ids, repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)
    assert tok.token_to_id("<|endoftext|>") == 256 and tok.get_vocab_size() == 257
    # token i is byte i: a stream that is not valid UTF-8 decodes as tiktoken decodes it
    stream = list(range(256)) + [0xe6, 0x97, 0xa5, 0xe6, 0x97, 0xc3]
    assert tok.decode(stream) == enc.decode(stream) == bytes(stream).decode("utf-8", errors="replace")
