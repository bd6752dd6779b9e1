"""
Reading the token streams that data/prepare.py writes (train.bin, val.bin, meta.json) for train.py:
random training windows that are a pure function of (seed, step, micro-step), split across ranks,
and a fixed set of validation windows spread over the whole val split. Every problem with the files is
a DataError saying what to do.
"""
import json
import os

import numpy as np
import torch
import torch.distributed as dist


class DataError(Exception):
    """A problem with the prepared files; the message says what to do."""


class TokenData:
    """One split of a packed token stream. Batch (step, micro) is a pure function of the seed, so
    a resumed run sees exactly the windows the uninterrupted one would have seen. With N ranks,
    rank r takes rows [r*B, (r+1)*B) of the same global batch: no overlap between ranks, and the
    same windows as one process with batch N*B."""

    def __init__(self, folder, split, meta):
        path = os.path.join(folder, f"{split}.bin")
        expected = meta[f"{split}_tokens"]
        if expected == 0:
            raise DataError(f"the {split} split of {folder} is empty: prepare more data (the val split takes ~2% "
                            f"of the documents, chosen by a hash of each one).")
        size = os.path.getsize(path) if os.path.exists(path) else -1
        if size != expected * np.dtype(meta["dtype"]).itemsize:
            raise DataError(f"{path} is missing or has the wrong size ({size} bytes; meta.json says {expected} "
                            f"{meta['dtype']} tokens): the data is incomplete or corrupt. Delete {folder} and "
                            f"prepare it again (python data/prepare.py ...).")
        self.tokens = np.memmap(path, dtype=meta["dtype"], mode="r")

    def random_batch(self, step, micro, batch_size, seq_len, seed, device, rank=0, world=1):
        rng = np.random.default_rng([seed, step, micro])  # independent stream per (seed, step, micro)
        starts = rng.integers(0, len(self.tokens) - seq_len, size=batch_size * world)  # window: seq_len + 1
        return self._windows(starts[rank * batch_size:(rank + 1) * batch_size], seq_len, device)

    def eval_starts(self, n_tokens, seq_len, world=1):
        """The val windows' start positions: n_tokens // seq_len windows of seq_len + 1 tokens spread evenly
        from the split's head to its tail (a val file is written in document order: its first tokens are a
        few documents, not the split). The same for every eval, run, method and rank layout; a multiple of
        world, so every rank does equal work. A split shorter than that is read whole, window after window."""
        last = len(self.tokens) - seq_len - 1  # the last start with a whole window (seq_len inputs + 1 target)
        n = max(world, min(max(1, n_tokens // seq_len), last // seq_len + 1) // world * world)
        if n == 1:
            return [0]
        return [i * last // (n - 1) for i in range(n)]  # first at 0, last at `last`, evenly between

    def eval_plan(self, n_tokens, seq_len, world=1):
        """What an eval reads, for the log: windows, target tokens, and the share of the split they read and span."""
        starts = self.eval_starts(n_tokens, seq_len, world)
        return dict(eval_windows=len(starts), eval_target_tokens=len(starts) * seq_len, val_split_tokens=len(self.tokens),
                    eval_share_read=round(len(starts) * seq_len / len(self.tokens), 4),
                    eval_share_spanned=round((starts[-1] + seq_len + 1 - starts[0]) / len(self.tokens), 4))

    def eval_batches(self, n_tokens, batch_size, seq_len, device, rank=0, world=1):
        """The eval_starts windows, batch_size at a time; rank r takes windows r, r + N, ..."""
        starts = self.eval_starts(n_tokens, seq_len, world)[rank::world]
        for i in range(0, len(starts), batch_size):
            yield self._windows(starts[i:i + batch_size], seq_len, device)

    def batches(self, step, grad_accum, batch_size, seq_len, seed, device, rank=0, world=1):
        """random_batch(step, micro) for every micro-step from `step` on, in order, one batch ahead:
        batch i + 1 is read and its copy to the device started before batch i is handed out."""
        ahead = self.random_batch(step, 0, batch_size, seq_len, seed, device, rank, world)
        while True:
            for micro in range(grad_accum):
                following = (step, micro + 1) if micro + 1 < grad_accum else (step + 1, 0)
                current, ahead = ahead, self.random_batch(*following, batch_size, seq_len, seed, device, rank, world)
                yield current
            step += 1

    def _windows(self, starts, seq_len, device):
        rows = np.stack([self.tokens[s:s + seq_len + 1].astype(np.int64) for s in starts])
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())  # (B, T) each
        if torch.device(device).type == "cuda":  # a copy from pageable memory would wait for the GPU to
            x, y = x.pin_memory(), y.pin_memory()  # drain (a host sync); from pinned memory it runs async
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # inputs, targets


def load_data(args, rank, default_folder):
    """-> (meta, train split, val split, None), or (None, None, None, what is wrong and what to do)
    on a rank that cannot read the data: train.py then exits on every rank together, as one that
    exited alone would leave the others waiting in a collective. The offline default is prepared on
    first use (by rank 0)."""
    meta_path = os.path.join(args.data, "meta.json")
    default = os.path.abspath(args.data) == os.path.abspath(default_folder)
    if not os.path.exists(meta_path) and default and rank == 0:
        print(f"no data at {args.data}: preparing the offline default (Python's standard library source)")
        from data.prepare import prepare_stdlib
        prepare_stdlib(args.data)
    if dist.is_initialized():
        dist.barrier()  # other ranks wait for rank 0's preparation
    try:
        return (*open_data(args.data, meta_path, args.seq_len, default), None)
    except DataError as e:
        return None, None, None, str(e)


def open_data(folder, meta_path, seq_len, default):
    if not os.path.exists(meta_path):
        raise DataError(f"no prepared data at {folder} (no meta.json). Prepare it with `python data/prepare.py ...`"
                        + ("." if default else ", or leave out --data to use the offline default."))
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {meta_path} ({e}): delete {folder} and prepare it again.")
    train, val = TokenData(folder, "train", meta), TokenData(folder, "val", meta)
    if len(train.tokens) <= seq_len + 1 or len(val.tokens) <= seq_len + 1:
        raise DataError(f"the data at {folder} is shorter than one sequence of --seq-len {seq_len} tokens: pass a "
                        f"smaller --seq-len or prepare more data.")
    return meta, train, val
