"""``prunekit run``: train-or-load -> prune -> recalibrate -> fine-tune -> evaluate -> report, resumable by stage."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .commands import evaluate as evaluate_command
from .commands import finetune as finetune_command
from .commands import prune as prune_command
from .commands import quantize as quantize_command
from .commands import train as train_command
from .console import info, warn
from .errors import UsageError
from .files import DirectoryLock, check_outputs, clean_stale_temps, write_json, write_text
from .options import SEED, validate
from .pruning import PruneRequest
from .resume import refuse_changes
from .train_config import TrainConfig
from .training_state import MODEL_FILE

CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"


@dataclass
class RunConfig:
    """Every flag of ``prunekit run``; the defaults are the blog's experiment."""

    name: str = "blog"
    runs_dir: str = "runs"
    model: str = train_command.MODEL
    data: str = "cifar10"
    data_dir: str | None = None
    subset: int | None = None
    baseline: str | None = None
    weights: str | None = None
    image_size: int | None = None
    val_split: float | None = None
    epochs: int = TrainConfig.epochs
    layers: list[str] = field(default_factory=lambda: ["layer2.0.conv1"])
    ratio: float | None = 0.2
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    latency_batch: int = PruneRequest.latency_batch
    latency_runtime: str = PruneRequest.latency_runtime
    ignore: list[str] = field(default_factory=list)
    prune_input_conv: bool = PruneRequest.prune_input_conv
    scan_recovery: bool = PruneRequest.scan_recovery
    round_to: int = PruneRequest.round_to
    allocation: str | None = (
        None  # None: by the training split's size, as `prunekit prune` (default_allocation)
    )
    importance: str | None = None  # None: prune's default (core.default_importance)
    calibration: str = prune_command.CALIBRATION
    calibration_images: int = prune_command.CALIBRATION_IMAGES
    reconstruct: bool | None = None  # recovery without labels after each pruning (None: the default)
    reconstruction_images: int = prune_command.RECONSTRUCTION_IMAGES
    steps: int = 1
    recipe: str | None = None  # finetuning.default_recipe: blog for named layers, full for a target
    finetune_epochs: int = 10
    finetune_lr: float | None = None
    freeze: str | None = None
    distill: bool | None = None  # None: by the training split's size (finetuning.distills_by_default)
    distill_temperature: float | None = None
    distill_weight: float | None = None
    distill_features: float | None = None
    recalibrate: bool = True
    quantize: bool = False
    calibration_method: str = quantize_command.CALIBRATION_METHOD
    seed: int = SEED
    device: str = TrainConfig.device

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown setting(s) in the config: {', '.join(unknown)}")
        cfg = cls(**validate(values))
        if any(t is not None for t in (cfg.target_macs, cfg.target_params, cfg.target_latency)):
            # A target is global: the blog's single layer and ratio no longer apply unless named explicitly.
            if "layers" not in values:
                cfg.layers = []
            if "ratio" not in values:
                cfg.ratio = None
        elif "ratio" in values and "layers" not in values:
            # As in `prunekit prune`: a ratio without --layer applies to every prunable layer.
            cfg.layers = []
        return cfg

    def prune_request(self, step: int) -> PruneRequest:
        """The request for prune round ``step`` (1-based) of ``steps``, relative to the previous round's model."""

        def share(keep: float | None) -> float | None:
            # Reach keep^(step/steps) of the dense model after round ``step``; each round asks its own share.
            return None if keep is None else keep ** (1 / self.steps)

        ratio = None if self.ratio is None else 1 - (1 - self.ratio) ** (1 / self.steps)
        return PruneRequest(
            layers=list(self.layers),
            ratio=ratio,
            target_macs=share(self.target_macs),
            target_params=share(self.target_params),
            target_latency=share(self.target_latency),
            latency_batch=self.latency_batch,
            latency_runtime=self.latency_runtime,
            ignore=list(self.ignore),
            round_to=self.round_to,
            allocation=self.allocation,
            prune_input_conv=self.prune_input_conv,
            reconstruct=self.reconstruct,
            scan_recovery=self.scan_recovery,
        )


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in values.items()}


