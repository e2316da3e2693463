"""Every user-settable option, declared once: its type, allowed values, check and help.

The command-line parsers, the YAML config of ``prunekit run``, ``TrainConfig`` and the Python API all
validate through this table, so a check cannot exist in one place and be missing in another.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError, arg

Check = Callable[[Any], str | None]  # returns what is wrong with a value, or None


@dataclass(frozen=True)
class Option:
    """One option: ``kind`` is int, float, str, bool or list (of str); ``check`` refines the kind."""

    name: str
    kind: type
    help: str = ""
    choices: tuple[str, ...] | None = None
    check: Check | None = None
    nullable: bool = True  # None means "use the default"
    choices_from: str | None = None  # "module:NAME" in prunekit holding the choices, read when first needed

    def allowed(self) -> tuple[str, ...] | None:
        """The values this option takes (``choices``, or the tuple ``choices_from`` names), None if any."""
        if self.choices_from is None:
            return self.choices
        import importlib

        module, name = self.choices_from.split(":")
        return tuple(getattr(importlib.import_module(f"prunekit.{module}"), name))

    def validate(self, value: Any) -> Any:
        """``value`` if it is valid for this option (ints accepted for floats), else a UsageError."""
        if value is None:
            if self.nullable:
                return None
            raise UsageError(f"{arg(self.name)} needs a value")
        if not _is_kind(value, self.kind):
            raise UsageError(f"{arg(self.name)} must be {_KIND_NAMES[self.kind]}, got {value!r}")
        if self.kind is list:
            for item in value:
                if not isinstance(item, str) or not item:
                    raise UsageError(f"{arg(self.name)} must be a list of names, got {item!r} in it")
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise UsageError(f"{arg(self.name)} must be one of {', '.join(allowed)}, got {value!r}")
        problem = self.check(value) if self.check else None
        if problem:
            raise UsageError(f"{arg(self.name)} {problem}, got {value!r}")
        return float(value) if self.kind is float else value


_KIND_NAMES = {
    int: "a whole number",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
}


def _is_kind(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# ---------------------------------------------------------------- checks


def _finite(v: float) -> str | None:
    return None if math.isfinite(v) else "must be a finite number"


def at_least(low: float) -> Check:
    return lambda v: _finite(v) or (None if v >= low else f"must be at least {low:g}")


def positive(v: float) -> str | None:
    return _finite(v) or (None if v > 0 else "must be positive")


def fraction_open(v: float) -> str | None:
    """Strictly between 0 and 1: a ratio of channels or of a budget."""
    return _finite(v) or (None if 0 < v < 1 else "must be between 0 and 1 (exclusive)")


def fraction_closed(v: float) -> str | None:
    return _finite(v) or (None if 0 <= v <= 1 else "must be between 0 and 1")


def fraction_below_one(v: float) -> str | None:
    return _finite(v) or (None if 0 <= v < 1 else "must be at least 0 and below 1")


def nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def device_name(v: str) -> str | None:
    import torch

    if v == "auto":
        return None
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return "must be auto, cpu, cuda or cuda:N"
    return None


# ---------------------------------------------------------------- the table

_TABLE = [
    Option("model", str, "torchvision name, resnet18-cifar, or timm:NAME", check=nonempty),
    Option(
        "data",
        str,
        "cifar10 | synthetic | PATH (image folder, .tar.gz/.zip of one, cifar-10-python.tar.gz)",
        check=nonempty,
    ),
    Option("data_dir", str, "where --data cifar10 is downloaded (default: user cache)", check=nonempty),
    Option("subset", int, "keep N training images per class", check=at_least(1)),
    Option(
        "weights", str, "pretrained weights: a weight name, 'pretrained' (timm) or a file", check=nonempty
    ),
    Option("image_size", int, "model input size in pixels", check=at_least(8)),
    Option("val_split", float, "fraction of train/ held out when there is no test/", check=fraction_open),
    Option("epochs", int, "training epochs", check=at_least(1)),
    Option("batch_size", int, "images per step", check=at_least(1)),
    Option("optimizer", str, choices=("sgd", "adam", "adamw")),
    Option("lr", float, "peak learning rate", check=positive),
    Option("momentum", float, check=fraction_below_one),
    Option("weight_decay", float, check=at_least(0)),
    Option("schedule", str, choices=("cosine", "onecycle", "constant")),
    Option("warmup_epochs", float, "cosine schedule only", check=at_least(0)),
    Option("label_smoothing", float, check=fraction_below_one),
    Option("bf16", bool),
    Option("channels_last", bool),
    Option("seed", int, check=at_least(0)),
    Option("device", str, "auto | cpu | cuda | cuda:N", check=device_name),
    Option("distill_temperature", float, check=positive),
    Option("distill_weight", float, check=fraction_closed),
    Option(
        "distill_mixup", float, "mixup Beta(a, a) of the inputs while distilling (0: off)", check=at_least(0)
    ),
    Option(
        "distill_features",
        float,
        "weight of matching the classifier's input features to the teacher's while distilling (0: off)",
        check=at_least(0),
    ),
    Option(
        "precise_bn_images",
        int,
        "after the last epoch, re-estimate BatchNorm statistics on this many training images (0: off)",
        check=at_least(0),
    ),
    Option("layers", list, "prune these convs"),
    Option("ignore", list, "never prune these layers"),
    Option("ratio", float, "fraction of channels to remove from each pruned layer", check=fraction_open),
    Option("target_macs", float, "keep this fraction of the MACs", check=fraction_open),
    Option("target_params", float, "keep this fraction of the parameters", check=fraction_open),
    Option(
        "target_latency",
        float,
        "keep this fraction of the dense model's latency, measured on this device",
        check=fraction_open,
    ),
    Option("latency_batch", int, "batch size the latency target is measured at", check=at_least(1)),
    Option(
        "latency_runtime", str, "where the latency target is measured", choices=("pytorch", "onnxruntime")
    ),
    Option("prune_input_conv", bool, "let targets and ratios prune the input conv's output channels"),
    Option("round_to", int, "keep channel counts multiples of N", check=at_least(1)),
    Option(
        "allocation",
        str,
        "how a target is spread across layers",
        choices=("global", "uniform", "sensitivity"),
    ),
    Option(
        "reconstruct",
        bool,
        "re-fit the layers that read pruned channels to the dense model's outputs on unlabelled images",
    ),
    Option("reconstruction_images", int, "training images recovery re-fits on", check=at_least(1)),
    Option(
        "scan_recovery",
        bool,
        "re-fit each sensitivity try before scoring it, so the plan ranks groups by what survives recovery "
        "(default; off: a faster scan, BatchNorm recalibration only)",
    ),
    Option("calibration", str, choices=("data", "random")),
    Option("calibration_images", int, check=at_least(1)),
    Option("images", int, "held-out training images a sensitivity scan scores on", check=at_least(1)),
    Option("recalibration_images", int, check=at_least(1)),
    Option("threads", int, "CPU threads", check=at_least(1)),
    Option("steps", int, "prune/fine-tune rounds", check=at_least(1)),
    Option("finetune_epochs", int, "fine-tuning epochs (default: the recipe's, 10)", check=at_least(1)),
    Option("finetune_lr", float, "fine-tuning's peak learning rate (default: the recipe's)", check=positive),
    Option("recalibrate", bool),
    Option("distill", bool),
    Option("quantize", bool),
    Option("calibration_method", str, choices=("minmax", "entropy", "percentile")),
    Option("name", str, check=nonempty),
    Option("runs_dir", str, check=nonempty),
    Option("baseline", str, check=nonempty),
    Option("recipe", str, "fine-tuning preset", choices_from="finetuning:ACCEPTED_RECIPES"),
    Option("freeze", str, choices_from="finetuning:ACCEPTED_FREEZE"),
    Option("importance", str, "channel importance criterion", choices_from="importance:CRITERIA"),
    Option("format", str, choices_from="export:FORMATS"),
]
OPTIONS: dict[str, Option] = {o.name: o for o in _TABLE}

# A default several commands share, stated once (a default of one command is stated in its module).
SEED = 0  # --seed: the images drawn to score, calibrate and scan, and training's initialization


def validate(values: dict[str, Any], names: Iterable[str] | None = None) -> dict[str, Any]:
    """Check every known option in ``values`` (or only ``names``); returns them with floats as float."""
    checked = dict(values)
    for key in names if names is not None else values:
        if key in OPTIONS and key in values:
            checked[key] = OPTIONS[key].validate(values[key])
    return checked


def validate_given(values: dict[str, Any]) -> dict[str, Any]:
    """``validate``, None refused too: for values that have no default left to fall back on."""
    for key, value in values.items():
        if value is None:
            raise UsageError(f"{arg(key)} needs a value")
    return validate(values)


def choices(name: str) -> tuple[str, ...]:
    """The values an option allows (for argparse's ``choices=`` and for checks outside this table)."""
    allowed = OPTIONS[name].allowed()
    assert allowed is not None, f"option {name} declares no choices"
    return allowed


def cli_type(name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a flag's text and applies the option's check."""
    option = OPTIONS[name]

    def parse(text: str) -> Any:
        try:
            value = option.kind(text) if option.kind in (int, float) else str(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {_KIND_NAMES[option.kind]}, got {text!r}") from None
        try:
            return option.validate(value)
        except UsageError as exc:  # argparse names the flag itself; keep only the reason
            raise argparse.ArgumentTypeError(str(exc).split(" ", 1)[1]) from None

    parse.__name__ = name  # argparse shows this in "invalid <name> value" messages
    return parse


# ---------------------------------------------------------------- command-line flags, from the table

UNSET: Any = object()  # no default given: the parser's own (None; nothing at all under ``prunekit run``)


@dataclass(frozen=True)
class Flag:
    """One flag of one command. ``dest`` names it in the parsed arguments and is its entry in the table, which
    gives its type and check, its choices and its help. A ``dest`` the table does not hold is a flag of one
    command only (a path, ``--overwrite``): ``argparse`` takes its type from ``extra``.

    ``flags`` are its spellings (default ``--dest-with-dashes``; one without dashes is a positional argument),
    ``help`` replaces the table's, ``group`` puts it in an argument group of that title (or in the command's
    one-of group, ``Command.one_of``), ``extra`` goes to ``add_argument`` as it is (``action``, ``metavar``).
    """

    dest: str
    default: Any = UNSET
    help: str | None = None
    flags: tuple[str, ...] = ()
    group: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def flag(
    dest: str,
    *flags: str,
    default: Any = UNSET,
    help: str | None = None,
    group: str | None = None,
    **extra: Any,
) -> Flag:
    """A ``Flag``, written as ``add_argument`` is: ``flag("layers", "--layer", action="append", default=[])``."""
    return Flag(dest, default, help, tuple(flags), group, extra)


@dataclass(frozen=True)
class Command:
    """One ``prunekit`` command: its name, one line of help, its flags and the function that runs it on the
    parsed arguments (returning the exit code). ``one_of`` is the group of flags of which exactly one is
    required; ``suppress_defaults`` leaves flags not given out of the arguments (``run`` merges a config)."""

    name: str
    help: str
    flags: list[Flag]
    main: Callable[[argparse.Namespace], int]
    one_of: str | None = None
    suppress_defaults: bool = False


def flag_arguments(spec: Flag) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``add_argument``'s arguments for ``spec``: the spellings, then type, choices, default, help and dest."""
    option = OPTIONS.get(spec.dest)
    names = spec.flags or ("--" + spec.dest.replace("_", "-"),)
    kwargs = dict(spec.extra)
    takes_value = kwargs.get("action") in (None, "append")
    if option is not None and takes_value and option.kind is not list:
        if option.allowed() is not None:
            kwargs.setdefault("choices", option.allowed())
        else:
            kwargs.setdefault("type", cli_type(option.name))
    help = spec.help if spec.help is not None else (option.help if option is not None else "")
    if help:
        kwargs["help"] = help
    if spec.default is not UNSET:
        kwargs["default"] = spec.default
    if names[0].startswith("-"):
        kwargs["dest"] = spec.dest
    return names, kwargs


def add_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    """``command``'s flags on ``parser``, in their order, with their groups."""
    groups: dict[str, Any] = {}
    for spec in command.flags:
        target: Any = parser
        if spec.group is not None:
            if spec.group not in groups:
                exclusive = spec.group == command.one_of
                groups[spec.group] = (
                    parser.add_mutually_exclusive_group(required=True)
                    if exclusive
                    else parser.add_argument_group(spec.group)
                )
            target = groups[spec.group]
        names, kwargs = flag_arguments(spec)
        target.add_argument(*names, **kwargs)
