"""Channel importance criteria as torch-pruning ``Importance`` objects (one score per channel of a group).

A group is every layer coupled to one set of channels (a conv, its BatchNorm, the next conv's inputs, and
for residual sums every conv writing to the sum). Each criterion scores the channels of the group's
*producing* layers: convs/linears whose output channels are removed (and BatchNorms, for ``bn`` and
``activation-post``). Scores of several producing layers are put on one scale by dividing each layer's
scores by their mean absolute value, then averaged per channel, so no single layer dominates a residual
group. A group with one producing layer keeps its raw ranking (the blog's exact choice).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch_pruning.pruner import function

from .errors import UsageError
from .modes import eval_mode

CRITERIA = ("activation", "activation-post", "l1", "l2", "group-l2", "refit", "bn", "taylor", "random")
# Network-wide pruning's criterion without images to score on: on a pretrained EfficientNet-Lite1 pruned 2x
# (global allocation, recovery, no fine-tuning) whole-group scores kept 51.40 % where producer filter norms
# kept 47.25 % and the re-fit score 23.45 %; on the CIFAR ResNet-18 the two norms tied within 0.3 point.
NETWORK_WIDE = "group-l2"
# ... and with them, under the default recovered scan: on the same EfficientNet-Lite1 few-shot transfer the
# re-fit score kept 69.25 % after fine-tuning against 65.30 % (three seeds); on the CIFAR ResNet-18 they tied,
# with and without fine-tuning (benchmarks/README.md: few-shot, recovery, allocation).
WITH_IMAGES = "refit"
NEEDS_CALIBRATION = {"activation", "activation-post", "refit", "taylor"}

_OUT_FNS = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_IN_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_BN_FN = function.prune_batchnorm_out_channels


class ChannelImportance(tp.importance.Importance):
    """Base class: subclasses score the output channels of one layer; this combines them over the group."""

    def layer_scores(self, layer: nn.Module, idxs: list[int], is_norm: bool) -> torch.Tensor | None:
        raise NotImplementedError

    def reader_scores(self, layer: nn.Module, idxs: list[int]) -> torch.Tensor | None:
        """Scores from a layer that *reads* the channels (their input side); producers only by default."""
        return None

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        root_channels = len(group[0].idxs)
        total = torch.zeros(root_channels, dtype=torch.float64)
        count = torch.zeros(root_channels, dtype=torch.float64)
        for item in group:
            dep, idxs = item.dep, item.idxs
            root_idxs = getattr(item, "root_idxs", None) or idxs
            if any(r is None for r in root_idxs):
                continue
            fn = dep.pruning_fn
            if fn in _OUT_FNS:
                scores = self.layer_scores(dep.layer, idxs, is_norm=False)
            elif fn == _BN_FN:
                scores = self.layer_scores(dep.layer, idxs, is_norm=True)
            elif fn in _IN_FNS:
                scores = self.reader_scores(dep.layer, idxs)
            else:
                continue
            if scores is None:
                continue
            scores = scores.double().flatten()
            scale = scores.abs().mean()
            if scale > 0:
                scores = scores / scale
            where = torch.tensor(root_idxs, dtype=torch.long)
            total.index_add_(0, where, scores)
            count.index_add_(0, where, torch.ones_like(scores))
        if count.sum() == 0:
            return None
        return (total / count.clamp_min(1)).float()


class FilterNormImportance(ChannelImportance):
    """``l1`` / ``l2``: the norm of each output filter (conv or linear weights, not BatchNorm)."""

    def __init__(self, p: int):
        self.p = p

    def layer_scores(self, layer, idxs, is_norm):
        if is_norm:
            return None
        norms = torch.linalg.vector_norm(layer.weight.detach().flatten(1).float(), ord=self.p, dim=1)
        return norms[idxs]


class GroupNormImportance(FilterNormImportance):
    """``group-l2``: the L2 norm of every weight the channel's removal deletes, over the whole group, as
    Torch-Pruning's group importance: producers' filters, BatchNorm scales and the readers' input columns,
    each layer's scores put on one scale by its mean."""

    def __init__(self):
        super().__init__(2)

    def layer_scores(self, layer, idxs, is_norm):
        if is_norm:
            return layer.weight.detach().abs()[idxs] if getattr(layer, "affine", False) else None
        return super().layer_scores(layer, idxs, is_norm)

    def reader_scores(self, layer, idxs):
        w = layer.weight.detach().float()
        if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # a depthwise conv reads each channel alone
            return None if layer.groups != layer.in_channels else w.flatten(1).norm(dim=1)[idxs]
        return w.transpose(0, 1).flatten(1).norm(dim=1)[idxs]


