"""export.py against an independent reference: transformers' LlamaForCausalLM loads the exported
folder and must give load_model's logits (fp32, max abs difference <= 1e-4) for every method.
transformers is a test requirement only (requirements-dev.txt)."""
import json
import math
import os
import shlex
import shutil
import signal
import struct
import subprocess
import sys

import pytest
import torch
import transformers

from run import checkpoint
import export
import sample
from run_script import ROOT, run_cases
from sltrain import METHODS


pytestmark = pytest.mark.slow  # end-to-end: a run exported, loaded by transformers: not in the one-minute check

@pytest.mark.parametrize("method", METHODS)
def test_transformers_gives_our_logits(tiny_run, tmp_path, method):
    run = tiny_run(method)
    export.main(["--out-dir", run, "--hf-dir", str(tmp_path)])
    ours = checkpoint.load_model(run)
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
    assert torch.equal(raw, checkpoint.load_model(tiny_run("sltrain")).tok_emb.weight.detach().bfloat16())
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


# -----------------------------------------------------------------------------
# the folder works alone: tokenizer, generation config and model card (transformers without the project)

HF_ONLY = r"""
import json, sys, contextlib, io
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, texts, prompt, n, snippet = json.loads(sys.argv[1])
tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
ids = [tok(t)["input_ids"] for t in texts]
out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=n, do_sample=False)[0].tolist()
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    exec(snippet)  # the model card's three lines, as a reader would paste them
print(json.dumps(dict(ids=ids, back=[tok.decode(i) for i in ids], eot=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos=model.generation_config.eos_token_id, generated=out, text=tok.decode(out),
                      modules=sorted(m for m in ("sample", "export", "model", "train", "sltrain") if m in sys.modules),
                      snippet=printed.getvalue())))
"""
ROUND_TRIP = ["def f(x):\n    return x + 1\n", "naïve café, 日本語, emoji 🎉 and e\u0301", "\t\t  \n\n   \r\n \x0b\x0c x  ",
              "ctrl \x00\x01\x1b[0m\x7f", "a<|endoftext|>b", "f(a , b) . it 's ; do n't !"]  # the last: what
# transformers' clean_up_tokenization_spaces would rewrite


def card_snippet(folder):
    card = (folder / "README.md").read_text()
    return card.split("```python\n")[1].split("```")[0]


def test_the_folder_works_with_transformers_alone(tiny_run, tmp_path):
    """Acceptance (issue 23): AutoTokenizer gives the project's ids; <|endoftext|> is 256 and ends
    generation; greedy generate gives sample.py --temperature 0's text; the card's snippet runs."""
    run, hf = tiny_run("sltrain"), tmp_path / "hf"
    export.main(["--out-dir", run, "--hf-dir", str(hf)])
    enc = checkpoint.load_tokenizer(run, checkpoint.load_model(run).train_config)  # the project's tokenizer
    prompt, n = "def ", 32  # n: the card's max_new_tokens at context 64
    r = subprocess.run([sys.executable, "-c", HF_ONLY, json.dumps([str(hf), ROUND_TRIP, prompt, n, card_snippet(hf)])],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)  # cwd: no project file importable
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.splitlines()[-1])
    assert theirs["modules"] == []
    assert theirs["ids"] == [enc.encode(t, allowed_special="all") for t in ROUND_TRIP]
    assert theirs["back"] == ROUND_TRIP
    assert theirs["eot"] == theirs["eos"] == 256
    text = sample.main(["--out-dir", run, "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0",
                        "--device", "cpu"])  # the text `python sample.py ...` prints
    if theirs["generated"][-1] == 256:  # generate stops at the end of a document, sample.py goes on
        assert text.startswith(theirs["text"])
    else:
        assert text == theirs["text"] and len(theirs["generated"]) == len(enc.encode(prompt)) + n
    assert theirs["snippet"].startswith("def ") and len(theirs["snippet"]) > len("def \n")  # it samples: a text, run
    print(f"greedy text: {text!r}")


