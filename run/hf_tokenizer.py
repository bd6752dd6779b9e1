"""
The run's tiktoken encoding as Hugging Face tokenizer files: tokenizer.json (the `tokenizers`
serialization), tokenizer_config.json and special_tokens_map.json. export.py writes them beside
the weights so that AutoTokenizer.from_pretrained(folder) gives the ids the run trained on.

Both encodings the project uses are byte-level BPE, the kind GPT-2 introduced:
  - the text is cut into pieces by a regex (tiktoken's pat_str);
  - each piece is UTF-8 bytes, and BPE merges adjacent byte strings by rank, lowest first.
`tokenizers` runs the same algorithm with different bookkeeping, which is all this file converts:
  - its vocab maps strings to ids, so each byte is spelled as one printable character (GPT-2's
    byte-to-unicode table below) and a token is the string of its bytes' characters;
  - its merges list pairs (left, right) in priority order, where tiktoken keeps only the merged
    token's rank. The pair is recovered from the ranks: BPE over the token's own bytes, allowed
    only ranks below the token's, stops one merge short of the token, at exactly two parts.
    That is the merge tiktoken performs last when it builds the token, and merges listed in the
    order of their tokens' ranks fire in tiktoken's order.
The byte-level encoding (data/prepare.py's "byte": token i is byte i, <|endoftext|> is 256) is the
case with no merges at all. Written as plain JSON: exporting needs no `tokenizers` install.
"""
import json
import os


def bytes_to_unicode():
    """GPT-2's table byte -> character. Printable Latin-1 bytes stand for themselves; the other 68
    (control characters, space, 0x7f-0xa0, 0xad) take the characters from U+0100 upward, in byte
    order, so no token string holds whitespace or a control character (and a space in a merge
    line can separate its two parts)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def split_in_two(token, ranks):
    """The two tokens BPE joins last to make `token` (bytes of length >= 2): merge its bytes by
    rank, lowest first, using only ranks below the token's own."""
    parts, limit = [token[i:i + 1] for i in range(len(token))], ranks[token]
    while True:
        best = None  # (rank, position) of the lowest-ranked adjacent pair under the limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) is not one merge of two lower-ranked tokens")
    return parts


def tokenizer_json(enc):
    """The `tokenizers` serialization (a dict) of tiktoken Encoding `enc`."""
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}  # bytes -> id
    specials = {s: enc.encode_single_token(s) for s in sorted(enc.special_tokens_set)}
    char = bytes_to_unicode()

    def spell(b):
        return "".join(char[x] for x in b)

    vocab = {spell(b): i for b, i in ranks.items()} | specials
    merges = [" ".join(spell(p) for p in split_in_two(b, ranks))
              for b, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(b) > 1]
    added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for s, i in specials.items()]
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        # pieces exactly as tiktoken cuts them (its own regex), then each piece's bytes as characters
        "pre_tokenizer": dict(type="Sequence", pretokenizers=[
            dict(type="Split", pattern=dict(Regex=enc._pat_str), behavior="Isolated", invert=False), byte_level]),
        "post_processor": None,  # no BOS: the project's sequences start with the text itself
        "decoder": byte_level,
        # ignore_merges: a piece that is a whole token maps to it directly, as tiktoken looks it up first
        "model": dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                      end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, ignore_merges=True,
                      vocab=vocab, merges=merges),
    }


def write_tokenizer(folder, enc, eot, max_length):
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of `enc` into `folder`.
    <|endoftext|> (id `eot`) is bos, eos, unk and pad, as for GPT-2."""
    eot_text = enc.decode([eot])
    special = dict(bos_token=eot_text, eos_token=eot_text, unk_token=eot_text, pad_token=eot_text)
    config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length, add_bos_token=False,
                  add_eos_token=False, clean_up_tokenization_spaces=False, **special)  # decode gives the bytes' text
    for name, content in (("tokenizer.json", tokenizer_json(enc)), ("tokenizer_config.json", config),
                          ("special_tokens_map.json", special)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