class BNScaleImportance(ChannelImportance):
    """``bn``: |gamma| of the BatchNorm after each channel (network slimming); filter L1 where there is none."""

    def __call__(self, group):
        has_bn = any(
            item.dep.pruning_fn == _BN_FN and getattr(item.dep.layer, "affine", False) for item in group
        )
        self._fallback = not has_bn
        return super().__call__(group)

    def layer_scores(self, layer, idxs, is_norm):
        if self._fallback:
            return None if is_norm else layer.weight.detach().flatten(1).abs().sum(1)[idxs]
        if is_norm and getattr(layer, "affine", False):
            return layer.weight.detach()[idxs].abs()
        return None


class RandomImportance(ChannelImportance):
    """``random``: the control; uniform scores from a seeded generator."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def layer_scores(self, layer, idxs, is_norm):
        return None if is_norm else torch.rand(len(idxs), generator=self.gen)


class TaylorImportance(ChannelImportance):
    """``taylor``: |sum of weight x gradient| per channel, the first-order loss change of removing it.

    Gradients must be accumulated beforehand (``accumulate_gradients``). On a BatchNorm the score uses
    gamma and beta, i.e. the channel's actual output; on a conv without one, its filter.
    """

    def layer_scores(self, layer, idxs, is_norm):
        if layer.weight.grad is None:
            return None
        w = layer.weight.detach()
        score = (w * layer.weight.grad).reshape(len(w), -1).sum(1)[idxs]  # 1-D for a BatchNorm's gamma
        if getattr(layer, "bias", None) is not None and layer.bias.grad is not None:
            score = score + (layer.bias.detach() * layer.bias.grad)[idxs]
        return score.abs()


class ActivationImportance(ChannelImportance):
    """``activation``: the blog's criterion, the mean of each conv's raw output over calibration images.

    ``post=True`` (``activation-post``) scores the mean of ReLU(BatchNorm(output)) instead: what the next
    layer actually receives. Call ``calibrate`` first.
    """

    def __init__(self, post: bool = False):
        self.post = post
        self.means: dict[nn.Module, torch.Tensor] = {}

    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        sums: dict[nn.Module, torch.Tensor] = {}
        counts: dict[nn.Module, int] = {}

        def hook(module, _inputs, output):
            out = output.float()
            if self.post or isinstance(module, nn.modules.batchnorm._BatchNorm):
                out = F.relu(out)
            dims = [0, *range(2, out.dim())]
            sums[module] = sums.get(module, 0) + out.sum(dim=dims).double()
            counts[module] = counts.get(module, 0) + out.numel() // out.shape[1]

        kinds = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
        with eval_mode(model, handles):
            for x in batches:
                model(x)
        self.means = {m: (sums[m] / counts[m]).float() for m in sums}

    def __call__(self, group):
        self._has_bn = self.post and any(item.dep.pruning_fn == _BN_FN for item in group)
        return super().__call__(group)

    def layer_scores(self, layer, idxs, is_norm):
        if layer not in self.means:
            return None
        if self._has_bn != is_norm:  # post-activation scores come from the BatchNorm when there is one
            return None
        return self.means[layer][idxs]


class RefitImportance(ChannelImportance):
    """``refit``: the output error removing a channel leaves in the layers that read it, after each of them
    is re-fitted on its other inputs (what recovery then does): the structured Optimal Brain Surgeon score
    (``removal.removal_errors``), each reader's scores put on one scale by their mean. Call
    ``calibrate`` first; a group no re-fittable layer reads is scored by its filters' L2 norm."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.errors: dict[nn.Module, torch.Tensor] = {}
        self._fallback = FilterNormImportance(2)

    def calibrate(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
        from .removal import removal_errors

        self.errors = removal_errors(model, torch.cat(list(batches)), self.seed)

    def __call__(self, group):
        scores = super().__call__(group)
        return scores if scores is not None else self._fallback(group)

    def layer_scores(self, layer, idxs, is_norm):
        return None

    def reader_scores(self, layer, idxs):
        errors = self.errors.get(layer)
        return None if errors is None else errors[idxs]


def make_importance(name: str, seed: int = 0) -> ChannelImportance:
    """The criterion named ``name`` (one of ``CRITERIA``)."""
    if name == "l1":
        return FilterNormImportance(1)
    if name == "l2":
        return FilterNormImportance(2)
    if name == "group-l2":
        return GroupNormImportance()
    if name == "refit":
        return RefitImportance(seed)
    if name == "bn":
        return BNScaleImportance()
    if name == "taylor":
        return TaylorImportance()
    if name == "random":
        return RandomImportance(seed)
    if name in ("activation", "activation-post"):
        return ActivationImportance(post=name == "activation-post")
    raise UsageError(f"unknown importance criterion '{name}'; choose one of {', '.join(CRITERIA)}")


def accumulate_gradients(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Sum cross-entropy gradients over labelled batches into ``.grad`` (for the Taylor criterion)."""
    was_training = model.training
    model.eval()  # BatchNorm statistics must not move while we only measure
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()
    model.train(was_training)
