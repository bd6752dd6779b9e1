"""The memory plan (memory.memory_plan, what --dry-run prints) against what a real CPU run holds.

The references are the run's own tensors: bytes of its parameters and buffers, of the gradients
alive at their peak (read at every gradient hook and after every backward), of its optimizer
state, and of the storages a training forward leaves alive (every op's output followed by a weak
reference: what autograd, a checkpoint or the caller still holds when backward starts).
"""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sltrain
import train
from model import CONFIGS
from optim import PerLayerOptimizer
from run import memory, parallel
from sltrain import SLLinear

pytestmark = pytest.mark.slow  # real runs measured against the plan: not in the one-minute check

COMMON = ["--batch-size", "2", "--seq-len", "64", "--device", "cpu", "--grad-accum", "1"]
SETTINGS = {  # each changes what one GPU holds
    "fp32 AdamW": [],
    "bf16 weights, AdamW (fp32 state)": ["--param-dtype", "bfloat16", "--dtype", "bfloat16"],
    "fp32 weights, AdamW8bit, bf16 compute": ["--optimizer", "adamw8bit", "--dtype", "bfloat16"],
    "bf16 weights, AdamW8bit": ["--param-dtype", "bfloat16", "--optimizer", "adamw8bit", "--dtype", "bfloat16"],
    "bf16, AdamW8bit, per-layer, checkpointing": ["--param-dtype", "bfloat16", "--optimizer", "adamw8bit",
                                                  "--dtype", "bfloat16", "--per-layer", "--activation-checkpointing"],
    "fp32 AdamW, per-layer, 2 micro-steps": ["--per-layer", "--grad-accum", "2"],
    "full, checkpointing, bf16 compute": ["--method", "full", "--activation-checkpointing", "--dtype", "bfloat16"],
}


class LiveStorages(TorchDispatchMode):
    """Follows every storage an op returns by weak reference; alive() sums those still alive."""

    def __init__(self):
        super().__init__()
        self.refs = {}  # storage id -> (weak reference, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if s._cdata not in self.refs or self.refs[s._cdata][0].expired():  # ids of freed storages come back
                    self.refs[s._cdata] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive(self, exclude):
        return sum(n for key, (ref, n) in self.refs.items() if not ref.expired() and key not in exclude)


def measure(args):
    """Two steps of the real loop (train.py's, on CPU); returns the bytes each plan line stands for."""
    dtype = getattr(torch, args.dtype)
    model, _ = parallel.parallelize(train.build_model(args, args.vocab_size), args, None)
    params = list(model.parameters())
    grads = [0]

    def read_grads(*_):
        grads[0] = max(grads[0], sum(p.grad.nbytes for p in params if p.grad is not None))
    for p in params:  # registered before the optimizer's hooks, so each runs before a per-layer update frees p.grad
        p.register_post_accumulate_grad_hook(read_grads)
    optimizer = train.build_optimizer(model, args)
    state = {t.untyped_storage()._cdata for t in [*params, *model.buffers()]}
    autocast = torch.autocast("cpu", dtype, enabled=dtype != torch.float32)
    torch.manual_seed(0)
    activations = 0
    for step in range(2):
        for micro in range(args.grad_accum):
            x = torch.randint(args.vocab_size, (args.batch_size, args.seq_len))
            with LiveStorages() as live, autocast:
                logits, loss = model(x, x)  # train.py holds the logits too (as `_`) through backward
            activations = max(activations, live.alive(state))
            (loss / args.grad_accum).backward()
            read_grads()
            del logits, loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optimizers = optimizer.optimizers.values() if isinstance(optimizer, PerLayerOptimizer) else [optimizer]
    return dict(weights=sum(p.nbytes for p in params), gradients=grads[0],
                optimizer_state=sum(v.nbytes for opt in optimizers for s in opt.state.values()
                                    for v in s.values() if torch.is_tensor(v)),
                buffers=sum(b.nbytes for b in model.buffers()), activations=activations)


