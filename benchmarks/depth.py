"""Depth against width at 3x fewer MACs: whole residual blocks dropped from the parent before prunekit's
defaults prune the rest, then the ``full`` recipe's 10 epochs (a diagnostic for issue 15's 3x goal:
prunekit itself never drops a block).

    python benchmarks/depth.py runs/parent1207/model.safetensors --blocks none,layer2.1+layer4.1 --seeds 0,1 --commit

A row (``--blocks``: ``none``, or blocks joined by ``+``) replaces each named block by an identity (its
residual branch removed; BatchNorm statistics then re-estimated on the 512 calibration images), prunes the
rest with ``prunekit.prune(model, example, target_macs=..., calibration=...)`` (the defaults: sensitivity
scan, ``refit`` scores, recovery) to a third of the *dense* parent's MACs, and fine-tunes it in this process
(``train.fit`` with the ``full`` recipe and the row's seed: a model with dropped blocks has no checkpoint
format, so an interrupted row starts again). ``none`` is the same pipeline without dropping, the row to
compare with. The token ``dead-taps`` (``--blocks dead-taps``, or ``layer2.1+dead-taps``) first replaces each
conv whose outer kernel taps read only zero padding at the parent's input size by the conv of its live taps
(at 32 px, layer4's 3x3 convs run on 1x1 maps: three become 1x1 and layer4.0.conv1 2x2), which leaves the
outputs as they were and the MACs 19 % lower, so that the same target could leave the rest wider (prunekit
does not do this either; at 3x it freed nothing: the plan cuts layer4 to its floor anyway). ``--distill``
fine-tunes with the parent as teacher and ``--recipe FIELD=VALUE,...`` changes
the recipe, as in ``finetune_lr.py`` (rows named alike: ``layer2.1+kd+label_smoothing=0``); ``--held-out``
prunes and fine-tunes on the first 4,500 training images a class and also scores the other 500 (for a
parent trained without them: ``prunekit train ... --subset 4500``), to choose between rows without the test
split. Rows are resumable and appended to ``results/depth.json`` (``--commit``: each committed as it
lands), each with the accuracy after dropping, after pruning and after fine-tuning, the MACs and the widths.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from common import (
    FULL_ARCHIVE,
    RESULTS,
    TARGETS,
    checkpoint_digest,
    machine,
    read_results,
    record_parent,
    require,
    save_row,
)
from finetune_lr import HELD_OUT_FROM, Tuning, changed_recipe, held_out_bundle, recipe_changes
from prunekit import core, train
from prunekit.batchnorm import recalibrate_batchnorm
from prunekit.checkpoint import load_checkpoint
from prunekit.commands.rundir import load_data_for
from prunekit.measure import count_macs

RESULT = RESULTS / "depth.json"
CALIBRATION_IMAGES = 512  # prunekit's default count of calibration images
NONE = "none"
DEAD_TAPS = "dead-taps"  # a row token: trim the kernel taps that only ever read zero padding


def live_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> range:
    """The taps of one kernel axis that read an input position (not padding) for some output position."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    live = [
        i
        for i in range(kernel)
        if any(0 <= o * stride - padding + i * dilation < size for o in range(outputs))
    ]
    return range(live[0], live[-1] + 1)


@torch.no_grad()
def trim_dead_taps(model: nn.Module, size: int) -> dict[str, list[int]]:
    """Replace each conv whose outer kernel taps read only zero padding at ``size`` px (the 3x3 convs of
    this ResNet-18's layer4, at 1x1 maps from 32-px images) by the conv of its live taps: the same outputs,
    fewer MACs. Returns the new kernel sizes by conv name; each replacement is checked on a random input."""
    shapes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a: shapes.setdefault(m, tuple(a[0].shape[2:])) and None)
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    trimmed = {}
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv not in shapes:
            continue
        axes = [
            live_taps(shapes[conv][d], conv.kernel_size[d], conv.stride[d], conv.padding[d], conv.dilation[d])
            for d in (0, 1)
        ]
        if all(len(r) == k for r, k in zip(axes, conv.kernel_size, strict=True)):
            continue
        new = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            (len(axes[0]), len(axes[1])),
            stride=conv.stride,
            padding=(conv.padding[0] - axes[0].start, conv.padding[1] - axes[1].start),
            dilation=conv.dilation,
            bias=conv.bias is not None,
        )
        new.weight.copy_(conv.weight[:, :, axes[0].start : axes[0].stop, axes[1].start : axes[1].stop])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
        x = torch.randn(2, conv.in_channels, *shapes[conv])
        if not torch.allclose(new(x), conv(x), atol=1e-4, rtol=1e-4):
            raise SystemExit(f"{name}: trimming its dead taps changed its outputs")
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        trimmed[name] = list(new.kernel_size)
    return trimmed


