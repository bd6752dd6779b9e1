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

import pytest
import torch

import eval as eval_script
import sample
from conftest import TINY_RUN
from model import CONFIGS, LLaMA
from sltrain import swap_linears

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


def test_sample_script_on_a_run(tiny_run, capsys):
    run = tiny_run("sltrain")
    flags = ["--out-dir", run, "--prompt", "def ", "--max-new-tokens", "30", "--temperature", "1.0"]
    text = sample.main(flags + ["--seed", "0"])
    assert text.startswith("def ") and len(text.encode()) >= 4 + 30 - 3  # byte tokens (a few may be replaced)
    assert sample.main(flags + ["--seed", "0"]) == text
    assert sample.main(flags + ["--seed", "1", "--decode", "merged"]) != text
    assert "tokens/s" in capsys.readouterr().err


def test_bad_input_stops_with_one_line(tmp_path, capsys):
    for argv, message in ([["--out-dir", str(tmp_path / "nope")], "no run at"],
                          [["--out-dir", str(tmp_path)], "no checkpoint in"],
                          [[], "--out-dir is required"]):
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            sample.main(argv)
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="^error: .*unreadable"):
        sample.load_model(str(tmp_path))


def test_eval_equals_the_logged_eval(tiny_run):
    run = tiny_run("sltrain")
    logged = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))][-1]
    assert logged["type"] == "eval"
    assert eval_script.main(["--out-dir", run]) == pytest.approx(logged["val_loss"], abs=1e-6)
    assert eval_script.main(["--out-dir", run, "--eval-tokens", "512"]) != pytest.approx(logged["val_loss"], abs=1e-6)


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
    sharded, single = sample.load_model(str(tmp_path)), sample.load_model(tiny_run("sltrain"))
    assert sharded.checkpoint.endswith("sharded-3")
    ids = torch.randint(0, 257, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids)[0], single(ids)[0], rtol=0, atol=1e-4)


def test_consolidated_model_pt_loads(tiny_run, tmp_path):
    """--consolidate writes {model, config} to model.pt (parallel.consolidate): the same weights load."""
    state = torch.load(os.path.join(tiny_run("full"), "ckpt.pt"), weights_only=False)
    torch.save(dict(model=state["model"], config=state["config"]), tmp_path / "model.pt")
    ids = torch.randint(0, 257, (1, 32))
    with torch.no_grad():
        a, b = sample.load_model(str(tmp_path))(ids)[0], sample.load_model(tiny_run("full"))(ids)[0]
    assert torch.equal(a, b)


def test_auto_decode_follows_the_measurements():
    """--bench on the project's CPU: merged is faster for tiny, factorized for 60m and a 7b block."""
    for name, expected in (("tiny", "merged"), ("60m", "factorized"), ("7b", "factorized")):
        cfg = CONFIGS[name]
        with torch.device("meta"):
            model = swap_linears(LLaMA(cfg), "sltrain", cfg.rank, cfg.delta, cfg.alpha)
        assert sample.choose_decode(model) == expected, name