@pytest.mark.parametrize("size,vocab", [("tiny", 32000), ("60m", 257)])  # the head's share large, then small
def test_plan_is_what_a_run_allocates(size, vocab, monkeypatch):
    if size == "60m":  # the 60m shapes (dim, ffn, heads, r, delta), 2 of its 8 blocks
        monkeypatch.setitem(CONFIGS, "60m", replace(CONFIGS["60m"], n_layers=2))
    rows = []
    for name, flags in SETTINGS.items():
        args = train.get_args(["--model", size, "--vocab-size", str(vocab), *COMMON, *flags])
        plan = memory.memory_plan(args, train.build_model(args, vocab))
        real = measure(args)
        rows += [(name, line, plan[line], real[line]) for line in real]
    print(f"\n{'setting':<44} {'line':<16} {'planned':>10} {'measured':>10} ratio")
    for name, line, planned, measured in rows:
        print(f"{name:<44} {line:<16} {planned:10.0f} {measured:10.0f} {planned / measured:.3f}")
    off = [r for r in rows if not 0.9 <= r[2] / r[3] <= 1.1]
    assert not off, off


def test_checkpointing_plan_recomputes_one_block():
    """recompute: one block's saved tensors, as a real run without checkpointing saves them, less its input."""
    flags = ["--model", "tiny", "--vocab-size", "257", *COMMON, "--dtype", "bfloat16"]
    plain = measure(train.get_args(flags))["activations"]
    checkpointed = measure(train.get_args(flags + ["--activation-checkpointing"]))["activations"]
    args = train.get_args(flags + ["--activation-checkpointing"])
    model = train.build_model(args, 257)
    block_input = args.batch_size * args.seq_len * model.cfg.dim * 4  # the fp32 residual stream
    per_block = (plain - checkpointed) / model.cfg.n_layers + block_input
    recompute = memory.memory_plan(args, model)["recompute"]
    print(f"\nrecompute: planned {recompute}, measured {per_block:.0f}, ratio {recompute / per_block:.3f}")
    assert 0.9 <= recompute / per_block <= 1.1, (recompute, per_block)


def peak_rss_gb(code):
    """Peak resident memory of a fresh process running `code`: VmHWM, its own address space's high-water
    mark (ru_maxrss would carry over the pytest process that forked it)."""
    code += "\nprint(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(train.__file__)))
    return int(out.stdout.split("VmHWM:")[1].split()[0]) / 1e6  # kB -> GB


def test_dry_run_allocates_nothing():
    """--model 7b --dry-run peaks within 0.3 GB of a process that imports train.py and parses the same flags
    (on a CUDA machine parsing starts the CUDA driver, --device's default)."""
    flags = "['--model', '7b', '--dry-run', '--vocab-size', '32000']"
    parsed = peak_rss_gb(f"import train\ntrain.get_args({flags})")
    dry_run = peak_rss_gb(f"import train\ntrain.main({flags})")
    print(f"\npeak RSS: flags parsed {parsed:.3f} GB, --model 7b --dry-run {dry_run:.3f} GB")
    assert dry_run - parsed < 0.3, (dry_run, parsed)


def test_per_layer_optimizers_share_code_books():
    """--per-layer makes one AdamW8bit per tensor; each with its own pair of code books (0.66 MB of
    lookup tables) would hold 0.49 GB at 7b (737 such tensors) that no plan line counts."""
    args = train.get_args(["--model", "tiny", "--vocab-size", "257", *COMMON, "--optimizer", "adamw8bit",
                           "--per-layer"])
    model, _ = parallel.parallelize(train.build_model(args, 257), args, None)
    optimizer = train.build_optimizer(model, args)
    x = torch.randint(257, (args.batch_size, args.seq_len))
    model(x, x)[1].backward()
    optimizer.step()
    eight_bit = [opt for opt in optimizer.optimizers.values() if any("m_codes" in s for s in opt.state.values())]
    tables = {opt.book(torch.device("cpu"), signed).lut_threshold.data_ptr()
              for opt in eight_bit for signed in (True, False)}
    assert len(eight_bit) > 10 and len(tables) == 2


@pytest.mark.parametrize("gpus", [1, 8])
def test_dry_run_plans_the_papers_tokens_per_step(gpus):
    """Every paper size's default recipe trains 512 x 256 = 131,072 tokens per step (REFERENCE §2) on the GPUs a
    dry run plans for, with the parallelism torchrun would get there: DDP, or FSDP2 for 1b and 7b."""
    for size in ("60m", "130m", "350m", "1b", "7b"):
        args = train.get_args(["--model", size, "--dry-run", "--gpus", str(gpus)])
        assert args.gpus * args.batch_size * args.grad_accum * args.seq_len == 131_072, size
        assert args.dist == ("none" if gpus == 1 else "fsdp" if size in ("1b", "7b") else "ddp"), size


