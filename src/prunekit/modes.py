"""A model in eval mode for the length of a block: its mode restored, and its hooks removed, afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module, hooks: Iterable[Any] = ()) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (BatchNorm statistics stay put while we only measure); its
    training mode restored and the ``hooks`` handles removed after, whatever the block raised."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
