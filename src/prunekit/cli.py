"""Command line: argument parsing, exit codes and human messages; the work happens in the other modules."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from rich.markup import escape

from .console import console, warn
from .errors import UsageError, cli_arg_style
from .finetuning import ACCEPTED_FREEZE, ACCEPTED_RECIPES
from .importance import CRITERIA
from .options import choices, cli_type

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        default=None,
        help="cifar10 | synthetic | PATH (image folder, .tar.gz/.zip of one, cifar-10-python.tar.gz)",
    )
    p.add_argument(
        "--data-dir", default=None, help="where --data cifar10 is downloaded (default: user cache)"
    )
    p.add_argument("--subset", type=cli_type("subset"), default=None, help="keep N training images per class")


def _add_train_args(p: argparse.ArgumentParser, defaults) -> None:
    g = p.add_argument_group("training recipe")
    g.add_argument("--epochs", type=cli_type("epochs"), default=defaults.epochs)
    g.add_argument("--batch-size", type=cli_type("batch_size"), default=defaults.batch_size)
    g.add_argument("--optimizer", choices=choices("optimizer"), default=defaults.optimizer)
    g.add_argument("--lr", type=cli_type("lr"), default=defaults.lr, help="peak learning rate")
    g.add_argument("--momentum", type=cli_type("momentum"), default=defaults.momentum)
    g.add_argument("--weight-decay", type=cli_type("weight_decay"), default=defaults.weight_decay)
    g.add_argument("--schedule", choices=choices("schedule"), default=defaults.schedule)
    g.add_argument(
        "--warmup-epochs",
        type=cli_type("warmup_epochs"),
        default=defaults.warmup_epochs,
        help="cosine schedule only",
    )
    g.add_argument("--label-smoothing", type=cli_type("label_smoothing"), default=defaults.label_smoothing)
    g.add_argument(
        "--no-bf16",
        dest="bf16",
        action="store_false",
        help="train in fp32 (bf16 autocast is on where the CPU supports it)",
    )
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--seed", type=cli_type("seed"), default=defaults.seed)
    g.add_argument(
        "--device", type=cli_type("device"), default=defaults.device, help="auto | cpu | cuda | cuda:N"
    )


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one ``error:`` line (flag, problem, where to look) instead of a usage dump;
    and no abbreviated flags, so the flags a user wrote can be told from the defaults (``given_options``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        match = re.match(r"argument ([^:]+): (.*)", message)
        if match:  # "argument --epochs: must be ..." -> "--epochs must be ..."
            flag = match.group(1).split("/")[0]
            message = f"{flag} {match.group(2)}"
        console.print(
            f"[bold red]error:[/] {message} (see {self.prog} --help)", highlight=False, soft_wrap=True
        )
        raise SystemExit(EXIT_USAGE)


def _add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} if it exists (default: refuse)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: one ``_add_<command>_parser`` each."""
    parser = Parser(prog="prunekit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"prunekit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_prune_parser(sub)
    _add_export_parser(sub)
    _add_sensitivity_parser(sub)
    _add_quantize_parser(sub)
    _add_finetune_parser(sub)
    _add_run_parser(sub)
    _add_models_parser(sub)
    return parser


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit train`` and its flags."""
    p = sub.add_parser("train", help="train a baseline classifier")
    p.add_argument(
        "--model",
        default="resnet18",
        help="resnet18 (the blog's), resnet18-cifar, or any torchvision classification model name",
    )
    _add_data_args(p, required=False)  # required for a new run; a resumed one reads its own
    p.add_argument(
        "--weights",
        default=None,
        help="start from pretrained weights: a torchvision weight name (DEFAULT, IMAGENET1K_V1, ...), "
        "'pretrained' for timm:NAME models, or a state-dict file (.safetensors, .pth, .pt)",
    )
    p.add_argument(
        "--image-size",
        type=cli_type("image_size"),
        default=None,
        help="model input size (default: native for small uniform images such as CIFAR, else 224 or the "
        "weights' own)",
    )
    p.add_argument(
        "--val-split",
        type=cli_type("val_split"),
        default=None,
        help="hold out this fraction of train/ when there is no test/",
    )
    p.add_argument("--out", type=Path, default=None, help="output directory (default: runs/<model>-baseline)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    _add_overwrite_arg(p, "the run in --out")
    from .train import TrainConfig

    _add_train_args(p, TrainConfig())
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit eval`` and its flags."""
    p = sub.add_parser("eval", help="accuracy, model summary and latency of a checkpoint")
    p.add_argument("checkpoint", type=Path)
    _add_data_args(p, required=False)
    p.add_argument(
        "--batch-size", type=cli_type("batch_size"), default=None, help="default: 500 at 32 px, 64 at 224 px"
    )
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency measurement")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    _add_overwrite_arg(p, "the --json file")
    p.set_defaults(func=cmd_eval)


def _add_prune_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit prune`` and its flags."""
    p = sub.add_parser("prune", help="remove channels from a trained checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--layer",
        action="append",
        default=[],
        help="prune this conv (repeatable); default: every prunable layer",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--ratio", type=cli_type("ratio"), help="fraction of channels to remove from each pruned layer"
    )
    what.add_argument(
        "--target-macs",
        type=cli_type("target_macs"),
        help="keep this fraction of the MACs (0.5 = half), globally",
    )
    what.add_argument(
        "--target-params",
        type=cli_type("target_params"),
        help="keep this fraction of the parameters, globally",
    )
    what.add_argument(
        "--target-latency",
        type=cli_type("target_latency"),
        help="keep this fraction of the dense model's latency, measured on this machine "
        "(per-layer latency tables, cached; the pruned model is timed to check)",
    )
    _add_latency_args(p)
    p.add_argument(
        "--importance",
        default=None,
        choices=CRITERIA,
        help="channel importance criterion (default: activation with --layer, else l2)",
    )
    p.add_argument(
        "--calibration",
        choices=choices("calibration"),
        default="data",
        help="score activations on training images (data) or on the blog's random noise",
    )
    p.add_argument("--calibration-images", type=cli_type("calibration_images"), default=256)
    _add_reconstruct_args(p, defaults=True)
    p.add_argument("--ignore", action="append", default=[], help="never prune this layer (repeatable)")
    p.add_argument(
        "--prune-input-conv",
        action="store_true",
        help="let a target or ratio prune the input conv's output channels (protected by default)",
    )
    p.add_argument(
        "--round-to", type=cli_type("round_to"), default=1, help="keep channel counts multiples of N"
    )
    p.add_argument(
        "--allocation",
        choices=choices("allocation"),
        default=None,
        help="how a target is spread across layers: one importance threshold, one ratio, or equal predicted "
        "loss from a sensitivity scan (default for a target: sensitivity, scanned on training images first, "
        "from 10,000 training images; global below that)",
    )
    p.add_argument(
        "--sensitivity", type=Path, default=None, help="a `prunekit sensitivity` JSON (default: scan now)"
    )
    _add_data_args(p, required=False)
    p.add_argument("--seed", type=cli_type("seed"), default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="pruned checkpoint (default: <checkpoint>-pruned"
        ".safetensors); a JSON report is written beside it",
    )
    _add_overwrite_arg(p, "the pruned checkpoint and its report")
    p.set_defaults(func=cmd_prune)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit export`` and its flags."""
    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", type=Path, default=None)
    _add_overwrite_arg(p, "--out")
    p.set_defaults(func=cmd_export)


def _add_sensitivity_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit sensitivity`` and its flags."""
    p = sub.add_parser(
        "sensitivity", help="accuracy of each group pruned alone at several ratios (held-out train)"
    )
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--out", type=Path, default=None, help="JSON (default: <checkpoint>-sensitivity.json); PNG beside"
    )
    p.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9", help="comma-separated fractions of channels")
    p.add_argument(
        "--images", type=cli_type("calibration_images"), help="held-out training images (default 1000)"
    )
    p.add_argument(
        "--recalibration-images",
        type=cli_type("recalibration_images"),
        help="training images that re-estimate BatchNorm after each try (default 512)",
    )
    # its name until 0.2: "calibration" is the images that score importance (prune --calibration-images)
    p.add_argument("--calibration-images", dest="old_recalibration_images", type=int, help=argparse.SUPPRESS)
    p.add_argument("--importance", choices=CRITERIA, default="l2")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_data_args(p, required=False)
    p.add_argument("--seed", type=cli_type("seed"), default=0)
    p.set_defaults(func=cmd_sensitivity)


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit quantize`` and its flags."""
    p = sub.add_parser("quantize", help="int8 post-training quantization in ONNX Runtime, measured")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, default=None, help="int8 .onnx (default: <checkpoint>-int8.onnx)")
    p.add_argument(
        "--calibration-images", type=cli_type("calibration_images"), default=512, help="training images"
    )
    p.add_argument("--calibration-method", choices=choices("calibration_method"), default="minmax")
    p.add_argument(
        "--keep-fp32", action="append", default=[], metavar="NODE", help="ONNX node kept in fp32 (repeatable)"
    )
    p.add_argument(
        "--no-remedies",
        dest="remedies",
        action="store_false",
        help="do not try remedies when int8 loses > 1 point",
    )
    p.add_argument(
        "--threads", type=cli_type("threads"), default=None, help="ONNX Runtime threads (default: torch's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_data_args(p, required=False)
    p.set_defaults(func=cmd_quantize)


def _add_finetune_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit finetune`` and its flags."""
    p = sub.add_parser("finetune", help="recalibrate BatchNorm and fine-tune a pruned checkpoint")
    p.add_argument("checkpoint", type=Path)
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default: <checkpoint>-finetuned)"
    )
    p.add_argument(
        "--recipe",
        choices=ACCEPTED_RECIPES,
        default=None,
        help="blog: Adam lr 1e-4, 10 epochs, the blog's freezing; full: SGD cosine lr 0.01, everything "
        "trains, BatchNorm re-estimated at the end (default: blog for a model pruned at named layers, "
        "full otherwise; seed: the old name of blog, deprecated)",
    )
    p.add_argument("--epochs", type=cli_type("epochs"), default=None)
    p.add_argument("--lr", type=cli_type("lr"), default=None)
    p.add_argument("--optimizer", choices=choices("optimizer"), default=None)
    p.add_argument(
        "--freeze",
        choices=ACCEPTED_FREEZE,
        default=None,
        help="blog: train only pruned blocks (with their BatchNorms) and the classifier; none: all "
        "(seed: the old name of blog, deprecated)",
    )
    p.add_argument("--teacher", type=Path, default=None, help="distil from this (dense) checkpoint")
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="distil from the dense parent (default: when the training split holds under 10,000 images)",
    )
    p.add_argument("--distill-temperature", type=cli_type("distill_temperature"), default=None)
    p.add_argument("--distill-weight", type=cli_type("distill_weight"), default=None)
    p.add_argument(
        "--no-recalibrate",
        dest="recalibrate",
        action="store_false",
        help="skip re-estimating BatchNorm statistics before fine-tuning",
    )
    p.add_argument("--recalibration-images", type=cli_type("recalibration_images"), default=2048)
    _add_data_args(p, required=False)
    p.add_argument("--seed", type=cli_type("seed"), default=0)
    p.add_argument("--device", type=cli_type("device"), default=None)
    p.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    _add_overwrite_arg(p, "the run in --out")
    p.set_defaults(func=cmd_finetune)


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit run`` and its flags."""
    p = sub.add_parser(
        "run",
        help="the whole pipeline: train, prune, recalibrate, fine-tune, evaluate, report",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", type=Path, help="YAML file holding any of these flags (flags given here win)")
    p.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped"
    )
    p.add_argument("--name", help="run directory name under --runs-dir (default: blog)")
    p.add_argument("--runs-dir", help="where run directories go (default: runs)")
    p.add_argument("--model", help="default: resnet18")
    p.add_argument("--data", help="default: cifar10")
    p.add_argument("--data-dir")
    p.add_argument("--subset", type=cli_type("subset"))
    p.add_argument("--baseline", help="reuse this dense checkpoint instead of training one")
    p.add_argument("--weights", help="train the baseline from these pretrained weights (see train --weights)")
    p.add_argument(
        "--image-size", type=cli_type("image_size"), help="model input size (see train --image-size)"
    )
    p.add_argument(
        "--val-split",
        type=cli_type("val_split"),
        help="hold out this fraction of train/ when there is no test/",
    )
    p.add_argument("--epochs", type=cli_type("epochs"), help="baseline training epochs")
    p.add_argument("--layer", dest="layers", action="append", help="default: layer2.0.conv1")
    p.add_argument(
        "--ratio",
        type=cli_type("ratio"),
        help="with --layer: per named layer (default: layer2.0.conv1 by 0.2); alone: every prunable layer, as in prune",
    )
    p.add_argument("--target-macs", type=cli_type("target_macs"))
    p.add_argument("--target-params", type=cli_type("target_params"))
    p.add_argument("--target-latency", type=cli_type("target_latency"), help="see prune --target-latency")
    _add_latency_args(p, defaults=False)
    p.add_argument("--ignore", action="append")
    p.add_argument("--prune-input-conv", action="store_true", help="see prune --prune-input-conv")
    p.add_argument("--round-to", type=cli_type("round_to"))
    p.add_argument("--allocation", choices=choices("allocation"), help="see prune --allocation")
    p.add_argument("--importance", choices=CRITERIA, help="default: activation with --layer, else l2")
    p.add_argument("--calibration", choices=choices("calibration"))
    p.add_argument("--calibration-images", type=cli_type("calibration_images"))
    _add_reconstruct_args(p, defaults=False)
    p.add_argument(
        "--steps", type=cli_type("steps"), help="reach the target in this many prune/fine-tune rounds"
    )
    p.add_argument(
        "--recipe",
        choices=ACCEPTED_RECIPES,
        help="fine-tuning preset (default: blog for named layers, as the blog's experiment; full for a target)",
    )
    p.add_argument("--finetune-epochs", type=cli_type("finetune_epochs"))
    p.add_argument("--finetune-lr", type=cli_type("finetune_lr"))
    p.add_argument("--freeze", choices=ACCEPTED_FREEZE)
    p.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="distil from the dense baseline (default: when the training split holds under 10,000 images)",
    )
    p.add_argument("--distill-temperature", type=cli_type("distill_temperature"))
    p.add_argument("--distill-weight", type=cli_type("distill_weight"))
    p.add_argument("--no-recalibrate", dest="recalibrate", action="store_false")
    p.add_argument(
        "--quantize", action="store_true", help="add an int8 ONNX Runtime stage (see prunekit quantize)"
    )
    p.add_argument("--calibration-method", choices=choices("calibration_method"))
    p.add_argument("--seed", type=cli_type("seed"))
    p.add_argument("--device", type=cli_type("device"))
    p.set_defaults(func=cmd_run)


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    """``prunekit models`` and its flags."""
    p = sub.add_parser("models", help="list the model names --model accepts")
    p.set_defaults(func=cmd_models)


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and its one error line (or --help)
        return int(exc.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    args.given, args.defaulted = given_options(
        parser, args.command, list(sys.argv[1:] if argv is None else argv)
    )
    try:
        with cli_arg_style():
            return int(args.func(args) or 0)
    except UsageError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
            # A full disk or a read-only folder is the user's to fix: one line naming the path, no traceback.
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(
                f"[bold red]error:[/] cannot write {escape(where)}{exc.strerror}",
                highlight=False,
                soft_wrap=True,
            )
            return EXIT_USAGE
        # A bug of ours, not the user's: one line here, the traceback in a log.
        log = _write_crash_log(argv)
        console.print(
            f"[bold red]error:[/] internal error, please report it: {type(exc).__name__}: "
            f"{escape(' '.join(str(exc).split())[:300])} (traceback in {log})",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERNAL


def given_options(
    parser: argparse.ArgumentParser, command: str, argv: list[str]
) -> tuple[set[str], set[str]]:
    """The options (destinations) written on the command line, and those left at their defaults: what a
    resumed run compares with its record."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    given, options = set(), set()
    for action in sub._actions:
        for flag in action.option_strings:
            options.add(action.dest)
            if any(token == flag or token.startswith(flag + "=") for token in argv):
                given.add(action.dest)
    return given, options - given


def asked_only(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every option the user did not write set to None (for a resumed run: not asked)."""
    return argparse.Namespace(**{k: None if k in args.defaulted else v for k, v in vars(args).items()})


def _write_crash_log(argv: Sequence[str] | None) -> Path:
    """Save the current exception's traceback with the command line; returns the log's path."""
    import datetime as dt
    import traceback

    from .files import cache_dir

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = cache_dir() / "logs" / f"crash-{stamp}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"prunekit {' '.join(map(str, argv if argv is not None else sys.argv[1:]))}\n\n{traceback.format_exc()}"
        )
    except OSError:
        path = Path("(could not write a log)")
    return path


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


# ---------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    from .commands import train
    from .train import TrainConfig

    out = args.out or Path("runs") / f"{args.model}-baseline"
    if args.resume:
        asked = {k: getattr(args, k) for k in args.given - {"resume", "out", "overwrite"}}
        result = train.resume_training(out, asked)
        _print_trained(result, out)
        return 0
    if args.data is None:
        raise UsageError(
            "--data is required for a new training run (a --resume run reads the one it recorded)"
        )
    cfg = TrainConfig.from_dict(vars(args))
    result = train.train(
        model=args.model,
        data=args.data,
        out=out,
        config=cfg,
        data_dir=args.data_dir,
        subset=args.subset,
        image_size=args.image_size,
        weights=args.weights,
        val_split=args.val_split,
        overwrite=args.overwrite,
    )
    _print_trained(result, out)
    return 0


def _print_trained(result, out: Path) -> None:
    from .files import is_main_process

    if is_main_process():  # under torchrun: one line per job, not per process
        console.print(f"test accuracy {result.test['accuracy']:.2%}; checkpoint {out / 'model.safetensors'}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .commands import evaluate
    from .report import print_eval

    results = evaluate.evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        data_dir=args.data_dir,
        subset=args.subset,
        batch_size=args.batch_size,
        measure_latency=args.latency,
        out=args.json,
        overwrite=args.overwrite,
    )
    print_eval(results)
    return 0


def _add_latency_args(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--latency-batch and --latency-runtime; ``defaults`` False leaves them to the parser (run's config)."""
    from .pruning import PruneRequest

    batch, runtime = PruneRequest.latency_batch, PruneRequest.latency_runtime
    p.add_argument(
        "--latency-batch",
        type=cli_type("latency_batch"),
        help=f"batch size --target-latency is measured at (default {batch})",
        **({"default": batch} if defaults else {}),
    )
    p.add_argument(
        "--latency-runtime",
        choices=choices("latency_runtime"),
        help=f"where --target-latency is measured (default {runtime}; onnxruntime needs prunekit[export])",
        **({"default": runtime} if defaults else {}),
    )


def _add_reconstruct_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    from .options import OPTIONS

    p.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"recovery without labels: {OPTIONS['reconstruct'].help}",
    )
    p.add_argument(
        "--reconstruction-images",
        type=cli_type("reconstruction_images"),
        help=f"{OPTIONS['reconstruction_images'].help} (default 512)",
        **({"default": 512} if defaults else {}),
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from .commands import prune
    from .pruning import PruneRequest
    from .report import print_prune
    from .sensitivity import read_scan

    request = PruneRequest(
        layers=args.layer,
        ratio=args.ratio,
        target_macs=args.target_macs,
        target_params=args.target_params,
        target_latency=args.target_latency,
        latency_batch=args.latency_batch,
        latency_runtime=args.latency_runtime,
        ignore=args.ignore,
        round_to=args.round_to,
        allocation=args.allocation,
        sensitivity=read_scan(args.sensitivity) if args.sensitivity else None,
        prune_input_conv=args.prune_input_conv,
        reconstruct=args.reconstruct,
    )
    report = prune.prune_checkpoint(
        args.checkpoint,
        request,
        importance=args.importance,
        data=args.data,
        data_dir=args.data_dir,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
        reconstruction_images=args.reconstruction_images,
        out=args.out,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print_prune(report)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .commands.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.format, args.out, overwrite=args.overwrite)
    console.print(f"wrote {out}", highlight=False)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .commands import sensitivity
    from .report import print_scan
    from .sensitivity import parse_ratios

    recalibration = args.recalibration_images
    if args.old_recalibration_images is not None:
        warn("sensitivity --calibration-images is deprecated: it is --recalibration-images now")
        recalibration = recalibration or args.old_recalibration_images
    result = sensitivity.sensitivity_checkpoint(
        args.checkpoint,
        out=args.out,
        ratios=parse_ratios(args.ratios),
        images=args.images,
        calibration_images=recalibration,
        importance=args.importance,
        data=args.data,
        data_dir=args.data_dir,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print_scan(result)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .commands import quantize
    from .report import print_quantize

    report = quantize.quantize_checkpoint(
        args.checkpoint,
        out=args.out,
        calibration_images=args.calibration_images,
        method=args.calibration_method,
        keep_fp32=args.keep_fp32,
        remedies=args.remedies,
        data=args.data,
        data_dir=args.data_dir,
        threads=args.threads,
        overwrite=args.overwrite,
    )
    print_quantize(report)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .commands import finetune

    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-finetuned")
    if args.resume:
        args = asked_only(args)
        args.resume = True
    result = finetune.finetune_checkpoint(
        args.checkpoint,
        out,
        recipe_name=args.recipe,
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        freeze=args.freeze,
        teacher=args.teacher,
        distill=args.distill,
        distill_temperature=args.distill_temperature,
        distill_weight=args.distill_weight,
        recalibrate=args.recalibrate,
        recalibration_images=args.recalibration_images,
        data=args.data,
        data_dir=args.data_dir,
        subset=args.subset,
        seed=args.seed,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    for stage, acc in result["accuracy"].items():
        console.print(f"{stage:>13}: {acc:.2%}", highlight=False)
    console.print(f"checkpoint {result['checkpoint']}", highlight=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import RunConfig, load_config, resumed_config, run

    skip = ("func", "config", "resume", "command", "given", "defaulted")
    values = load_config(args.config) if getattr(args, "config", None) is not None else {}
    values |= {k: v for k, v in vars(args).items() if k not in skip}  # flags given here win
    resume = getattr(args, "resume", None)
    cfg = resumed_config(resume, values) if resume is not None else RunConfig.from_dict(values)
    metrics = run(cfg, resume=resume is not None)
    acc = metrics["accuracy"]
    console.print(
        f"dense {acc['dense']:.2%} -> final {acc['final']:.2%}; MACs {metrics['macs_reduction']:.2f}x fewer",
        highlight=False,
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import available_models

    print("\n".join(available_models()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
