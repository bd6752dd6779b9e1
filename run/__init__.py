"""
The run around the step: flags and their checks, the run folder (checkpoints, the log, the lock, resume,
consolidation), ranks (DDP, FSDP2, HSDP), the memory plan and check, signals, and the tokenizer files an export
writes. You need none of this to understand SLTrain: the core (model.py, sltrain.py, kernels.py, optim.py,
train.py, data/loader.py) is the method; this folder is what makes a run of it safe to start, stop and
continue. Nothing in the core imports it but train.py.

    flags.py        train.py's flags and their checks (--help)
    session.py      around the loop: the out-dir's lock, the log, the clock, Ctrl-C and SIGTERM, the closing lines
    checkpoint.py   writing, resuming and reading a run's folder; `torchrun -m run.checkpoint` gathers shards
    parallel.py     everything that knows about ranks: torchrun, DDP, FSDP2
    memory.py       the --dry-run memory plan and the check before a run starts
    hf_tokenizer.py the tokenizer files export.py writes
"""
