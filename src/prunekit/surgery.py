"""The surgery and its checks: torch-pruning removes a plan's channels, the pruned model must still run with
the dense model's output shapes and compute what the dense model computes with those channels zeroed, and
a snapshot undoes everything when it does not."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import UsageError
from .groups import Group


class SurgeryError(Exception):
    """Removing a group's channels broke the model; the caller undoes the surgery and names ``layer``."""

    def __init__(self, layer: str, reason: str):
        super().__init__(f"{layer}: {reason}")
        self.layer, self.reason = layer, reason


def apply_plan(DG: tp.DependencyGraph, groups: list[Group], plan: dict[str, torch.Tensor]) -> dict[str, int]:
    """Do the surgery: remove each group's planned channels through torch-pruning."""
    removed = {}
    for g in groups:
        mask = plan.get(g.root)
        if mask is None or not mask.any():
            continue
        if int(mask.sum()) >= g.channels:
            raise UsageError(f"the plan would remove every channel of {g.root}")
        idxs = torch.nonzero(mask).flatten().tolist()
        try:
            DG.get_pruning_group(g.module, g.handler, idxs).prune()
        except Exception as exc:
            raise SurgeryError(g.root, f"torch-pruning failed ({type(exc).__name__}: {exc})") from None
        removed[g.root] = len(idxs)
    return removed


class KeptChannels(dict):
    """For each conv or linear whose output channels a plan removes, the dense indices of those it keeps;
    ``inputs``: the same for each layer whose input channels (or flattened input features) it removes."""

    def __init__(self, outputs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]):
        super().__init__(outputs)
        self.inputs = inputs


def kept_channels(model: nn.Module, groups: list[Group], plan: dict[str, torch.Tensor]) -> KeptChannels:
    """The channels ``plan`` keeps, on both sides of every layer it touches (computed on the dense model,
    before the surgery)."""
    names = {m: n for n, m in model.named_modules()}
    removed: dict[tuple[nn.Module, bool], set[int]] = {}
    for g in groups:
        mask = plan.get(g.root)
        if mask is None or not mask.any():
            continue
        for (layer, is_out, root_idx), idxs in zip(g.members, g.layer_idxs, strict=True):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                removed.setdefault((layer, is_out), set()).update(idxs[mask[root_idx]].tolist())
    kept: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for (layer, is_out), gone in removed.items():
        if is_out:
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        else:
            width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        indices = torch.tensor([c for c in range(width) if c not in gone], dtype=torch.long)
        kept[0 if is_out else 1][names[layer]] = indices
    return KeptChannels(*kept)


def snapshot(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module's attributes, parameters and buffers: enough to undo a surgery exactly.

    torch-pruning assigns new tensors rather than editing the old ones in place, so holding references to
    the old parameter objects (not copies) restores the model, and a caller's optimizer still points at them.
    Buffers are also copied, since BatchNorm recalibration after a surgery updates them in place.
    """
    state = []
    for m in model.modules():
        attrs = {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}
        buffers = dict(m._buffers)
        copies = {k: v.clone() for k, v in buffers.items() if v is not None}
        state.append(
            (m, {"attrs": attrs, "params": dict(m._parameters), "buffers": buffers, "copies": copies})
        )
    return state


def restore(state: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo everything done to the modules since ``snapshot``."""
    for m, saved in state:
        for key in [k for k in vars(m) if k not in ("_parameters", "_buffers", "_modules")]:
            if key not in saved["attrs"]:
                delattr(m, key)
        vars(m).update(saved["attrs"])
        m._parameters.clear()
        m._parameters.update(saved["params"])
        m._buffers.clear()
        m._buffers.update(saved["buffers"])
        for k, copy in saved["copies"].items():
            m._buffers[k].data.copy_(copy)


def output_shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: output_shapes(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [output_shapes(v) for v in out]
    return type(out).__name__


@torch.no_grad()
def check_runs(model: nn.Module, example: torch.Tensor, expected: Any, layer: str) -> None:
    """The pruned model must run on the example and return outputs of the dense model's shapes."""
    try:
        got = output_shapes(model(example))
    except Exception as exc:
        raise SurgeryError(layer, f"the model no longer runs ({type(exc).__name__}: {exc})") from None
    if got != expected:
        raise SurgeryError(layer, f"the output shape changed from {expected} to {got}")


@contextlib.contextmanager
def _full_precision():
    """Disable TF32 on GPUs while comparing outputs: its 10-bit mantissa would blur the equivalence check."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# Norms that mix channels: removing a channel legitimately changes the others, so zeroing is no reference.
_CHANNEL_MIXING = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


@torch.no_grad()
def zeroed_reference(
    model: nn.Module, groups: list[Group], plan: dict[str, torch.Tensor], probe: torch.Tensor
) -> Any:
    """The dense model's output with the planned channels zeroed instead of removed.

    A correct surgery computes exactly this (a zero channel contributes nothing downstream), so comparing
    it with the pruned model's output catches couplings the dependency graph missed (channels padded or
    sliced in ``forward``) even when the pruned model still runs. None where no such reference exists.
    """
    if any(isinstance(m, _CHANNEL_MIXING) for m in model.modules()):
        return None
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        for g in groups:
            mask = plan.get(g.root)
            if mask is None or not mask.any():
                continue
            for (layer, is_out, root_idx), idxs in zip(g.members, g.layer_idxs, strict=True):
                if not is_out:
                    continue
                chans = idxs[mask[root_idx]]
                tensors = [getattr(layer, "weight", None), getattr(layer, "bias", None)]
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    tensors.append(layer.running_mean)  # so the channel leaves BatchNorm as exactly 0
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        saved.setdefault(id(t), (t, t.detach().clone()))
                        t.data[chans] = 0
        with _full_precision():
            return model(probe)
    finally:
        for t, original in saved.values():
            t.data.copy_(original)


def _same_outputs(expected: Any, got: Any) -> bool:
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return False
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        return bool(torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3 * scale + 1e-5))
    if isinstance(expected, (list, tuple)):
        return len(expected) == len(got) and all(
            _same_outputs(e, g) for e, g in zip(expected, got, strict=True)
        )
    if isinstance(expected, dict):
        return expected.keys() == got.keys() and all(_same_outputs(expected[k], got[k]) for k in expected)
    return True


def check_equivalent(model: nn.Module, probe: torch.Tensor, reference: Any, layer: str) -> None:
    """The pruned model must compute what the dense model computes with the removed channels zeroed."""
    if reference is None:
        return
    with torch.no_grad(), _full_precision():
        got = model(probe)
    if not _same_outputs(reference, got):
        raise SurgeryError(
            layer, "the pruned model computes something else than the dense model without those channels"
        )


def apply_checked(
    model: nn.Module,
    DG: tp.DependencyGraph,
    groups: list[Group],
    plan: dict[str, torch.Tensor],
    example: torch.Tensor,
    expected: Any,
    probe: torch.Tensor,
    label: str,
) -> dict[str, int]:
    """Apply ``plan``; a SurgeryError (naming ``label``) unless the model still runs with the dense model's
    output shapes and computes what the dense model computes with those channels zeroed."""
    reference = zeroed_reference(model, groups, plan, probe)
    removed = apply_plan(DG, groups, plan)
    check_runs(model, example, expected, label)
    check_equivalent(model, probe, reference, label)
    return removed