def drop_blocks(model: nn.Module, blocks: list[str], calibration: list[torch.Tensor]) -> None:
    """Replace each named block of a stage (``layer2.1``) by an identity, then re-estimate BatchNorm."""
    for name in blocks:
        stage, _, index = name.rpartition(".")
        container = model.get_submodule(stage)
        if not isinstance(container, nn.Sequential) or not index.isdigit():
            raise SystemExit(f"--blocks: {name} is not a block of a stage (such as layer2.1)")
        container[int(index)] = nn.Identity()
    if blocks:
        recalibrate_batchnorm(model, calibration)


def run_row(parent: Path, row: str, seed: int, tuning: Tuning) -> dict:
    """Drop ``row``'s blocks, prune to a third of the dense MACs by the defaults, fine-tune 10 epochs."""
    ckpt = load_checkpoint(parent)
    subset = HELD_OUT_FROM if tuning.held_out else None
    bundle = load_data_for(ckpt.meta, data=str(FULL_ARCHIVE), subset=subset)
    test = bundle.loader("test", 500)
    calibration = bundle.sample_batches(CALIBRATION_IMAGES, 64, seed=0)
    size, model = ckpt.meta["input_size"], ckpt.model
    dense_macs = count_macs(model, size)
    tokens = [] if row == NONE else row.split("+")
    blocks = [b for b in tokens if b != DEAD_TAPS]
    trimmed = trim_dead_taps(model, size) if DEAD_TAPS in tokens else {}
    drop_blocks(model, blocks, [x for x, _ in calibration])
    entry = {"blocks": blocks, "seed": seed, "dropped": core.evaluate(model, test)["accuracy"]}
    if trimmed:
        entry["trimmed"] = {"kernels": trimmed, "macs": count_macs(model, size) / dense_macs}
    start = time.perf_counter()
    target = dense_macs * TARGETS["3x"] / count_macs(model, size)
    core.prune(model, torch.randn(1, 3, size, size), target_macs=target, calibration=calibration)
    entry["prune_s"] = round(time.perf_counter() - start, 1)
    entry["pruned"] = core.evaluate(model, test)["accuracy"]
    entry["macs"] = count_macs(model, size) / dense_macs
    entry["widths"] = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    cfg = replace(changed_recipe(tuning.recipe), seed=seed)
    teacher = load_checkpoint(parent).model if tuning.distill else None
    start = time.perf_counter()
    entry["test"] = train.fit(model, bundle, cfg, teacher=teacher).test["accuracy"]
    entry["train_seconds"] = round(time.perf_counter() - start, 1)
    if tuning.held_out:
        held_out = held_out_bundle(ckpt.meta).loader("test", 500)
        entry["held_out"] = core.evaluate(model, held_out)["accuracy"]
    return {**entry, "torch_threads": torch.get_num_threads(), "date": machine()["date"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parent", type=Path)
    parser.add_argument(
        "--blocks", default=NONE, help="rows: none, or blocks joined by + (layer2.1+layer4.1)"
    )
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--held-out", action="store_true")
    parser.add_argument("--distill", action="store_true", help="the parent as teacher")
    parser.add_argument("--recipe", help="FIELD=VALUE,...: changes to the `full` recipe (rows +FIELD=VALUE)")
    parser.add_argument("--commit", action="store_true")
    args = parser.parse_args()
    require(FULL_ARCHIVE)
    tuning = Tuning(args.held_out, args.distill, recipe=recipe_changes(args.recipe))
    digest = checkpoint_digest(args.parent)
    # refused now rather than after the first row
    record_parent(read_results(RESULT, "rows"), args.parent, digest)
    for row in args.blocks.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            at = f"{args.parent.parent.name}-{row}{tuning.suffix()}/seed{seed}{tuning.scope()}"
            if at in read_results(RESULT, "rows")["rows"]:
                continue
            entry = run_row(args.parent, row, seed, tuning)
            commit = f"bench: depth {at}" if args.commit else None
            save_row(RESULT, at, entry, commit, (args.parent, digest))
            print(json.dumps({at: {k: v for k, v in entry.items() if k != "widths"}}), flush=True)


if __name__ == "__main__":
    main()