def test_model_card(tiny_run, tmp_path):
    """Each fact of the card against its source: the run's log, python's math, transformers' own
    parameter count, and the shell's own parsing (shlex) of the command line."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run("lowrank"), run)
    records = [json.loads(line) for line in open(run / "log.jsonl")]
    argv = ["/somewhere/train.py", "--model", "tiny", "--method", "lowrank", "--out-dir", "a folder/with 'quotes'"]
    records[0]["argv"] = argv  # as a shell run records it (this fixture ran train.main in-process)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    export.main(["--out-dir", str(run), "--hf-dir", str(tmp_path / "hf")])
    card = (tmp_path / "hf" / "README.md").read_text()
    last = [r for r in records if r["type"] == "eval"][-1]
    steps, cfg = last["step"], records[0]
    assert f"{steps:,} of {cfg['max_steps']:,}" in card
    assert f"{steps * cfg['batch_size'] * cfg['grad_accum'] * cfg['seq_len']:,} tokens" in card
    assert f"loss {last['val_loss']:.4f} (perplexity {math.exp(last['val_loss']):.2f})" in card
    assert "`tiny` size" in card and "low-rank" in card and "W = scale * B A" in card and "byte-level" in card
    command = next(line for line in card.splitlines() if line.startswith("python train.py"))
    assert shlex.split(command) == ["python", "train.py"] + argv[1:]
    n = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).num_parameters()
    assert f"{n:,} parameters on disk" in card
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 256


# -----------------------------------------------------------------------------
# exports never overwrite by surprise (issue 21, item 3): the real script, in child processes


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_export_is_replaced_only_with_force(tiny_run, tmp_path):
    run, hf = tiny_run("sltrain"), tmp_path / "hf"
    export.main(["--out-dir", run, "--hf-dir", str(hf)])
    before = snapshot(hf)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (refused, err, _), (unrelated, err2, _), (replaced, _, out) = run_cases("export.py", [
        ["--out-dir", run, "--hf-dir", str(hf), "--dtype", "bfloat16"],
        ["--out-dir", run, "--hf-dir", str(tmp_path / "notes"), "--force"],
        ["--out-dir", run, "--hf-dir", str(hf), "--dtype", "bfloat16", "--force"]])
    assert refused == 2 and err == f"error: --hf-dir {hf}: already holds 7 file(s) (README.md, config.json, " \
        "generation_config.json, model.safetensors, ...): pass --force to replace them with this export, or choose " \
        "another folder\n"
    assert unrelated == 2 and err2.startswith(f"error: --hf-dir {tmp_path / 'notes'}: holds files that are not an "
                                              "export") and err2.count("\n") == 1
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    assert replaced == 0 and out.startswith(f"wrote {hf}")
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert set(snapshot(hf)) == set(before) and snapshot(hf)["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "notes"]  # no temporary folder left beside it


def test_unwritable_targets_get_one_error_line(tiny_run, tmp_path):
    run = tiny_run("sltrain")
    (tmp_path / "a-file").write_text("x")
    targets = {str(tmp_path / "a-file"): "is a file, not a folder",
               str(tmp_path / "a-file" / "sub" / "hf"): f"is under {tmp_path / 'a-file'}, a file, not a folder",
               "/proc/nano-sltrain-export": "cannot write there (No such file or directory)",
               run: "must not be the run's folder or hold it",
               os.path.dirname(run): "must not be the run's folder or hold it"}
    if os.path.isdir("/sys/kernel"):  # sysfs: no new folders, not even for root
        targets["/sys/kernel/nano-sltrain-export"] = "cannot write there"
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "read-only").mkdir(mode=0o500)
        targets[str(tmp_path / "read-only" / "hf")] = "cannot write there (Permission denied)"
    results = run_cases("export.py", [["--out-dir", run, "--hf-dir", t, "--force"] for t in targets])
    for (target, rule), (code, err, out) in zip(targets.items(), results):
        print(err, end="")
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (target, err)
        assert err.startswith(f"error: --hf-dir {target}: ") and rule in err, (target, err)
    assert not os.path.exists("/proc/nano-sltrain-export") and sorted(os.listdir(tmp_path)) == ["a-file"]


KILL = r"""
import os, runpy, signal, sys
from run import hf_tokenizer
points, flags = sys.argv[1].split(","), sys.argv[2:]
real_write, real_rename, renames = hf_tokenizer.write_tokenizer, os.rename, []
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)  # as a power cut: no cleanup
def disk_full(*a, **k):
    raise OSError(28, "No space left on device")
def rename(*a):
    renames.append(a)
    if len(renames) == 2:  # the old export is aside, the new one not yet in place
        die()
    return real_rename(*a)
for point in points:  # in turn, in this process: each export as `python export.py flags` runs it
    hf_tokenizer.write_tokenizer = dict(tokenizer=die, disk_full=disk_full).get(point, real_write)
    os.rename = rename if point == "rename" else real_rename  # (model.safetensors and config.json come first)
    sys.argv = ["export.py"] + flags
    try:
        runpy.run_path("export.py", run_name="__main__")
    except SystemExit as e:
        print(f"exit {e.code}", file=sys.stderr)
"""


def test_a_crash_mid_export_leaves_the_old_export_or_none(tiny_run, tmp_path):
    run, hf = tiny_run("sltrain"), tmp_path / "hf"
    export.main(["--out-dir", run, "--hf-dir", str(hf)])
    old = snapshot(hf)

    def export_dying_at(points):
        return subprocess.run([sys.executable, "-c", KILL, points, "--out-dir", run, "--hf-dir", str(hf), "--force"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    r = export_dying_at("tokenizer")
    assert r.returncode == -signal.SIGKILL and snapshot(hf) == old
    assert len(list(tmp_path.glob(".hf.export-*.tmp"))) == 1  # the dead export's half folder, beside the target
    r = export_dying_at("rename")
    assert r.returncode == -signal.SIGKILL and not hf.exists()  # none; the old one is still whole, aside
    aside = list(tmp_path.glob(".hf.export-*.old.tmp"))
    assert len(aside) == 1 and snapshot(aside[0]) == old
    # disk full: one line, nothing touched; then an export that succeeds clears what the killed ones left
    r = export_dying_at("disk_full,none")
    assert r.returncode == 0 and r.stderr == f"error: --hf-dir {hf}: writing the export failed (No space left on " \
        "device): nothing was replaced\nexit 2\n", r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"] and snapshot(hf) == old
