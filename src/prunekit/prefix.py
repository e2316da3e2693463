"""Run a model from a cached intermediate output, skipping the modules before it.

A sensitivity scan prunes one group at a time; everything the model computes before that group is the same
for every try, so it is computed once (the output of a *cut*: a module every later layer depends on only
through its output) and the modules before the cut are stubbed out. Which modules are cuts is not guessed
from the code: each candidate is checked once against the whole model's output, and one that does not
reproduce it is not used.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from .modes import eval_mode


@dataclass
class Call:
    """When a module ran during one forward pass: its first entry, last exit and how often it was called."""

    start: int
    end: int
    count: int


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the cut's output is captured."""


def trace_calls(
    model: nn.Module, example: torch.Tensor, durations: list[tuple[int, float]] | None = None
) -> dict[str, Call]:
    """Entry/exit order of every named submodule in one forward pass of ``example``; with ``durations``,
    each call of a module without children is appended to it as (the clock at its entry, seconds taken)."""
    clock, calls, handles, entered = itertools.count(), {}, [], {}

    def enter(name: str):
        def hook(module, args):
            tick = next(clock)
            if name in calls:
                calls[name].count += 1
            else:
                calls[name] = Call(tick, -1, 1)
            entered[name] = (tick, time.perf_counter())

        return hook

    def leave(name: str, leaf: bool):
        def hook(module, args, output):
            calls[name].end = next(clock)
            if leaf and durations is not None:
                tick, began = entered[name]
                durations.append((tick, time.perf_counter() - began))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave(name, next(module.children(), None) is None)))
    with eval_mode(model, handles), torch.no_grad():
        model(example)
    return calls


def first_call(calls: dict[str, Call], members: set[str]) -> int:
    """The call index at which the first of ``members`` runs (0 when none ran)."""
    starts = [calls[m].start for m in members if m in calls]
    return min(starts) if starts else 0


def candidate_cuts(model: nn.Module, calls: dict[str, Call], before: int, limit: int = 4) -> list[str]:
    """Up to ``limit`` modules that finish before call index ``before``, latest first: children of the
    model, of a Sequential or of a ModuleList (blocks a forward loops over, as EfficientNet's), called once
    (the places a chain of layers can be cut; ``verified`` checks each)."""
    modules = dict(model.named_modules())
    chained = []
    for name, call in calls.items():
        parent = name.rpartition(".")[0]
        in_chain = parent == "" or isinstance(modules.get(parent), (nn.Sequential, nn.ModuleList))
        if in_chain and call.count == 1 and call.end < before:
            chained.append((call.end, name))
    return [name for _, name in sorted(chained, reverse=True)[:limit]]


def stubbed(calls: dict[str, Call], cut: str) -> list[str] | None:
    """The outermost modules that run before ``cut`` (skipped when running from it), or None when one of
    them also runs later (skipping it would change the rest)."""
    start = calls[cut].start
    before = [n for n, c in calls.items() if c.end < start and not n.startswith(cut + ".")]
    outer = [n for n in before if not any(n.startswith(o + ".") for o in before if o != n)]
    if any(calls[n].count > 1 for n in outer):
        return None
    return outer


class _Holder:
    value: torch.Tensor | None = None


@contextmanager
def running_from(model: nn.Module, cut: str, skipped: Sequence[str]) -> Iterator[_Holder]:
    """Within the block ``model(x)`` skips the ``skipped`` modules (they pass their input on) and takes the
    cut's output from ``holder.value`` instead of computing it; set it before each call."""
    holder = _Holder()
    modules = dict(model.named_modules())

    def passthrough(*args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))

    def cached(*args, **kwargs):
        return holder.value

    patched = [modules[n] for n in skipped] + [modules[cut]]
    try:
        for module in patched[:-1]:
            module.forward = passthrough
        modules[cut].forward = cached
        yield holder
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


@dataclass
class Start:
    """Where a forward pass starts: ``cut``'s output for the pass's images (``value``), the ``skipped`` modules
    before it passing their input on (``running_from``)."""

    cut: str
    skipped: list[str]
    value: torch.Tensor

    @property
    def leaves(self) -> set[str]:
        """The modules a tracer must keep whole for their patched forwards to take effect."""
        return {self.cut, *self.skipped}

    def first(self, n: int) -> Start:
        return Start(self.cut, self.skipped, self.value[:n])


@contextmanager
def started(model: nn.Module, start: Start | None) -> Iterator[None]:
    """Within the block ``model(x)`` runs from ``start`` (from its input where None)."""
    if start is None:
        yield
        return
    with running_from(model, start.cut, start.skipped) as holder:
        holder.value = start.value
        yield


def capture(model: nn.Module, cut: str, x: torch.Tensor) -> torch.Tensor:
    """The cut's output for ``x`` (the forward pass stops there)."""
    box: list[torch.Tensor] = []

    def hook(module, args, output):
        box.append(output)
        raise _Stop

    handle = dict(model.named_modules())[cut].register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box or not isinstance(box[0], torch.Tensor):
        raise TypeError(f"{cut} does not return one tensor")
    return box[0]


def verified(model: nn.Module, calls: dict[str, Call], cut: str, x: torch.Tensor) -> list[str] | None:
    """The modules to skip when running from ``cut``, if doing so reproduces ``model``'s output on ``x``
    (eval mode, full precision); None when it does not or cannot."""
    skipped = stubbed(calls, cut)
    if skipped is None:
        return None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(x)
            try:
                value = capture(model, cut, x)
                with running_from(model, cut, skipped) as holder:
                    holder.value = value
                    got = model(x)
            except Exception:  # a cut the rest of the model cannot run from (a shape, a tuple)
                return None
    finally:
        model.train(was_training)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return None
    scale = want.abs().max().clamp_min(1e-6)
    return skipped if bool(((got - want).abs().max() / scale) < 1e-4) else None
