"""Reliability: every bad input stops with one line that says what to do, a resume that would not
continue the run exactly is refused, and a kill at any moment loses nothing. The kills are real:
tests/kill_at.py runs train.py in a subprocess that SIGKILLs itself at a named point, and the
resumed run's log is compared with an uninterrupted run's, record by record, bit for bit."""
import io
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from run import checkpoint
import train
from optim import AdamW8bit

pytestmark = pytest.mark.slow  # kills, resumes and torchrun spawns of real runs: not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_AT = os.path.join(ROOT, "tests", "kill_at.py")
# On the CPU on every machine: runs are compared record by record, bit for bit (a GPU's atomics reorder float
# sums), rerun under torchrun on 2 gloo ranks (a one-GPU machine cannot host two), and a resume's refusal
# names --dtype float32, the CPU's default (a GPU's is bfloat16)
SMALL = ["--model", "tiny", "--batch-size", "4", "--seq-len", "64", "--eval-tokens", "2048", "--log-every", "1",
         "--device", "cpu"]
TIMING = {"tokens_per_s", "elapsed_s", "peak_mem_gb"}  # the only fields two runs may differ in


def run(data_dir, out_dir, *extra):
    return train.main(SMALL + ["--data", str(data_dir), "--out-dir", str(out_dir), *extra])