def resumed_config(run_dir: Path, asked: dict[str, Any]) -> RunConfig:
    """The recorded config of the run in ``run_dir``; settings ``asked`` (not None) that differ from it are
    refused, naming each (a resumed run keeps its settings)."""
    if not (run_dir / CONFIG_FILE).exists():
        raise UsageError(f"--resume {run_dir}: not a run directory (no {CONFIG_FILE})")
    values = load_config(run_dir / CONFIG_FILE)
    refuse_changes(run_dir, values, asked, new_run="another --name")
    values.update(runs_dir=str(run_dir.parent), name=run_dir.name)
    return RunConfig.from_dict(values)


class Run:
    """A run directory: resolved config, per-stage state, checkpoints, metrics, log and report."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.runs_dir) / cfg.name
        self.state: dict[str, Any] = {"completed": [], "results": {}}
        if (self.dir / STATE_FILE).exists():
            self.state = json.loads((self.dir / STATE_FILE).read_text())

    def done(self, stage: str) -> bool:
        return stage in self.state["completed"]

    def complete(self, stage: str, result: dict[str, Any]) -> None:
        self.state["results"][stage] = result
        self.state["completed"].append(stage)
        write_json(self.dir / STATE_FILE, self.state)
        self.log(f"stage {stage} done")

    def log(self, message: str) -> None:
        info(f"run {self.cfg.name}: {message}")
        with open(self.dir / "run.log", "a") as f:
            f.write(message + "\n")


def check_before_work(cfg: RunConfig) -> None:
    """What would otherwise fail only after the baseline has trained: the data source, the model name and
    the layers to prune, checked against the architecture (or the given baseline) before anything runs."""
    from .checkpoint import read_meta
    from .groups import validate_names
    from .models import build_model

    if cfg.data not in ("cifar10", "synthetic") and not Path(cfg.data).expanduser().exists():
        raise UsageError(f"--data {cfg.data}: no such file or directory")
    if cfg.baseline:
        meta = read_meta(cfg.baseline)
        model = build_model(meta["model"], meta["num_classes"])
    else:
        model = build_model(cfg.model, 10)  # layer names do not depend on the class count
    validate_names(model, cfg.prune_request(1))


def run(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the whole pipeline; returns the final metrics."""
    cfg.prune_request(1).validate()  # fail before any work
    # A config built in Python bypasses from_dict: the rest of what run needs, checked through the table.
    validate(asdict(cfg), ("steps", "recipe", "freeze", "importance", "calibration", "calibration_method"))
    check_before_work(cfg)
    with DirectoryLock(Path(cfg.runs_dir) / cfg.name):  # one process per run directory
        return _run_locked(cfg, resume)


def _run_locked(cfg: RunConfig, resume: bool) -> dict[str, Any]:
    r = Run(cfg)
    _claim(r, resume)
    baseline = _baseline_stage(r)
    current = baseline
    for step in range(1, cfg.steps + 1):
        pruned = _prune_stage(r, step, current)
        current = _finetune_stage(r, step, pruned, baseline)
    _evaluate_stage(r, baseline, current)
    if cfg.quantize:
        _quantize_stage(r, current)
    from .report import write_run_report

    metrics = write_run_report(r.dir, asdict(cfg), r.state["results"])
    for line in metrics["slower_than_dense"]:
        warn(line)
    r.log(f"report: {r.dir / 'report.md'}")
    return metrics


def _claim(r: Run, resume: bool) -> None:
    """Take the run directory: refuse a finished run not resumed, or a baseline this run would overwrite;
    then record the config."""
    cfg = r.cfg
    if r.dir.exists() and r.state["completed"] and not resume:
        raise UsageError(
            f"{r.dir} already holds a run; continue it with --resume {r.dir} or pick another --name"
        )
    clean_stale_temps(r.dir)
    # A reused baseline must not be one of the files this run (re)writes.
    outputs = [r.dir / f"pruned-{s}.safetensors" for s in range(1, cfg.steps + 1)]
    outputs += [r.dir / f"finetune-{s}" / MODEL_FILE for s in range(1, cfg.steps + 1)]
    check_outputs([cfg.baseline], outputs, overwrite=True)
    r.dir.mkdir(parents=True, exist_ok=True)
    write_text(r.dir / CONFIG_FILE, yaml.safe_dump(asdict(cfg), sort_keys=False))


