"""
Evaluate a run's checkpoint without training: validation loss and perplexity.

    python eval.py --out-dir out/tiny-sltrain                       # on the run's own val split
    python eval.py --out-dir out/60m-sltrain --data data/c4 --eval-tokens 10000000

The model comes from run/checkpoint.load_model (any method, single-file or sharded checkpoint); the
windows and the loss are train.py's own (model.evaluate on data.loader's fixed val windows), so
the figure equals the eval record the run logged at that step with the same --eval-tokens and
device (on a CPU it evaluates in fp32, where a GPU run logged bf16 compute).
"""
import argparse
import os
import sys

import torch

from data.loader import load_data
from model import autocast, evaluate, perplexity
from run.checkpoint import load_model, load_tokenizer
from run.flags import DEFAULT_DATA, devices


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", help="the run's folder (train.py's --out-dir)")
    p.add_argument("--data", help="folder made by data/prepare.py (default: the run's own data)")
    p.add_argument("--eval-tokens", type=int, help="validation tokens (default: the run's --eval-tokens)")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: the run's --batch-size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="autocast compute dtype (default: the run's)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line: no usage block
    args = p.parse_args(argv)
    if args.out_dir is None:
        p.error("--out-dir is required: the folder of a run train.py wrote")
    for ok, flag, rule in (  # (holds?, the flag as typed, what a valid value is), as train.py checks its own
            (args.eval_tokens is None or args.eval_tokens >= 1, f"--eval-tokens {args.eval_tokens}", "must be >= 1"),
            (args.batch_size is None or args.batch_size >= 1, f"--batch-size {args.batch_size}", "must be >= 1"),
            (args.data is None or os.path.isdir(args.data), f"--data {args.data}", "must be a folder data/prepare.py "
             "wrote (train.bin, val.bin, meta.json)"),
            (args.device in devices(), f"--device {args.device}", f"must be one of: {', '.join(devices())}")):
        if not ok:
            p.error(f"{flag}: {rule}")

    model = load_model(args.out_dir, args.device)
    run = argparse.Namespace(**model.train_config)
    # the run's flags, with this command's choices on top: what load_data and eval_batches read
    run.device, run.dist = args.device, "none"
    run.dtype = args.dtype or ("float32" if args.device == "cpu" else run.dtype)
    run.data = args.data or run.data
    run.eval_tokens = args.eval_tokens or run.eval_tokens
    run.batch_size = args.batch_size or run.batch_size
    meta, _, val, error = load_data(run, 0, DEFAULT_DATA)
    if error:
        sys.exit(f"error: {error}")
    tokenizer = load_tokenizer(args.out_dir, model.train_config).name
    if meta.get("tokenizer") != tokenizer or meta["vocab_size"] > model.cfg.vocab_size:
        sys.exit(f"error: {run.data} is tokenized with {meta.get('tokenizer')!r} (vocab {meta['vocab_size']}), the "
                 f"run with {tokenizer!r} (vocab {model.cfg.vocab_size}): evaluate on data prepared the same way")

    batches = val.eval_batches(run.eval_tokens, run.batch_size, run.seq_len, args.device)
    loss_sum, n_tokens = evaluate(model, batches, autocast(args.device, getattr(torch, run.dtype)), args.device)
    loss = (loss_sum / n_tokens).item()  # train.py's validation_loss in one process
    plan = val.eval_plan(run.eval_tokens, run.seq_len)
    print(f"{model.checkpoint}: val loss {loss:.4f} | val ppl {perplexity(loss):.2f} | {n_tokens:,} tokens of "
          f"{run.data} in {plan['eval_windows']} windows of {run.seq_len} spread over its val split "
          f"({plan['eval_share_read']:.0%} of it), {run.dtype}")
    return loss


if __name__ == "__main__":
    main()