def records(out_dir):
    """The train and eval records of a run's log, without the timing fields."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, f)
                if r["type"] in ("train", "eval")]


def refusal(capsys, call):
    """The message a refused call leaves: SystemExit's own text, or argparse's on stderr."""
    with pytest.raises(SystemExit) as e:
        call()
    return e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err


# -----------------------------------------------------------------------------
# bad input: one line, naming the flag, saying what to do


@pytest.mark.parametrize("flags, named", [
    (["--rank", "0"], "--rank 0: must be in [1, 128]"),
    (["--rank", "129"], "--rank 129: must be in [1, 128]"),
    (["--delta", "1.5"], "--delta 1.5: the sparse density must be in [0, 1)"),
    (["--delta", "-0.1"], "--delta -0.1"),
    (["--alpha", "-1"], "--alpha -1.0: must be > 0"),
    (["--alpha", "inf"], "--alpha inf"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--lr", "nan"], "--lr nan"),
    (["--grad-clip", "-1"], "--grad-clip -1.0"),
    (["--warmup", "-5"], "--warmup -5: must be in [0, 300]"),
    (["--max-steps", "10", "--warmup", "11"], "--warmup 11"),
    (["--stop-at-step", "0"], "--stop-at-step 0: must be >= 1"),
    (["--max-steps", "10", "--stop-at-step", "11"], "--stop-at-step 11: must be in [1, --max-steps 10]"),
    (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--grad-accum", "-1"], "--grad-accum -1"),
    (["--batch-size", "3"], "--batch-size 3: the tiny recipe's 16 sequences per step do not split"),
    (["--seq-len", "0"], "--seq-len 0"),
    (["--eval-every", "0"], "--eval-every 0"),
    (["--eval-tokens", "0"], "--eval-tokens 0"),
    (["--log-every", "0"], "--log-every 0"),
    (["--vocab-size", "0"], "--vocab-size 0"),
    (["--gpus", "0"], "--gpus 0"),
    (["--seed", "-1"], "--seed -1"),
    (["--device", "tpu"], "--device tpu: must be one of: cpu"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--rank", "four"], "--rank: invalid int value: 'four'"),
    (["--model", "13b"], "--model: invalid choice: '13b'"),
    (["--per-layer", "--grad-clip", "1"], "--grad-clip with --per-layer"),
])
def test_bad_flags_get_one_line_errors(capsys, flags, named):
    message = refusal(capsys, lambda: train.main(flags + ["--dry-run"]))
    assert message.startswith("error: ") and named in message and message.count("\n") <= 1, message


def test_global_batch_is_the_recipes_on_any_number_of_ranks(monkeypatch, capsys):
    for world in (1, 2, 4, 8, 16):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args = train.get_args(["--model", "60m"])
        assert world * args.batch_size * args.grad_accum == 512 and args.batch_size <= 64
    monkeypatch.setenv("WORLD_SIZE", "3")  # 512 is not a multiple of 3: say so, and what to pass
    message = refusal(capsys, lambda: train.get_args(["--model", "60m"]))
    assert message.startswith("error: the 60m recipe's 512 sequences per step do not split") and \
        "--batch-size 57 --grad-accum 3 (513 sequences per step)" in message
    message = refusal(capsys, lambda: train.get_args(["--model", "60m", "--batch-size", "48"]))
    assert message.startswith("error: --batch-size 48:")
    args = train.get_args(["--model", "60m", "--batch-size", "57", "--grad-accum", "3"])  # both given: as asked
    assert (args.batch_size, args.grad_accum) == (57, 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.get_args(["--model", "60m", "--grad-accum", "8"]).batch_size == 32


def test_data_missing_on_one_rank_stops_every_rank(data_dir, tmp_path):
    """Rank 1 finds no data (a node without the shared disk): both ranks exit with a message; none
    waits in a collective for a rank that is gone."""
    os.symlink(data_dir, tmp_path / "data0")  # rank 0's data; rank 1's, data1, does not exist
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", KILL_AT,
                        *SMALL, "--batch-size", "2", "--grad-accum", "4", "--max-steps", "1", "--dist", "ddp",
                        "--data", str(tmp_path / "data{rank}"), "--out-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=240)
    assert r.returncode != 0
    assert f"error: no prepared data at {tmp_path / 'data1'}" in r.stderr, r.stderr[-3000:]
    assert "error: another rank failed" in r.stderr, r.stderr[-3000:]  # rank 0 heard, and left too


def test_divergence_past_exp_range_is_reported_not_crashed(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "validation_loss", lambda *args: 800.0)  # exp(800) overflows a float
    run(data_dir, tmp_path, "--max-steps", "1")
    evals = [{k: r[k] for k in ("type", "step", "val_loss", "val_ppl")} for r in records(tmp_path) if r["type"] == "eval"]
    assert evals == [dict(type="eval", step=1, val_loss=800.0, val_ppl=float("inf"))]


# -----------------------------------------------------------------------------
# resume: only what continues the run exactly


def test_resume_refuses_every_difference_that_breaks_exactness(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path / "run", "--batch-size", "16", "--max-steps", "2")
    ckpt = (tmp_path / "run" / "ckpt.pt").read_bytes()
    from data.prepare import prepare_stdlib
    other = str(tmp_path / "other")
    prepare_stdlib(other, max_bytes=500_000)
    message = refusal(capsys, lambda: run(other, tmp_path / "run", "--batch-size", "8", "--grad-accum", "2",
                                          "--param-dtype", "bfloat16", "--dtype", "bfloat16", "--max-steps", "4",
                                          "--resume"))
    assert message.startswith("error: the checkpoint") and message.count("\n") == 0
    for difference in ("--param-dtype float32 (now bfloat16)", "--dtype float32 (now bfloat16)",
                       "--batch-size 16 (now 8)", "--grad-accum 1 (now 2)", "the data's train_tokens"):
        assert difference in message, (difference, message)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == ckpt

    # the number of ranks, read from the environment under torchrun
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    args = train.get_args(SMALL + ["--batch-size", "16", "--max-steps", "2", "--data", data_dir])
    args.vocab_size, args.world_size = state["config"]["vocab_size"], 2
    assert checkpoint.differences(state, args, state["data_meta"], whole_run=True) == ["the number of ranks 1 (now 2)"]

    # what may change does, with a note for the schedule
    run(data_dir, tmp_path / "run", "--batch-size", "16", "--max-steps", "3", "--lr", "1e-3", "--warmup", "0",
        "--eval-every", "3", "--eval-tokens", "1024", "--log-every", "3", "--resume")
    out = capsys.readouterr().out
    assert "note: --lr is 0.001, the checkpoint's run had 0.01" in out and "note: --max-steps is 3" in out
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 1, 2, 2, 3, 3]  # evals every step, then 3

    # without --lr, a resume keeps the run's lr (here 1e-3), not tiny's default (1e-2): no note, the same lr
    run(data_dir, tmp_path / "run", "--batch-size", "16", "--max-steps", "4", "--warmup", "0", "--eval-every", "4",
        "--eval-tokens", "1024", "--log-every", "4", "--resume")
    assert "note: --lr" not in capsys.readouterr().out
    with open(tmp_path / "run" / "log.jsonl") as f:
        assert [r["lr"] for r in map(json.loads, f) if r["type"] == "config"][-1] == 1e-3


def test_torn_log_line_is_dropped_on_resume(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max-steps", "2")
    whole = (tmp_path / "log.jsonl").read_text()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"type": "train", "step": 3, "loss": 4.1')  # a kill inside the write of step 3's record
    run(data_dir, tmp_path, "--max-steps", "3", "--resume")
    lines = (tmp_path / "log.jsonl").read_text()
    assert lines.startswith(whole) and [r["step"] for r in records(tmp_path)] == [1, 1, 2, 2, 3, 3]


# -----------------------------------------------------------------------------
# checkpoint files: durable, and what a killed run left half-written is cleaned up


def test_checkpoint_file_and_its_rename_reach_the_disk(data_dir, tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    run(data_dir, tmp_path, "--max-steps", "1")
    ckpt = str(tmp_path / "ckpt.pt")
    assert synced.index(ckpt + ".tmp") < synced.index(str(tmp_path))  # the data, then the rename


def test_a_killed_runs_leftovers_are_removed(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max-steps", "2")
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "log.jsonl.tmp").write_text("{}\n")
    (tmp_path / "sharded-4.tmp").mkdir()
    (tmp_path / "sharded-4.tmp" / "rank0-of-2.pt").write_bytes(b"half a shard")
    run(data_dir, tmp_path, "--max-steps", "3", "--resume")
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt.pt", "log.jsonl"]  # .lock: train.py's (one run per folder)


def test_sharded_leftovers_are_removed_and_the_pointed_checkpoint_kept(tmp_path):
    for name in ("sharded-2", "sharded-4", "sharded-6.tmp"):  # sharded-4: renamed, the pointer not yet moved
        (tmp_path / name).mkdir()
        (tmp_path / name / "rank0-of-2.pt").write_bytes(b"a shard")
    (tmp_path / "latest-sharded").write_text("sharded-2")
    (tmp_path / "latest-sharded.tmp").write_text("sharded-")
    checkpoint.remove_stale(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latest-sharded", "sharded-2"]
    assert os.listdir(tmp_path / "sharded-2") == ["rank0-of-2.pt"]


class NewStorage(TorchDispatchMode):
    """Counts the bytes of every tensor an op returns in storage none of its inputs had."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        self.bytes += sum(t.untyped_storage().nbytes() for t in torch.utils._pytree.tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen)
        return out


