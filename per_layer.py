"""
Per-layer updates: each parameter steps inside backward, from its own post-accumulate-grad hook, as
soon as its gradient is ready, and frees that gradient at once, so no full gradient buffer ever exists
(the paper's 7b recipe). Any optimizer works per parameter; AdamW8bit's non-finite skips are reconciled
once per FSDP2 unit and booked once per step.
"""
import torch

from optim import AdamW8bit, book_skips, nonfinite_flags


class PerLayerOptimizer:
    """One optimizer per parameter, stepped from a post-accumulate-grad hook that then frees the
    gradient, so no full gradient buffer ever exists. Use it where a torch optimizer goes:

        opt = PerLayerOptimizer(model.named_parameters(), lambda ps: AdamW8bit(ps, lr=lr), grad_accum_steps=k)
        for g in opt.param_groups: g["lr"] = schedule(step)   # BEFORE backward: the step runs inside it
        for micro in range(k): (loss / k).backward()           # the k-th backward steps every parameter
        opt.step()                                             # checks that it happened; updates nothing
        opt.zero_grad(set_to_none=True)                        # harmless: the gradients are gone already

    param_groups lists the inner optimizers' own group dicts, so one schedule writing g["lr"]
    drives every per-parameter optimizer, and each uses exactly the schedule's LR of that step.
    Gradient accumulation: a parameter's hook steps on every k-th backward and lets the gradient
    accumulate in between, which keeps a full gradient buffer alive across the micro-steps: with
    k > 1 per-layer updates save no memory over a global optimizer (they stay correct).
    Global grad-norm clipping needs every gradient at once and cannot work: clip_grad_norm_ raises.
    Under DDP the hooks would fire before the all-reduce: do not combine them. Under FSDP2 they
    fire on this rank's reduced shard, which AdamW8bit updates as it is.

    units: lists of parameter names whose gradients arrive together, FSDP2's units (one reduce-
    scatter each, whose hooks then run back to back). A unit's parameters step when its last one
    arrives, after one all-reduce of the whole unit's non-finite flags (nonfinite_flags): a
    collective per unit (~33 per step at 7b), not per parameter (~740), each launched on FSDP2's
    reduce-scatter stream. Without units every parameter steps at once in its own hook.
    """

    def __init__(self, params, make_optimizer, grad_accum_steps=1, units=None):
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(params)]
        self.params = {name: p for name, p in named if p.requires_grad}
        dist = torch.distributed
        if (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
                and not all(hasattr(p, "to_local") for p in self.params.values())):  # plain tensors on many ranks: DDP
            raise RuntimeError("per-layer updates do not work under DDP: the hooks fire before the gradient all-reduce, "
                               "so each rank would step on its own gradient. Use FSDP2 (fully_shard) or a global optimizer.")
        self.optimizers = {name: make_optimizer([p]) for name, p in self.params.items()}
        for opt in self.optimizers.values():  # AdamW8bit's skip counts: booked once per step, in step()
            opt.book_skips_in_step = False
        self.book_skips_in_step = True  # False: the caller books them (train.py, with the step's loss)
        self.grad_accum_steps = grad_accum_steps
        self._of = {p: self.optimizers[name] for name, p in self.params.items()}
        self._backwards = {p: 0 for p in self._of}  # backward passes accumulated since p's last step
        units = [[n for n in unit if n in self.params] for unit in units or []]
        in_units = {n for unit in units for n in unit}
        units = [unit for unit in units if unit] + [[n] for n in self.params if n not in in_units]
        self._unit = {}  # parameter -> the list of its unit's parameters
        for unit in units:
            members = [self.params[n] for n in unit]
            for p in members:
                self._unit[p] = members
        self._ready = {}  # id of a unit -> its parameters whose gradient is complete, not yet stepped
        self._stepped = 0  # parameters stepped since the last step() call
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._of]

    @property
    def param_groups(self):
        # Looked up on every access: an inner load_state_dict replaces its group dicts, and a
        # list captured once would go stale (the schedule would stop reaching the optimizers).
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @torch.no_grad()
    def _hook(self, p):
        self._backwards[p] += 1
        if self._backwards[p] < self.grad_accum_steps:
            return  # not the last micro-step: leave the gradient to accumulate
        self._backwards[p] = 0
        unit = self._unit[p]
        ready = self._ready.setdefault(id(unit), [])
        ready.append(p)
        if len(ready) == len(unit):
            self._step_unit(self._ready.pop(id(unit)))

    def _step_unit(self, params):
        """Step these parameters, with one reconciliation of their non-finite flags, and free their gradients."""
        eight_bit = [p for p in params if isinstance(self._of[p], AdamW8bit)]
        flags = dict(zip(eight_bit, nonfinite_flags([p.grad for p in eight_bit])))
        for p in params:
            self._of[p].step(nonfinite=[flags[p]]) if p in flags else self._of[p].step()
            p.grad = None
        self._stepped += len(params)

    def step(self):
        """The updates already ran inside backward; raise if they did not all complete."""
        partial = [name for name, p in self.params.items() if self._backwards[p]]
        if partial:
            raise RuntimeError(f"{len(partial)} parameters (first: {partial[0]}) saw a number of backward passes that "
                               f"is not a multiple of grad_accum_steps={self.grad_accum_steps}; call step() only "
                               f"after the last micro-step")
        for unit in list(self._ready.values()):  # a unit some of whose parameters got no gradient
            self._step_unit(unit)  # (the same on every rank: FSDP2 reduces the same parameters everywhere)
        self._ready.clear()
        if self._stepped == 0:
            raise RuntimeError("no parameter was updated since the last step(): no backward ran, or remove() was called")
        self._stepped = 0
        if self.book_skips_in_step:
            book_skips(list(self.optimizers.values()))

    @property
    def skipped(self):
        """Per-parameter updates skipped for a non-finite gradient (AdamW8bit's count; 0 for others)."""
        return sum(getattr(opt, "skipped", 0) for opt in self.optimizers.values())

    def zero_grad(self, set_to_none=True):
        for p in self.params.values():
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def clip_grad_norm_(self, max_norm):
        raise RuntimeError(f"global grad-norm clipping (max_norm={max_norm}) cannot work with per-layer updates: each "
                           f"gradient is used and freed during backward, before the global norm is known. Turn off "
                           f"clipping or per-layer updates.")

    def state_dict(self):
        return {"optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state_dict):
        saved = state_dict["optimizers"]
        if saved.keys() != self.optimizers.keys():
            raise ValueError(f"checkpoint holds optimizers for {len(saved)} parameters, this model has "
                             f"{len(self.optimizers)} (or their names differ)")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(saved[name])

    def remove(self):
        """Unregister the hooks: backward no longer steps anything."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
