"""``prunekit models``: the names ``--model`` accepts."""

from __future__ import annotations

import argparse

from ..options import Command


def main(args: argparse.Namespace) -> int:
    from ..models import available_models

    print("\n".join(available_models()))
    return 0


COMMAND = Command("models", "list the model names --model accepts", [], main)