def test_adamw8bit_load_state_dict_copies_nothing_already_in_place():
    """A 7b resume must not hold the optimizer state several times over: a state dict already on the
    parameters' device becomes the state as it is (no cast, no copy), dtypes kept."""
    params = [torch.nn.Parameter(torch.randn(8192, dtype=dtype)) for dtype in (torch.bfloat16, torch.float32)]
    opt = AdamW8bit([dict(params=params[:1]), dict(params=params[1:], fp32_state=True)])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)  # as a resume reads it
    state_bytes = sum(v.nbytes for s in saved["state"].values() for v in s.values() if torch.is_tensor(v))
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = AdamW8bit([dict(params=clones[:1]), dict(params=clones[1:], fp32_state=True)])
    with NewStorage() as allocated:
        resumed.load_state_dict(saved)
    assert allocated.bytes == 0, f"{allocated.bytes} bytes allocated to load a {state_bytes}-byte state"
    for p, q in zip(params, clones):
        for k, v in opt.state[p].items():
            w = resumed.state[q][k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if torch.is_tensor(v) else v == w


# -----------------------------------------------------------------------------
# fault injection: SIGKILL at six points, resume, compare with the uninterrupted run

FAULT_FLAGS = ["--model", "tiny", "--batch-size", "4", "--grad-accum", "1", "--seq-len", "64", "--eval-tokens",
               "2048", "--log-every", "1", "--max-steps", "6", "--eval-every", "2", "--device", "cpu"]  # see SMALL
# (point:n, the checkpoint step the kill leaves). Checkpoints land at steps 2, 4, 6; the log's
# writes are config, train 1, train 2, eval 2, train 3, train 4, eval 4 (the 7th), ...
KILLS = [("batch:4", 2),     # in step 4, between checkpoints
         ("eval:2", 2),      # in step 4's eval, its train record written
         ("log:7", 2),       # half of step 4's eval record on disk, its checkpoint not yet begun
         ("save:2", 2),      # half of step 4's checkpoint in ckpt.pt.tmp
         ("rename:2", 2),    # step 4's checkpoint complete in ckpt.pt.tmp, not yet renamed
         ("renamed:2", 4)]   # just after the rename, before the next step


class TrainPy:
    """python train.py runs, each a fresh process forked by one kill_at.py --serve (torch imported once)."""

    def __init__(self):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen([sys.executable, KILL_AT, "--serve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def __call__(self, data_dir, out_dir, *flags, kill=None):
        """-> the exit code (-9 when killed) and what the run printed."""
        output = f"{out_dir}.out"
        self.server.stdin.write(json.dumps([kill, [*FAULT_FLAGS, "--data", data_dir, "--out-dir", str(out_dir),
                                                   *flags], output]) + "\n")
        self.server.stdin.flush()
        code = int(self.server.stdout.readline())
        with open(output) as f:
            return code, f.read()[-2000:]

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=60)


def kill_and_resume(train_py, data_dir, out_dir, kill, checkpoint_step):
    code, output = train_py(data_dir, out_dir, kill=kill)
    assert code == -9, (kill, code, output)  # SIGKILL, at the point
    left = sorted(os.listdir(out_dir))
    assert torch.load(out_dir / "ckpt.pt", weights_only=False)["step"] == checkpoint_step, kill
    torn = not (out_dir / "log.jsonl").read_text().endswith("}\n")
    code, output = train_py(data_dir, out_dir, "--resume")
    assert code == 0, (kill, output)
    return left, torn


def test_kill_anywhere_then_resume_equals_the_uninterrupted_run(data_dir, tmp_path):
    servers = [TrainPy() for _ in range(min(4, len(os.sched_getaffinity(0))))]  # one per core; cases independent
    idle = queue.Queue()
    for server in servers:
        idle.put(server)

    def on_an_idle_server(case):
        server = idle.get()
        try:
            return kill_and_resume(server, data_dir, tmp_path / case[0].replace(":", "-"), *case)
        finally:
            idle.put(server)
    try:
        assert servers[0](data_dir, tmp_path / "whole")[0] == 0
        expected = records(tmp_path / "whole")
        assert [r["step"] for r in expected] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
        with ThreadPoolExecutor(len(servers)) as pool:
            results = dict(zip(KILLS, pool.map(on_an_idle_server, KILLS)))
    finally:
        for server in servers:
            server.close()
    assert results[("save:2", 2)][0] == [".lock", "ckpt.pt", "ckpt.pt.tmp", "log.jsonl"]  # the torn file was there
    assert results[("rename:2", 2)][0] == [".lock", "ckpt.pt", "ckpt.pt.tmp", "log.jsonl"]
    assert results[("log:7", 2)][1]  # the log's last line was torn
    for kill, _ in KILLS:
        out_dir = tmp_path / kill.replace(":", "-")
        assert records(out_dir) == expected, kill  # every record, bit for bit
        assert sorted(os.listdir(out_dir)) == [".lock", "ckpt.pt", "log.jsonl"], kill  # nothing half-written left


def test_kill_inside_a_sharded_save_then_resume_continues_exactly(data_dir, tmp_path):
    """FSDP2 on 2 ranks (gloo): rank 0 dies with step 4's shards renamed into sharded-4, the pointer
    still naming sharded-2. The resume removes sharded-4 and continues from step 2 exactly."""
    def torchrun(out_dir, *flags, kill=None):
        env = {k: v for k, v in os.environ.items() if k != "NANO_SLTRAIN_KILL_AT"}
        env.update(OMP_NUM_THREADS="1", **({"NANO_SLTRAIN_KILL_AT": kill} if kill else {}))
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               KILL_AT, *FAULT_FLAGS, "--batch-size", "2", "--max-steps", "4", "--dist", "fsdp",
                               "--data", data_dir, "--out-dir", str(out_dir), *flags], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
    whole = torchrun(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = torchrun(tmp_path / "killed", kill="rename:2")
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-3000:]  # rank 0 killed
    assert sorted(os.listdir(tmp_path / "killed")) == [".lock", "latest-sharded", "latest-sharded.tmp", "log.jsonl",
                                                       "sharded-2", "sharded-4"]
    # to step 3 only, so the run never writes a sharded-4 of its own: the killed run's is gone at start
    resumed = torchrun(tmp_path / "killed", "--resume", "--stop-at-step", "3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "killed")) == [".lock", "latest-sharded", "log.jsonl", "sharded-3"]
    upto3 = [r for r in records(tmp_path / "whole") if r["step"] <= 3]  # train 1, 2, 3 and eval 2
    assert [r for r in records(tmp_path / "killed") if r["step"] < 3 or r["type"] == "train"] == upto3


def test_resume_does_not_draw_supports_it_will_overwrite(data_dir, tmp_path, monkeypatch):
    """A fresh run draws each SL layer's support (28 in tiny); --resume loads them from the checkpoint and
    draws none (at 7b, 224 draws take about a minute), and still continues the run exactly."""
    import sltrain
    calls = []
    real = sltrain.random_support
    monkeypatch.setattr(sltrain, "random_support", lambda *a, **k: calls.append(1) or real(*a, **k))
    flags = SMALL + ["--max-steps", "4", "--eval-every", "2", "--data", data_dir]
    train.main(flags + ["--out-dir", str(tmp_path / "whole")])
    assert len(calls) == 28
    train.main(flags + ["--out-dir", str(tmp_path / "split"), "--stop-at-step", "2"])
    calls.clear()
    train.main(flags + ["--out-dir", str(tmp_path / "split"), "--resume"])
    assert calls == []
    assert [r for r in records(tmp_path / "split") if r["type"] == "eval"] == \
           [r for r in records(tmp_path / "whole") if r["type"] == "eval"]
