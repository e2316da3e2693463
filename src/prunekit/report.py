"""Turning measurements into JSON and the Markdown run report (computing them is measure.py's job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .measure import MACS_MEANING
from .plots import plot_channels, plot_curves, plot_tradeoff


def seed_table(
    before: dict[str, Any],
    after: dict[str, Any],
    before_label: str = "before pruning",
    after_label: str = "after pruning",
) -> list[tuple[str, str, str]]:
    """The blog's torchinfo comparison rows: total params, mult-adds, params size, estimated total size."""
    return [
        ("Total params", f"{before['total_params']:,}", f"{after['total_params']:,}"),
        ("Total mult-adds", f"{before['mult_adds'] / 1e6:.2f} M", f"{after['mult_adds'] / 1e6:.2f} M"),
        ("Params size", f"{before['params_size_mb']:.2f} MB", f"{after['params_size_mb']:.2f} MB"),
        (
            "Estimated total size",
            f"{before['estimated_total_size_mb']:.2f} MB",
            f"{after['estimated_total_size_mb']:.2f} MB",
        ),
    ]


def _channel_changes(results: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Output channels per pruned layer, dense -> final, over every prune round."""
    changes: dict[str, list[int]] = {}
    for stage in sorted(k for k in results if k.startswith("prune-")):
        for c in results[stage]["changed_layers"]:
            if "out_channels" in c:
                old, new = c["out_channels"]
                changes.setdefault(c["layer"], [old, new])[1] = new
    return {k: (v[0], v[1]) for k, v in changes.items()}


def tradeoff_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy and measured latency of each stage of a run: dense, pruned, fine-tuned, int8."""
    dense, final = results["evaluate"]["dense"], results["evaluate"]["final"]
    rounds = sorted(k for k in results if k.startswith("finetune-"))
    pruned_acc = results[rounds[0]]["accuracy"].get("pruned") if rounds else None
    # The dense figures are the parent timed beside the pruned model when available (one comparison).
    dense_lat = {"ort": final.get("ort_parent_latency") or dense.get("ort_latency"),
                 "torch": final.get("parent_latency") or dense.get("latency")}  # fmt: skip
    final_lat = {"ort": final.get("ort_latency"), "torch": final.get("latency")}
    rows = [
        {"stage": "dense fp32", "accuracy": dense["accuracy"], "latency": dense_lat},
        {"stage": "pruned fp32 (before fine-tuning)", "accuracy": pruned_acc, "latency": final_lat},
        {"stage": "pruned + fine-tuned fp32", "accuracy": final["accuracy"], "latency": final_lat},
    ]
    if "quantize" in results:
        int8 = results["quantize"]["rows"]["int8"]
        rows.append(
            {
                "stage": "pruned + fine-tuned int8",
                "accuracy": int8["accuracy"],
                "latency": {"ort": int8["latency"]},
            }
        )
    return rows


RUNTIMES = {"ort": "ONNX Runtime", "torch": "PyTorch"}


def slower_stages(stages: list[dict[str, Any]]) -> list[str]:
    """One line for each stage measured slower than the dense model in some runtime and batch, with the
    remedy: a model pruned to odd channel counts can lose to its parent in a runtime's kernels."""
    dense, lines = stages[0], []
    # a stage timed as the one after it (pruned, then fine-tuned: the same network) is named once, as the latter
    later = [*stages[2:], None]
    named = [
        row
        for row, nxt in zip(stages[1:], later, strict=True)
        if nxt is None or nxt["latency"] != row["latency"]
    ]
    for row in named:
        for runtime, name in RUNTIMES.items():
            for key in ("batch1", "batch64"):
                ours = (row["latency"].get(runtime) or {}).get(key)
                theirs = (dense["latency"].get(runtime) or {}).get(key)
                if ours and theirs and ours["median_ms"] > theirs["median_ms"]:
                    lines.append(
                        f"{row['stage']} is slower than {dense['stage']} in {name} at "
                        f"{key.replace('batch', 'batch ')} ({ours['median_ms']:.2f} against "
                        f"{theirs['median_ms']:.2f} ms): round channel counts with --round-to 8 (or 16), "
                        "or prune to a measured --target-latency"
                    )
    return lines


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def _ms(row: dict[str, Any], runtime: str, key: str) -> str:
    lat = (row["latency"].get(runtime) or {}).get(key)
    return f"{lat['median_ms']:.2f} ms" if lat else ""


def write_run_report(run_dir: Path, config: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """``report.md``, ``metrics.json`` and PNG plots for a finished ``prunekit run``."""
    from .files import write_json, write_text

    dense, final = results["evaluate"]["dense"], results["evaluate"]["final"]
    accuracy = _stage_accuracy(results)
    curves = _training_curves(run_dir, results)
    stages = tradeoff_rows(results)
    charts = {
        "channels": plot_channels(_channel_changes(results), run_dir / "channels.png"),
        "curves": plot_curves(curves, run_dir / "curves.png"),
        "tradeoff": plot_tradeoff(stages, run_dir / "tradeoff.png"),
    }
    metrics = {
        "accuracy": accuracy,
        "dense": {k: dense[k] for k in ("params", "macs", "summary", "latency", "file_size_mb")},
        "final": {
            k: final[k]
            for k in ("params", "macs", "summary", "latency", "speedup", "file_size_mb")
            if k in final
        },
        "macs_reduction": dense["macs"] / final["macs"],
        "params_reduction": dense["params"] / final["params"],
        "stages": stages,
        "slower_than_dense": slower_stages(stages),
    }
    write_json(run_dir / "metrics.json", metrics)
    lines = _summary_lines(run_dir, config, results, metrics)
    lines += _stage_lines(stages, charts)
    lines += [
        "## Reproduce",
        "",
        "```",
        f"prunekit run --config {run_dir / 'config.yaml'} --name NEW_NAME",
        "```",
        "",
    ]
    write_text(run_dir / "report.md", "\n".join(lines))
    return metrics


def _finetune_rounds(results: dict[str, Any]) -> list[str]:
    return sorted(k for k in results if k.startswith("finetune-"))


def _stage_accuracy(results: dict[str, Any]) -> dict[str, float]:
    """Test accuracy by stage: dense, each fine-tuning round's figures (named by round when several), final."""
    rounds = _finetune_rounds(results)
    accuracy = {"dense": results["evaluate"]["dense"]["accuracy"]}
    for stage in rounds:
        n = stage.split("-")[1]
        for key, value in results[stage]["accuracy"].items():
            accuracy[f"{key} (round {n})" if len(rounds) > 1 else key] = value
    accuracy["final"] = results["evaluate"]["final"]["accuracy"]
    return accuracy


def _training_curves(run_dir: Path, results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch history of each training stage: the baseline (when this run trained it), then each round."""
    import json

    curves = {}
    baseline_metrics = run_dir / "baseline" / "metrics.json"
    if baseline_metrics.exists():
        curves["baseline"] = json.loads(baseline_metrics.read_text())["history"]
    for stage in _finetune_rounds(results):
        curves[stage] = results[stage]["history"]
    return curves


def _comparison_rows(dense: dict[str, Any], final: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The dense against pruned + fine-tuned table: the blog's torchinfo rows, CPU latency, test accuracy."""
    rows = seed_table(dense["summary"], final["summary"])
    # The dense column's latency is the parent timed beside the pruned model, so the speed-up is consistent.
    lat_d = final.get("parent_latency") or dense.get("latency", {})
    lat_f, speed = final.get("latency", {}), final.get("speedup", {})
    for key in ("batch1", "batch64"):
        if key in lat_d and key in lat_f:
            rows.append(
                (
                    f"CPU latency, {key.replace('batch', 'batch ')}",
                    f"{lat_d[key]['median_ms']:.2f} ms",
                    f"{lat_f[key]['median_ms']:.2f} ms ({speed.get(key, 0):.2f}x)",
                )
            )
    rows.append(("Test accuracy", f"{dense['accuracy']:.2%}", f"{final['accuracy']:.2%}"))
    return rows


def _pruning_budget(config: dict[str, Any]) -> str:
    """What the run pruned by, as the report's first line names it: layers, a target, or a ratio."""
    if config["layers"]:
        return f"layers {', '.join(config['layers'])} by {config['ratio']:.0%}"
    if config["target_macs"]:
        return f"target MACs {config['target_macs']}"
    if config["target_params"]:
        return f"target params {config['target_params']}"
    if config.get("target_latency"):
        return (
            f"target latency {config['target_latency']} ({config['latency_runtime']}, batch "
            f"{config['latency_batch']})"
        )
    return f"ratio {config['ratio']}"


def _summary_lines(
    run_dir: Path, config: dict[str, Any], results: dict[str, Any], metrics: dict[str, Any]
) -> list[str]:
    """The report's head: what the run did, dense against final, the reductions, accuracy at each stage."""
    dense, final = results["evaluate"]["dense"], results["evaluate"]["final"]
    rows = _comparison_rows(dense, final)
    return [
        f"# prunekit run `{run_dir.name}`",
        "",
        f"{config['model']} on `{config['data']}`; pruning: "
        + _pruning_budget(config)
        + f", importance `{config['importance'] or results['prune-1'].get('importance')}`, {config['steps']} round(s); fine-tuning recipe `{config['recipe']}`"
        + f" ({config['finetune_epochs']} epochs{', distilled from the dense model' if config['distill'] else ''}).",
        "",
        "| | dense | pruned + fine-tuned |",
        "|---|---:|---:|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        f"MACs reduced {metrics['macs_reduction']:.2f}x, parameters {metrics['params_reduction']:.2f}x. "
        "Latency: median of repeated fp32 forward passes on this machine's CPU, dense and pruned timed in the same "
        "process. " + MACS_MEANING,
        "",
        *[f"**Slower than dense:** {line}.  " for line in metrics["slower_than_dense"]],
        "",
        "## Accuracy at each stage",
        "",
        "| stage | test accuracy |",
        "|---|---:|",
        *[f"| {k} | {v:.2%} |" for k, v in metrics["accuracy"].items()],
        "",
    ]


def _stage_lines(stages: list[dict[str, Any]], charts: dict[str, Path | None]) -> list[str]:
    """The accuracy-against-latency table of every stage and the charts that were drawn."""
    lines: list[str] = []
    if stages:
        lines += [
            "## Accuracy against measured latency, every stage",
            "",
            "Latency in ONNX Runtime (CPU execution provider, threads as recorded) and in PyTorch eager mode, median "
            "of repeated runs; each model timed in alternation with the others it is compared with.",
            "",
            "| stage | accuracy | ORT batch 1 | ORT batch 64 | PyTorch batch 1 | PyTorch batch 64 |",
            "|---|---:|---:|---:|---:|---:|",
            *[
                f"| {s['stage']} | {_pct(s['accuracy'])} | {_ms(s, 'ort', 'batch1')} | {_ms(s, 'ort', 'batch64')} | "
                f"{_ms(s, 'torch', 'batch1')} | {_ms(s, 'torch', 'batch64')} |"
                for s in stages
            ],
            "",
        ]
        if charts["tradeoff"]:
            lines += ["![accuracy against latency](tradeoff.png)", ""]
    if charts["channels"]:
        lines += ["## Channels per pruned layer", "", "![channels](channels.png)", ""]
    if charts["curves"]:
        lines += ["## Training curves", "", "![curves](curves.png)", ""]
    return lines
