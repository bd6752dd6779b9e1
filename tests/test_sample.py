"""sample.py, eval.py and the KV cache against references: the cache against a full recompute of
the sequence, greedy decoding against an argmax loop without a cache, both decode modes against
the training forward, seeded sampling against itself (the same seed) and another seed, a sharded
FSDP2 checkpoint against the single-process run of the same global batch, eval.py against the
eval record train.py logged."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from functools import partial

import pytest
import torch

from run import checkpoint
import eval as eval_script
import sample
from conftest import TINY_RUN
from run_script import run_cases
from model import CONFIGS, LLaMA
from sltrain import SLLinear, csr_forward, swap_linears

# the decoding units (KV cache, decode modes, greedy, seeded sampling) are in the one-minute check; the tests
# of the scripts on a trained run (subprocesses, torchrun) are `slow`

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_model(method="sltrain", max_seq_len=32, seed=0):
    """A tiny model with every weight random, B included (its init is 0), so every term counts."""
    cfg = replace(CONFIGS["tiny"], vocab_size=257, max_seq_len=max_seq_len, n_layers=2)
    torch.manual_seed(seed)
    model = swap_linears(LLaMA(cfg), method, cfg.rank, cfg.delta, cfg.alpha, seed=seed).init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.05)
    return model.eval()


@torch.no_grad()
def test_kv_cache_logits_equal_full_recompute():
    model = random_model()
    ids = torch.randint(0, 257, (2, 20))
    full = model(ids)[0]  # (2, 20, V), no cache: the training forward
    model.setup_cache()
    # a prompt of 7, a chunk of 5 at position 7 (the mask must be offset), then one token at a time
    pieces = [model(ids[:, :7], start_pos=0)[0], model(ids[:, 7:12], start_pos=7)[0]]
    pieces += [model(ids[:, t:t + 1], start_pos=t)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", sample.DECODE_MODES)
def test_decode_modes_give_the_training_logits(mode, dtype):
    model = random_model()
    for p in model.parameters():  # as train.py's --param-dtype: parameters only, RoPE tables stay fp32
        p.data = p.data.to(dtype)
    ids = torch.randint(0, 257, (2, 20))
    ref = model(ids)[0].float()  # SLLinear's dense route
    atol = 1e-5 if dtype == torch.float32 else 2e-2 * ref.abs().max().item()  # bf16 keeps 8 significant bits
    torch.testing.assert_close(sample.prepare_decode(model, mode)(ids)[0].float(), ref, rtol=0, atol=atol)


def greedy_without_cache(model, ids, n):
    """The reference for generate(temperature=0): recompute the whole context for every token. The
    context is what generate's cache holds: up to max_seq_len tokens, then the newest half of them."""
    window, start = model.cfg.max_seq_len, max(0, ids.shape[1] - model.cfg.max_seq_len)
    for _ in range(n):
        ids = torch.cat([ids, model(ids[:, start:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
        if ids.shape[1] - start > window:
            start = ids.shape[1] - window // 2
    return ids


@torch.no_grad()
def test_greedy_generate_equals_recompute_past_the_window():
    model = random_model(max_seq_len=16)
    prompt = torch.randint(0, 257, (2, 5))
    out = sample.generate(model, prompt, 40, temperature=0)  # 45 tokens: the window of 16 refills 3 times
    assert out.shape == (2, 45) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, greedy_without_cache(model, prompt, 40))


@torch.no_grad()
def test_seeded_sampling_is_deterministic():
    model = random_model()
    prompt = torch.randint(0, 257, (1, 4))

    calls = []

    def draw(seed):
        calls.append(seed)
        torch.manual_seed(len(calls))  # the global RNG differs at every call: only the generator may matter
        return sample.generate(model, prompt, 30, 1.0, 50, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.slow
def test_sample_script_on_a_run(tiny_run, capsys):
    run = tiny_run("sltrain")
    flags = ["--out-dir", run, "--prompt", "def ", "--max-new-tokens", "30", "--temperature", "1.0",
             "--device", "cpu"]  # reruns compared bit for bit: the CPU's sampling stream on any machine
    text = sample.main(flags + ["--seed", "0"])
    assert text.startswith("def ") and len(text.encode()) >= 4 + 30 - 3  # byte tokens (a few may be replaced)
    assert sample.main(flags + ["--seed", "0"]) == text
    assert sample.main(flags + ["--seed", "1", "--decode", "merged"]) != text
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.slow
def test_an_unreadable_checkpoint_stops_with_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="^error: .*unreadable"):
        checkpoint.load_model(str(tmp_path))


# each case: (argv, exit status, the exact line on stderr). {run}: a tiny run; {tmp}: an empty folder. Status 2 is
# a flag's rule (argparse's and train.py's), 1 a run that cannot be read.
RUN = ["--out-dir", "{run}"]
FLAG_CASES = {
    "sample.py": [
        ([], 2, "--out-dir is required: the folder of a run train.py wrote"),
        (["--out-dir", "{tmp}/nope"], 1, "no run at {tmp}/nope: --out-dir must be a folder train.py wrote"),
        (["--out-dir", "{tmp}"], 1, "no checkpoint in {tmp} (no ckpt.pt, latest-sharded or model.pt): a run writes "
                                    "one at every eval, so train at least --eval-every steps"),
        (RUN + ["--temperature", "nan"], 2, "--temperature nan: must be a finite number >= 0 (0 = greedy)"),
        (RUN + ["--temperature", "-0.5"], 2, "--temperature -0.5: must be a finite number >= 0 (0 = greedy)"),
        (RUN + ["--temperature", "inf"], 2, "--temperature inf: must be a finite number >= 0 (0 = greedy)"),
        (RUN + ["--top-k", "-1"], 2, "--top-k -1: must be >= 0 (0 = all tokens)"),
        (RUN + ["--top-k", "258"], 2, "--top-k 258: must be in [0, 257], the model's vocabulary (0 = all)"),
        (RUN + ["--top-k", "nan"], 2, "argument --top-k: invalid int value: 'nan'"),
        (RUN + ["--max-new-tokens", "-1"], 2, "--max-new-tokens -1: must be >= 0"),
        (RUN + ["--seed", "-1"], 2, "--seed -1: must be in [0, 2**32)"),
        (RUN + ["--seed", str(2**32)], 2, "--seed 4294967296: must be in [0, 2**32)"),
        (RUN + ["--device", "tpu"], 2, "--device tpu: must be one of: cpu"),
        (RUN + ["--decode", "sparse"], 2, "argument --decode: invalid choice: 'sparse' (choose from 'auto', 'merged', "
                                          "'csr')"),
    ],
    "eval.py": [
        ([], 2, "--out-dir is required: the folder of a run train.py wrote"),
        (RUN + ["--eval-tokens", "0"], 2, "--eval-tokens 0: must be >= 1"),
        (RUN + ["--eval-tokens", "nan"], 2, "argument --eval-tokens: invalid int value: 'nan'"),
        (RUN + ["--batch-size", "-2"], 2, "--batch-size -2: must be >= 1"),
        (RUN + ["--data", "{tmp}/nope"], 2, "--data {tmp}/nope: must be a folder data/prepare.py wrote (train.bin, "
                                            "val.bin, meta.json)"),
        (RUN + ["--device", "tpu"], 2, "--device tpu: must be one of: cpu"),
        (RUN + ["--dtype", "float16"], 2, "argument --dtype: invalid choice: 'float16' (choose from 'float32', "
                                          "'bfloat16')"),
    ],
    "export.py": [
        (RUN, 2, "--out-dir (a run's folder) and --hf-dir (where to write) are both required"),
        (RUN + ["--hf-dir", "{tmp}/hf", "--dtype", "float16"], 2, "argument --dtype: invalid choice: 'float16' (choose "
                                                                   "from 'float32', 'bfloat16')"),
        (RUN + ["--hf-dir"], 2, "argument --hf-dir: expected one argument"),
        (RUN + ["--hf-dir", "/", "--force"], 2, "--hf-dir /: must not be the run's folder or hold it (--out-dir {run}): "
                                                "the export replaces the whole folder; pass a new one, such as {run}/hf"),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", FLAG_CASES)
def test_each_flag_is_checked(tiny_run, tmp_path, script):
    """Issue 21, item 5: the real script, one line naming the flag and its rule, and a non-zero status."""
    run, cases = tiny_run("sltrain"), FLAG_CASES[script]
    results = run_cases(script, [[a.format(run=run, tmp=tmp_path) for a in argv] for argv, _, _ in cases])
    for (argv, status, line), (code, err, out) in zip(cases, results):
        if "--device" in argv and torch.cuda.is_available():
            continue  # a GPU machine lists its devices in the rule
        print(err, end="")
        assert (code, err) == (status, "error: " + line.format(run=run, tmp=tmp_path) + "\n"), argv
    assert os.listdir(tmp_path) == []  # nothing written, not even by export.py


@pytest.mark.slow
def test_max_new_tokens_past_the_context_is_explained(tiny_run):
    """The model attends to max_seq_len (64 here) tokens; generate slides its window past that
    (test_greedy_generate_equals_recompute_past_the_window), so sample.py runs and says so."""
    run = tiny_run("sltrain")
    (code, err, out), (code2, err2, out2) = run_cases("sample.py", [
        ["--out-dir", run, "--prompt", "def ", "--max-new-tokens", "70", "--temperature", "0", "--device", "cpu"],
        ["--out-dir", run, "--prompt", "x" * 100, "--max-new-tokens", "0", "--device", "cpu"]])
    assert code == 0 and err.startswith(
        "note: the 4-token prompt and --max-new-tokens 70 pass the model's context of 64 tokens: past 64 tokens each "
        "new token sees the newest 32 to 64 tokens, never the text before them\n")
    assert len(out.encode()) >= 4 + 70 - 3 + 1  # byte tokens, a few may decode to one character; print's newline
    assert code2 == 0 and err2.startswith("note: the 100-token prompt and --max-new-tokens 0 pass the model's context "
                                          "of 64 tokens: it reads the prompt's last 64 tokens only")
    assert out2 == "x" * 100 + "\n"


@pytest.mark.slow
def test_eval_equals_the_logged_eval(tiny_run):
    run = tiny_run("sltrain")
    logged = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))][-1]
    assert logged["type"] == "eval"
    # --device cpu: the run was logged on the CPU in fp32, and 1e-6 is an ulp-level tolerance
    assert eval_script.main(["--out-dir", run, "--device", "cpu"]) == pytest.approx(logged["val_loss"], abs=1e-6)
    assert eval_script.main(["--out-dir", run, "--eval-tokens", "512", "--device", "cpu"]) != pytest.approx(
        logged["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_sharded_checkpoint_loads_like_the_single_process_run(data_dir, tiny_run, tmp_path):
    """2 ranks x 2 sequences under FSDP2 train on the single run's 4 sequences per micro-step, so
    the weights agree up to the order of float sums (tests/test_parallel.py)."""
    i = TINY_RUN.index("--batch-size")
    flags = TINY_RUN[:i] + TINY_RUN[i + 2:]  # the same run but for --batch-size
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), *flags, "--batch-size", "2", "--data", data_dir,
                        "--dist", "fsdp", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "latest-sharded").exists() and not (tmp_path / "ckpt.pt").exists()
    assert "python sample.py --out-dir" in r.stdout  # train.py ends with the three commands
    sharded, single = checkpoint.load_model(str(tmp_path)), checkpoint.load_model(tiny_run("sltrain"))
    assert sharded.checkpoint.endswith("sharded-3")
    ids = torch.randint(0, 257, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids)[0], single(ids)[0], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_consolidated_model_pt_loads(tiny_run, tmp_path):
    """python -m run.checkpoint writes {model, config, build, step} to model.pt (checkpoint.consolidate): the same
    weights load."""
    state = torch.load(os.path.join(tiny_run("full"), "ckpt.pt"), weights_only=False)
    torch.save({k: state[k] for k in ("model", "config", "build", "step")}, tmp_path / "model.pt")
    ids = torch.randint(0, 257, (1, 32))
    with torch.no_grad():
        a, b = checkpoint.load_model(str(tmp_path))(ids)[0], checkpoint.load_model(tiny_run("full"))(ids)[0]
    assert torch.equal(a, b)


def test_auto_decode_follows_the_measurements():
    """benchmarks/decode_bench.py on the project's CPU: merged is faster for tiny, csr for 60m and a 7b block."""
    for name, expected in (("tiny", "merged"), ("60m", "csr"), ("7b", "csr")):
        cfg = CONFIGS[name]
        with torch.device("meta"):
            model = swap_linears(LLaMA(cfg), "sltrain", cfg.rank, cfg.delta, cfg.alpha)
        assert sample.choose_decode(model) == expected, name


@pytest.mark.slow
def test_decode_bench_times_both_modes(monkeypatch):
    """benchmarks/decode_bench.py, the measurement choose_decode follows: each mode's speed is timed on a model
    prepared that way (merged: no SLLinear left; csr: every SLLinear decodes through csr_forward)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import decode_bench
    timed, generate = [], decode_bench.generate

    def spy(model, *args, **kwargs):
        sls = [m for m in model.modules() if isinstance(m, SLLinear)]
        csr = sls and all(isinstance(m.forward, partial) and m.forward.func is csr_forward for m in sls)
        timed.append("csr" if csr else "merged" if not sls else "other")
        return generate(model, *args, **kwargs)
    monkeypatch.setattr(decode_bench, "generate", spy)
    (row,) = decode_bench.bench("cpu", ["tiny"], repeats=2, n_tokens=2)
    assert timed == ["merged", "csr"] * 2 and set(row) == {"model", "blocks", "merged", "csr", "auto"}
    out = subprocess.run([sys.executable, "benchmarks/decode_bench.py", "--models", "tiny", "--repeats", "1",
                          "--tokens", "4", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["model"] == "tiny" and row["blocks"] == CONFIGS["tiny"].n_layers and row["auto"] == "merged"
    assert row["merged"] > 0 and row["csr"] > 0


@pytest.mark.slow
def test_the_stats_line_comes_after_the_text_on_its_own_line(tiny_run):
    """stdout and stderr into one pipe (as a terminal shows them): the generated text first, whole, then the
    stats line, starting a line of its own after a blank one (stdout is flushed before stderr is written)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "sample.py", "--out-dir", tiny_run("sltrain"), "--max-new-tokens", "20",
                        "--prompt", "def "], cwd=ROOT, capture_output=False, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:]
    text, _, stats = r.stdout.rpartition("\n\n--- 20 tokens in ")
    assert text.startswith("def ") and stats.endswith("\n") and "tokens/s" in stats