def test_support_layout_line_is_the_kernels_layouts():
    """Where the Triton route runs, the plan adds each SL layer's SupportLayout (the route builds it once):
    its bytes are those of the layouts kernels.support_layout builds for the real layers. At 2 x 64 tokens
    a GPU's auto route takes Triton (60m q/k/v/o, multiply-adds: dense 3*128*512^2 + 4*512^2*128 = 2.35e8 >
    Triton 3*128*128*1024 + 3*128*7,864/0.02 = 2.01e8); a CPU's never does."""
    import kernels
    args = train.get_args(["--model", "60m", "--vocab-size", "257", *COMMON])
    model, _ = parallel.parallelize(train.build_model(args, 257), args, None)
    built = [kernels.support_layout(m) for m in model.modules() if isinstance(m, SLLinear)]
    real = sum(t.nbytes for layout in built for t in (layout.row_ptr, layout.col_order, layout.col_ptr))
    assert len(built) == 7 * 8
    planned = train.get_args(["--model", "60m", "--vocab-size", "257", *COMMON, "--dry-run"])  # plans for GPUs
    assert memory.memory_plan(planned, train.build_model(planned, 257))["support_layout"] == real
    assert memory.memory_plan(args, train.build_model(args, 257))["support_layout"] == 0


SEVEN_B = ["--model", "7b", "--vocab-size", "32000", "--param-dtype", "bfloat16", "--grad-accum", "1"]


@pytest.mark.parametrize("flags, builds", [
    # 7b q/k/v/o (the cheapest layers for Triton) in multiply-adds, by kernels.py's cost model worked by hand:
    # 16 x 256 = 4,096 tokens: dense route 3*4096*4096^2 + 4*4096^2*1024 = 2.75e11 < Triton 3*4096*1024*8192 +
    # 3*4096*838,860/0.02 = 6.19e11, and the MLP layers weigh against Triton more: no layer builds a layout
    (["--batch-size", "16", "--eval-tokens", "8192"], False),
    (["--batch-size", "1", "--eval-tokens", "8192"], True),  # 256 tokens: dense 8.16e10 > Triton 3.87e10
    # 18 windows of 256 eval tokens: the last eval batch holds 2 sequences, 512 tokens (dense 9.45e10 > 7.73e10)
    (["--batch-size", "16", "--eval-tokens", "4608"], True),
    # on 2 GPUs each rank evaluates 9 windows, one batch of 2,304 tokens: no layout
    (["--batch-size", "16", "--eval-tokens", "4608", "--gpus", "2"], False),
    (["--batch-size", "1", "--eval-tokens", "8192", "--device", "cpu"], False),  # a CPU run: auto stays dense
])
def test_support_layout_is_planned_where_the_auto_route_takes_triton(flags, builds):
    dry = [] if "--device" in flags else ["--dry-run"]  # a dry run plans for GPUs
    args = train.get_args(SEVEN_B + dry + flags)
    assert memory.builds_layouts(args, train.build_model(args, 32000)) == builds


def test_forced_routes_decide_the_support_layout_on_any_device(monkeypatch):
    args = train.get_args(SEVEN_B + ["--batch-size", "16", "--eval-tokens", "8192", "--device", "cpu"])
    model = train.build_model(args, 32000)
    monkeypatch.setattr(sltrain, "ROUTE", "triton")  # the Triton route on the CPU: the interpreter
    assert memory.builds_layouts(args, model)
    args = train.get_args(SEVEN_B + ["--batch-size", "1", "--eval-tokens", "8192", "--dry-run"])
    monkeypatch.setattr(sltrain, "ROUTE", "dense")
    assert not memory.builds_layouts(args, model)


def test_hsdp_plans_one_copy_per_shard_group():
    """HSDP shards each copy over its --shard-size GPUs: 16 GPUs in 2 copies of 8 hold 1/8 of the weights each
    (2 bytes x parameters / 8), FSDP2 over all 16 holds 1/16; a dry run without torchrun plans nodes of 8."""
    flags = [*SEVEN_B, "--dry-run", "--gpus", "16", "--batch-size", "1"]
    for dist, shards in (("hsdp", 8), ("fsdp", 16)):
        args = train.get_args([*flags, "--dist", dist])
        model = train.build_model(args, 32000)
        n = sum(p.numel() for p in model.parameters())
        assert memory.memory_plan(args, model)["weights"] == 2 * n / shards, dist
    assert train.get_args([*flags, "--dist", "hsdp"]).shard_size == 8
    assert train.get_args([*flags, "--dist", "hsdp", "--shard-size", "4"]).shard_size == 4
