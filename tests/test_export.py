"""export.py against an independent reference: transformers' LlamaForCausalLM loads the exported
folder and must give load_model's logits (fp32, max abs difference <= 1e-4) for every method.
transformers is a test requirement only (requirements-dev.txt)."""
import json
import struct

import pytest
import torch
import transformers

import export
import sample
from sltrain import METHODS


@pytest.mark.parametrize("method", METHODS)
def test_transformers_gives_our_logits(tiny_run, tmp_path, method):
    run = tiny_run(method)
    export.main(["--out-dir", run, "--hf-dir", str(tmp_path)])
    ours = sample.load_model(run)
    theirs = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert theirs.config.vocab_size == 257 and not theirs.config.tie_word_embeddings
    ids = torch.randint(0, 257, (2, 64))
    with torch.no_grad():
        diff = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    print(f"{method}: max abs logit difference {diff:.2e}")
    assert diff <= 1e-4


def test_safetensors_layout(tiny_run, tmp_path):
    """The file as the format defines it: header length, JSON header, bytes back to back."""
    export.main(["--out-dir", tiny_run("sltrain"), "--hf-dir", str(tmp_path), "--dtype", "bfloat16"])
    data = (tmp_path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    assert n % 8 == 0 and header.pop("__metadata__") == {"format": "pt"}
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == len(data) - 8 - n
    emb = header["model.embed_tokens.weight"]
    assert emb["dtype"] == "BF16" and emb["shape"] == [257, 128]
    start, end = emb["data_offsets"]
    raw = torch.frombuffer(bytearray(data[8 + n + start:8 + n + end]), dtype=torch.bfloat16).view(257, 128)
    assert torch.equal(raw, sample.load_model(tiny_run("sltrain")).tok_emb.weight.detach().bfloat16())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
