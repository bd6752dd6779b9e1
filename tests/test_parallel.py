"""DDP and FSDP2 under torchrun (2 CPU processes, gloo) against a single-process run with the same
global batch. Differences come only from the order of floating-point sums (gradients reduced
across ranks, the loss averaged across ranks), so losses agree to ~1e-6 relative in fp32; we
allow 1e-4 absolute."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train

pytestmark = pytest.mark.slow  # torchrun spawns (2 gloo ranks): not in the one-minute check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gloo on the CPU on every machine: a one-GPU machine cannot host two NCCL ranks. lr 3e-3: the tolerances
# below were set at it (tiny's default became 1e-2 later; the larger lr grows the rounding differences faster)
COMMON = ["--model", "tiny", "--seq-len", "64", "--eval-tokens", "2048", "--log-every", "1", "--max-steps", "4",
          "--eval-every", "2", "--grad-accum", "2", "--device", "cpu", "--lr", "3e-3"]


def torchrun(*args, script="train.py", nproc=2, **env):
    """nproc gloo ranks of a script (a path in the repository) or a module (-m, e.g. run.checkpoint)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    target = [os.path.join(ROOT, script)] if script.endswith(".py") else ["-m", script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *target, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    return result


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return ({r["step"]: r["loss"] for r in records if r["type"] == "train"},
            {r["step"]: r["val_loss"] for r in records if r["type"] == "eval"})


def assert_close(a, b, tol=1e-4):
    assert a.keys() == b.keys(), (a, b)
    assert all(abs(a[k] - b[k]) < tol for k in a), (a, b)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """One process, 4 sequences per micro-step: the reference for 2 ranks x 2 sequences."""
    out = tmp_path_factory.mktemp("single")
    train.main(COMMON + ["--batch-size", "4", "--data", data_dir, "--out-dir", str(out)])
    return out


CLIP = 0.05  # below the tiny model's gradient norm on these steps (~0.3-1): clipping is active


@pytest.fixture(scope="module")
def single_clipped(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-clipped")
    train.main(COMMON + ["--batch-size", "4", "--grad-clip", str(CLIP), "--data", data_dir, "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_clip_the_global_norm(data_dir, single_clipped, tmp_path, mode):
    """With --grad-clip, the gradient reaching optimizer.step has global norm CLIP on 2 ranks (DDP: the
    all-reduced gradient; FSDP2: DTensor shards, whose norm must be taken across ranks), and the
    losses equal one process's with the same clipping."""
    # 2112 eval tokens = 33 windows of 64: an uneven split must not hang a collective, and the ranks
    # evaluate 32 of them, the same 32 as the single process's 2048 tokens
    r = torchrun(*COMMON, "--batch-size", "2", "--eval-tokens", "2112", "--grad-clip", str(CLIP), "--data", data_dir,
                 "--out-dir", str(tmp_path), "--dist", mode, script="tests/record_grad_norm.py",
                 GRAD_NORMS=str(tmp_path / "norms.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    norms = json.load(open(tmp_path / "norms.json"))
    assert len(norms) == 4 and all(abs(n - CLIP) < 1e-4 * CLIP for n in norms), norms
    train_ref, val_ref = losses(single_clipped)
    train_dist, val_dist = losses(tmp_path)
    assert_close(train_dist, train_ref)
    assert_close(val_dist, val_ref)


def test_fsdp_per_layer_matches_fsdp_and_resume_continues(data_dir, single, tmp_path):
    flags = [*COMMON, "--batch-size", "2", "--data", data_dir, "--dist", "fsdp"]
    # per-layer updates on the shards, split in two jobs: stop at step 2, resume to 4
    first = torchrun(*flags, "--per-layer", "--out-dir", str(tmp_path), "--stop-at-step", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(losses(tmp_path)[0]) == [1, 2]
    second = torchrun(*flags, "--per-layer", "--out-dir", str(tmp_path), "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert_close(losses(tmp_path)[0], losses(single)[0])  # FSDP2 matches one process (test above)

    # the sharded checkpoint gathers into one state dict equal to the single-process weights
    merged = torchrun("--out-dir", str(tmp_path), "--device", "cpu", script="run.checkpoint")
    assert merged.returncode == 0, merged.stderr[-3000:]
    full = torch.load(tmp_path / "model.pt", weights_only=False)["model"]
    ref = torch.load(single / "ckpt.pt", weights_only=False)["model"]
    assert full.keys() == ref.keys()
    for k in ref:
        if k.endswith("indices"):
            assert torch.equal(full[k], ref[k]), k  # the same support on every rank and in one process
        else:
            torch.testing.assert_close(full[k], ref[k], rtol=1e-4, atol=1e-5)

    # a shard lost on one rank: every rank stops with a message, none hangs in a collective
    shard_dir = tmp_path / open(tmp_path / "latest-sharded").read().strip()
    (shard_dir / "rank1-of-2.pt").unlink()
    lost = torchrun(*flags, "--per-layer", "--out-dir", str(tmp_path), "--resume", "--max-steps", "6")
    assert lost.returncode != 0 and "rank1-of-2.pt" in lost.stderr and "another rank failed" in lost.stderr


def test_per_layer_under_ddp_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.get_args(["--dist", "ddp", "--per-layer"])
    assert "all-reduce" in capsys.readouterr().err


def test_dist_needs_torchrun():
    with pytest.raises(SystemExit, match="torchrun"):
        train.main(["--dist", "fsdp", "--max-steps", "1"])


def test_support_must_be_identical_on_every_rank():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "replicated_buffers.py")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0 and "replicated-buffer check ok" in r.stdout, r.stderr[-3000:]


BF16 = ["--model", "tiny", "--seq-len", "64", "--eval-tokens", "2048", "--log-every", "1", "--max-steps", "20",
        "--eval-every", "20", "--grad-accum", "1", "--device", "cpu", "--dtype", "bfloat16", "--optimizer", "adamw8bit",
        "--lr", "3e-3"]


@pytest.fixture(scope="module")
def single_bf16(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-bf16")
    train.main(BF16 + ["--batch-size", "4", "--data", data_dir, "--out-dir", str(out)])
    return out


@pytest.mark.parametrize("per_layer", [[], ["--per-layer"]], ids=["global", "per-layer"])
def test_fsdp_bf16_compute_is_the_one_process_model(data_dir, single_bf16, tmp_path, per_layer):
    """bf16 autocast, AdamW8bit, 20 steps: FSDP2 on 2 ranks is the model one process trains. Step 1 runs
    the same weights on the same tokens, so its loss must agree to the fp32 loss averaging (1e-5): a
    residual stream cast to bf16 by FSDP2 alone was off by 3e-4 there. Later steps differ by how bf16
    rounds each rank's half-batch gradient before the fp32 reduce-scatter (one process rounds the whole
    batch's): ~2^-9 of a gradient, through Adam a few 1e-4 of the loss (measured: at most 8.3e-4 over
    20 steps); we allow 2e-3."""
    r = torchrun(*BF16, "--batch-size", "2", "--data", data_dir, "--out-dir", str(tmp_path), "--dist", "fsdp",
                 *per_layer)
    assert r.returncode == 0, r.stderr[-3000:]
    (train_ref, val_ref), (train_dist, val_dist) = losses(single_bf16), losses(tmp_path)
    assert abs(train_dist[1] - train_ref[1]) < 1e-5, (train_dist[1], train_ref[1])
    assert_close(train_dist, train_ref, tol=2e-3)
    assert_close(val_dist, val_ref, tol=2e-3)


NAN = ["--model", "tiny", "--seq-len", "64", "--eval-tokens", "2048", "--log-every", "1", "--max-steps", "5",
       "--eval-every", "5", "--grad-accum", "1", "--device", "cpu", "--optimizer", "adamw8bit", "--lr", "3e-3"]


def skips(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["skipped_updates"] for r in map(json.loads, f) if r["type"] == "train"}


@pytest.fixture(scope="module")
def single_nan(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single-nan")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "inject_nan.py"), *NAN, "--batch-size", "4",
                        "--data", data_dir, "--out-dir", str(out)], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "NAN_STEP": "3", "NAN_ROW": "2"}, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.parametrize("per_layer", [[], ["--per-layer"]], ids=["global", "per-layer"])
def test_a_nan_on_one_rank_is_skipped_by_every_rank(data_dir, single_nan, tmp_path, per_layer):
    """A NaN in the gradient of rank 1's first sequence at step 3 lands in some shards of a tensor and
    not in others. Every rank must skip the same tensors as one process does with the whole tensor:
    the same skipped count in the log, and the same losses after (fp32: 1e-4, as above)."""
    r = torchrun(*NAN, "--batch-size", "2", "--data", data_dir, "--out-dir", str(tmp_path), "--dist", "fsdp",
                 *per_layer, script="tests/inject_nan.py", NAN_STEP="3", NAN_ROW="2",
                 OPTIM_ALL_REDUCES=str(tmp_path / "all_reduces"))
    assert r.returncode == 0, r.stderr[-3000:]
    # the flags are reconciled once per step (global) or once per FSDP2 unit (per-layer: 4 blocks and the
    # root), never once per parameter (95 of them): a collective per parameter serializes against the
    # reduce-scatters on a GPU
    calls = [int(open(f"{tmp_path / 'all_reduces'}.rank{rank}").read()) for rank in (0, 1)]
    assert calls[0] == calls[1] == 5 * (5 if per_layer else 1), calls
    reference = skips(single_nan)
    assert reference[2] == 0 < reference[3] == reference[5]  # the NaN reached some tensors at step 3, only then
    assert skips(tmp_path) == reference
    assert_close(losses(tmp_path)[0], losses(single_nan)[0])
    assert_close(losses(tmp_path)[1], losses(single_nan)[1])


def test_ddp_replicas_round_bf16_weights_alike(data_dir, tmp_path):
    """bf16 weights round stochastically from torch's RNG, seeded alike on every rank: DDP replicas draw
    the same bits and stay bitwise identical (DDP never re-syncs weights). Replicas drawing other bits
    would differ in about half of their elements after a few steps."""
    flags = [*COMMON, "--param-dtype", "bfloat16", "--lr", "1e-3", "--data", data_dir, "--batch-size", "2"]
    r = torchrun(*flags, "--out-dir", str(tmp_path), "--dist", "ddp", script="tests/save_replica.py")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"replica{rank}.pt", weights_only=True) for rank in (0, 1))
    assert a.keys() == b.keys() and any(v.dtype == torch.bfloat16 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_fsdp_shards_round_bf16_weights_independently(tmp_path, path):
    """Two FSDP2 shards with equal values and equal gradients: stochastic rounding must draw other bits
    on each shard (the rank folded into the seed), or shard i's element k always rounds like shard j's
    element k. Here each element rounds down with probability ~1/2, so independent shards differ in
    about half of their 4,096 elements; shared noise makes them equal."""
    r = torchrun(path, script="tests/shard_noise.py", OUT=str(tmp_path / "shard"))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"shard.rank{rank}.pt") for rank in (0, 1))
    assert a.shape == b.shape == (8, 512) and a.dtype == torch.bfloat16
    for shard in (a, b):  # the rounding works on each shard: some elements moved down, others stayed
        assert 0.3 < (shard < 1).float().mean() < 0.7
    assert 0.3 < (a != b).float().mean() < 0.7


def test_two_nodes_are_two_ranks(data_dir, tmp_path):
    """`torchrun --nnodes 2`: two agents (two "nodes", here both on 127.0.0.1, one process each) train the same
    run as one agent with two processes: the same ranks, batches and all-reduces, so the same losses. Both nodes
    see one --out-dir and one --data, as on a shared filesystem; rank 0 writes."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [*COMMON, "--batch-size", "2", "--data", data_dir, "--dist", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               os.path.join(ROOT, "train.py"), *flags, "--out-dir", str(tmp_path / "two-nodes")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    one = torchrun(*flags, "--out-dir", str(tmp_path / "one-node"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert losses(tmp_path / "two-nodes") == losses(tmp_path / "one-node")
    assert "cpu x 2 ranks (ddp)" in outputs[0]  # rank 0 speaks for both nodes


def test_hsdp_two_copies_of_two_shards_is_ddp_and_resumes(data_dir, tmp_path):
    """--dist hsdp on 4 ranks, 2 copies x 2 shards: each copy reduce-scatters its ranks' gradients and the
    copies all-reduce theirs, the global batch's mean gradient as DDP's all-reduce, so the losses equal
    DDP's on 4 ranks (to rounding). Split at step 2 and resumed: both copies read the first copy's files.
    The shards gather (run.checkpoint, 4 ranks) and join (load_model, one process) into DDP's weights."""
    from run.checkpoint import load_model
    flags = [*COMMON, "--batch-size", "1", "--data", data_dir]
    ddp = torchrun(*flags, "--dist", "ddp", "--out-dir", str(tmp_path / "ddp"), nproc=4)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    hsdp = [*flags, "--dist", "hsdp", "--shard-size", "2", "--out-dir", str(tmp_path / "hsdp")]
    first = torchrun(*hsdp, "--stop-at-step", "2", nproc=4)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "cpu x 4 ranks (hsdp: 2 copies of 2)" in first.stdout
    files = sorted(os.listdir(tmp_path / "hsdp" / "sharded-2"))
    assert files == ["rank0-of-2.pt", "rank1-of-2.pt"], files  # one copy's shards, not every rank's
    second = torchrun(*hsdp, "--resume", nproc=4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert_close(losses(tmp_path / "hsdp")[0], losses(tmp_path / "ddp")[0])
    assert_close(losses(tmp_path / "hsdp")[1], losses(tmp_path / "ddp")[1])

    ref = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)["model"]
    joined = load_model(str(tmp_path / "hsdp")).state_dict()  # read_sharded: the first copy's files
    short = torchrun("--out-dir", str(tmp_path / "hsdp"), "--device", "cpu", script="run.checkpoint")
    assert short.returncode != 0 and "trained with --dist hsdp on 4 ranks" in short.stderr
    merged = torchrun("--out-dir", str(tmp_path / "hsdp"), "--device", "cpu", script="run.checkpoint", nproc=4)
    assert merged.returncode == 0, merged.stderr[-3000:]
    gathered = torch.load(tmp_path / "hsdp" / "model.pt", weights_only=False)["model"]
    for k in ref:
        for state in (joined, gathered):
            if k.endswith("indices"):
                assert torch.equal(state[k], ref[k]), k
            else:
                torch.testing.assert_close(state[k], ref[k], rtol=1e-4, atol=1e-5)


def test_hsdp_copies_round_alike_and_shards_apart(data_dir, tmp_path):
    """Per-layer AdamW8bit on bf16 weights under HSDP (2 copies x 2 shards): stochastic rounding seeds by the
    shard, so the copies of a shard stay bitwise equal (checked at every checkpoint, run/parallel.check_replicas:
    a copy that drifted would be lost, as only the first is saved) while the shards draw their own noise."""
    flags = [*COMMON, "--batch-size", "1", "--data", data_dir, "--dist", "hsdp", "--shard-size", "2",
             "--param-dtype", "bfloat16", "--optimizer", "adamw8bit", "--per-layer", "--lr", "1e-3"]
    r = torchrun(*flags, "--out-dir", str(tmp_path), nproc=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(tmp_path)[1]) == [2, 4]


def test_hsdp_shard_size_must_divide_the_ranks(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "6")
    for flags, message in ((["--dist", "hsdp", "--shard-size", "4"], "must divide the number of ranks, 6"),
                           (["--dist", "fsdp", "--shard-size", "3"], "only --dist hsdp shards")):
        with pytest.raises(SystemExit):
            train.get_args(flags)
        err = capsys.readouterr().err
        assert err.startswith("error: --shard-size") and message in err and len(err.splitlines()) == 1, err
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train.get_args(["--dist", "hsdp"]).shard_size == 4  # one node's ranks