def _baseline_stage(r: Run) -> Path:
    """The dense checkpoint: the one given, or the one this run trains (once); refused when missing."""
    cfg = r.cfg
    baseline = Path(cfg.baseline) if cfg.baseline else r.dir / "baseline" / MODEL_FILE
    if not cfg.baseline and not r.done("baseline"):
        r.log("training the baseline")
        tcfg = TrainConfig(epochs=cfg.epochs, seed=cfg.seed, device=cfg.device)
        train_command.train(
            cfg.model,
            cfg.data,
            r.dir / "baseline",
            tcfg,
            data_dir=cfg.data_dir,
            subset=cfg.subset,
            image_size=cfg.image_size,
            weights=cfg.weights,
            val_split=cfg.val_split,
            resume=(r.dir / "baseline" / "checkpoint.safetensors").exists(),
            overwrite=True,  # the run directory is ours: a stage cut short is redone
        )
        r.complete("baseline", {"checkpoint": str(baseline)})
    if not baseline.exists():
        raise UsageError(f"--baseline {baseline}: no such checkpoint")
    return baseline


def _prune_stage(r: Run, step: int, current: Path) -> Path:
    """Prune round ``step`` of ``current`` (unless done); the pruned checkpoint."""
    cfg = r.cfg
    pruned = r.dir / f"pruned-{step}.safetensors"
    if not r.done(f"prune-{step}"):
        r.log(f"pruning (round {step}/{cfg.steps})")
        report = prune_command.prune_checkpoint(
            current,
            cfg.prune_request(step),
            importance=cfg.importance,
            data=cfg.data,
            data_dir=cfg.data_dir,
            subset=cfg.subset,
            calibration=cfg.calibration,
            calibration_images=cfg.calibration_images,
            reconstruction_images=cfg.reconstruction_images,
            out=pruned,
            seed=cfg.seed,
            overwrite=True,
        )
        kept = ("before", "after", "macs", "params", "changed_layers", "removed_channels", "importance")
        r.complete(f"prune-{step}", {k: report[k] for k in kept})
    return pruned


def _finetune_stage(r: Run, step: int, pruned: Path, baseline: Path) -> Path:
    """Recalibrate and fine-tune round ``step``'s pruned model (unless done); the fine-tuned checkpoint."""
    cfg = r.cfg
    ft_dir = r.dir / f"finetune-{step}"
    if not r.done(f"finetune-{step}"):
        r.log(f"recalibrating BatchNorm and fine-tuning (round {step}/{cfg.steps})")
        result = finetune_command.finetune_checkpoint(
            pruned,
            ft_dir,
            recipe=cfg.recipe,
            epochs=max(1, cfg.finetune_epochs // cfg.steps),
            lr=cfg.finetune_lr,
            freeze=cfg.freeze,
            teacher=baseline if cfg.distill else None,
            distill=cfg.distill,
            distill_temperature=cfg.distill_temperature,
            distill_weight=cfg.distill_weight,
            distill_features=cfg.distill_features,
            recalibrate=cfg.recalibrate,
            data=cfg.data,
            data_dir=cfg.data_dir,
            subset=cfg.subset,
            seed=cfg.seed,
            device=cfg.device,
            resume=(ft_dir / "checkpoint.safetensors").exists(),
            overwrite=True,
        )
        r.complete(f"finetune-{step}", result)
    return ft_dir / MODEL_FILE


def _evaluate_stage(r: Run, baseline: Path, current: Path) -> None:
    """Evaluate the dense baseline and the final model (unless done), without their printable tables."""
    if r.done("evaluate"):
        return
    cfg = r.cfg
    r.log("evaluating the dense baseline and the final model")
    dense = evaluate_command.evaluate_checkpoint(baseline, data=cfg.data, data_dir=cfg.data_dir)
    final = evaluate_command.evaluate_checkpoint(current, data=cfg.data, data_dir=cfg.data_dir)
    strip = ("summary_table",)
    r.complete(
        "evaluate",
        {
            "dense": {k: v for k, v in dense.items() if k not in strip},
            "final": {k: v for k, v in final.items() if k not in strip},
        },
    )


def _quantize_stage(r: Run, current: Path) -> None:
    """int8 quantization of the final model in ONNX Runtime (unless done)."""
    if r.done("quantize"):
        return
    cfg = r.cfg
    r.log("int8 quantization in ONNX Runtime")
    report = quantize_command.quantize_checkpoint(
        current,
        out=r.dir / "model-int8.onnx",
        calibration_method=cfg.calibration_method,
        data=cfg.data,
        data_dir=cfg.data_dir,
        subset=cfg.subset,
        seed=cfg.seed,
    )
    r.complete("quantize", report)
