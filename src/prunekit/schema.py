"""Checking a checkpoint's metadata before trusting it: field types, then recorded shapes against the tensors.

A checkpoint may come from anywhere. Every field prunekit reads is checked here, so a wrong type or an
absurd size is one ``UsageError`` naming the file and the field, raised before any model is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError

SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "normalized_shape",
    "num_channels",
    "num_groups",
)
CUSTOM_PREFIX = "custom:"
# The model attribute (and checkpoint key) holding the dense indices of the classifier inputs a pruned
# model kept: prunekit.prune sets it, checkpoints carry it, distillation's feature term reads it
KEPT_ATTRIBUTE = "prunekit_classifier_inputs"
MAX_INPUT_SIZE = 16384  # pixels per side; larger is a corrupt file, not an image


class MetaError(Exception):
    """One field is wrong: ``field`` is its dotted path, ``problem`` what is wrong with it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(field: str, value: Any, limit: int | None = None) -> int:
    """``value`` if it is a whole number of at least 1 (and at most ``limit``)."""
    if not _is_int(value) or value < 1:
        raise MetaError(field, f"must be a positive whole number, got {_show(value)}")
    if limit is not None and value > limit:
        raise MetaError(field, f"is {value}, more than the largest plausible {limit}")
    return value


def string(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise MetaError(field, f"must be a non-empty string, got {_show(value)}")
    return value


def mapping(field: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise MetaError(field, f"must be a JSON object, got {_show(value)}")
    return value


def listing(field: str, value: Any) -> list:
    if not isinstance(value, list):
        raise MetaError(field, f"must be a list, got {_show(value)}")
    return value


def channel_stats(field: str, value: Any, positive: bool) -> None:
    """``mean``/``std``: three finite numbers, one per RGB channel (``std`` above zero)."""
    if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value):
        raise MetaError(field, f"must be a list of 3 finite numbers, got {_show(value)}")
    if positive and min(value) <= 0:
        raise MetaError(field, f"must be above zero (it divides the pixels), got {_show(value)}")


def shape_table(value: Any) -> None:
    """``shapes``: module name -> {shape attribute: positive int or list of positive ints}."""
    for name, attrs in mapping("shapes", value).items():
        for attr, v in mapping(f"shapes.{name}", attrs).items():
            field = f"shapes.{name}.{attr}"
            if attr not in SHAPE_ATTRS:
                raise MetaError(field, f"is not a shape attribute (expected one of {', '.join(SHAPE_ATTRS)})")
            if isinstance(v, list):
                for i, item in enumerate(v):
                    positive_int(f"{field}[{i}]", item)
            else:
                positive_int(field, v)


def _optional(meta: Mapping[str, Any], key: str, check: Callable[[str, Any], Any]) -> None:
    """Check ``meta[key]`` unless it is absent or null."""
    if meta.get(key) is not None:
        check(key, meta[key])


def _pruning(field: str, value: Any) -> None:
    for i, record in enumerate(listing(field, value)):
        record = mapping(f"{field}[{i}]", record)
        changed = record.get("changed_layers", [])
        for j, name in enumerate(listing(f"{field}[{i}].changed_layers", changed)):
            string(f"{field}[{i}].changed_layers[{j}]", name)


def _parent(field: str, value: Any) -> None:
    string(f"{field}.model", mapping(field, value).get("model"))


def _data(field: str, value: Any) -> None:
    record = mapping(field, value)
    for key in ("spec", "data_dir"):
        if record.get(key) is not None:
            string(f"{field}.{key}", record[key])
    if record.get("subset") is not None:
        positive_int(f"{field}.subset", record["subset"])
    if record.get("val_split") is not None and not _is_number(record["val_split"]):
        raise MetaError(f"{field}.val_split", f"must be a number, got {_show(record['val_split'])}")


def _split(field: str, value: Any) -> None:
    seed = mapping(field, value).get("seed", 0)
    if not _is_int(seed):
        raise MetaError(f"{field}.seed", f"must be a whole number, got {_show(seed)}")


def _optimizer(field: str, value: Any) -> None:
    record = mapping(field, value)
    for i, group in enumerate(listing(f"{field}.param_groups", record.get("param_groups"))):
        mapping(f"{field}.param_groups[{i}]", group)
    for key in mapping(f"{field}.scalars", record.get("scalars", {})):
        idx, _, name = key.partition(".")
        if not idx.isdigit() or not name:
            raise MetaError(f"{field}.scalars", f"key {_show(key)} is not '<parameter index>.<name>'")


def _versions(field: str, value: Any) -> None:
    for name, version in mapping(field, value).items():
        if not _is_int(version) or version < 0:
            raise MetaError(f"{field}.{name}", f"must be a whole number, got {_show(version)}")


def _train(field: str, value: Any) -> None:
    mapping(f"{field}.config", mapping(field, value).get("config", {}))


def check_fields(meta: Mapping[str, Any]) -> None:
    """Every field prunekit reads has the right type; required ones are present (MetaError otherwise)."""
    name = string("model", meta.get("model"))
    by_name = not name.startswith(CUSTOM_PREFIX)
    if by_name or meta.get("num_classes") is not None:
        positive_int("num_classes", meta.get("num_classes"))
    if by_name or meta.get("input_size") is not None:
        positive_int("input_size", meta.get("input_size"), MAX_INPUT_SIZE)
    if meta.get("format_version") is not None and not _is_int(meta["format_version"]):
        raise MetaError("format_version", f"must be a whole number, got {_show(meta['format_version'])}")
    if meta.get("classes") is not None:
        classes = listing("classes", meta["classes"])
        if not all(isinstance(c, str) for c in classes):
            raise MetaError("classes", "must be a list of class names (strings)")
        if meta.get("num_classes") is not None and len(classes) != meta["num_classes"]:
            raise MetaError(
                "classes", f"names {len(classes)} classes but num_classes is {meta['num_classes']}"
            )
    _optional(meta, "mean", lambda f, v: channel_stats(f, v, positive=False))
    _optional(meta, "std", lambda f, v: channel_stats(f, v, positive=True))
    _optional(meta, "shapes", lambda f, v: shape_table(v))
    for key, check in (
        ("pruning", _pruning),
        ("parent", _parent),
        ("data", _data),
        ("split", _split),
        ("optimizer", _optimizer),
        ("state_versions", _versions),
        ("train", _train),
        ("finetune", mapping),
        ("preprocess", mapping),
        ("metrics", mapping),
    ):
        _optional(meta, key, check)


def _expected_dims(attrs: Mapping[str, Any]) -> dict[str, dict[int, int]]:
    """Which tensor dimensions the recorded attributes fix: leaf name -> {dim: size}."""
    if "out_channels" in attrs and "in_channels" in attrs:
        groups = attrs.get("groups", 1)
        return {"weight": {0: attrs["out_channels"], 1: attrs["in_channels"] // groups}}
    if "out_features" in attrs and "in_features" in attrs:
        return {"weight": {0: attrs["out_features"], 1: attrs["in_features"]}}
    for attr in ("num_features", "num_channels"):
        if attr in attrs:
            return {leaf: {0: attrs[attr]} for leaf in ("weight", "bias", "running_mean", "running_var")}
    if "normalized_shape" in attrs:
        shape = attrs["normalized_shape"]
        shape = shape if isinstance(shape, list) else [shape]
        return {leaf: dict(enumerate(shape)) for leaf in ("weight", "bias")}
    return {}


def _grouping(name: str, attrs: Mapping[str, Any]) -> None:
    """Groups must divide the channels they split, or the rebuilt layer is no valid layer."""
    for whole, parts in (
        ("in_channels", "groups"),
        ("out_channels", "groups"),
        ("num_channels", "num_groups"),
    ):
        if whole in attrs and parts in attrs and attrs[whole] % attrs[parts]:
            raise MetaError(
                f"shapes.{name}.{parts}", f"{attrs[parts]} does not divide {whole} {attrs[whole]}"
            )


def check_shapes(shapes: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, tuple[int, ...]]) -> None:
    """Recorded shape attributes agree with the saved tensors' shapes (``tensors``: state key -> shape).

    Parameters are re-created from the saved tensors, so only an attribute that disagrees with them could
    build a layer of another size; wrappers recording channels without tensors (torchvision's
    ``Conv2dNormActivation``) own nothing a number could size.
    """
    for name, attrs in shapes.items():
        _grouping(name, attrs)
        for leaf, dims in _expected_dims(attrs).items():
            shape = tensors.get(f"{name}.{leaf}" if name else leaf)
            if shape is None:
                continue
            for dim, size in dims.items():
                if dim >= len(shape) or shape[dim] != size:
                    raise MetaError(
                        f"shapes.{name}",
                        f"records {dict(attrs)} but the tensor {name}.{leaf} has shape {list(shape)}",
                    )


def check_num_classes(meta: Mapping[str, Any], tensors: Mapping[str, tuple[int, ...]]) -> None:
    """A by-name model's class count must be some saved layer's output count (it sizes the classifier)."""
    n = meta.get("num_classes")
    if n is None or str(meta.get("model", "")).startswith(CUSTOM_PREFIX) or not tensors:
        return
    if not any(shape and shape[0] == n for shape in tensors.values()):
        raise MetaError("num_classes", f"is {n}, but no saved layer has {n} outputs")


def validate(meta: Mapping[str, Any], path: str | Path, tensors: Mapping[str, tuple[int, ...]]) -> None:
    """Check ``meta`` (and its shapes against ``tensors``, the model's state keys -> shapes) or raise a
    one-line UsageError naming ``path`` and the field."""
    try:
        check_fields(meta)
        check_shapes(meta.get("shapes") or {}, tensors)
        check_num_classes(meta, tensors)
    except MetaError as exc:
        raise UsageError(f"{path}: invalid checkpoint metadata: '{exc.field}' {exc.problem}") from None
