"""Turning measurements into console tables, JSON and Markdown (computing them is measure.py's job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from .console import console
from .measure import MACS_MEANING
from .plots import plot_channels, plot_curves, plot_tradeoff


def print_eval(results: dict[str, Any]) -> None:
    """Accuracy per class, the blog's torchinfo figures and latency, as printed by ``prunekit eval``."""
    console.print(results["summary_table"], highlight=False, markup=False)
    table = Table(title=f"{results['model']}: top-1 accuracy on {results['test_images']} test images")
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in results["per_class"].items():
        table.add_row(name, f"{acc:.2%}")
    table.add_row("[bold]overall", f"[bold]{results['accuracy']:.2%}")
    console.print(table)
    s = results["summary"]
    console.print(
        f"params {s['total_params']:,}  mult-adds {s['mult_adds'] / 1e6:.2f} M  params size "
        f"{s['params_size_mb']:.2f} MB  estimated total size {s['estimated_total_size_mb']:.2f} MB  "
        f"file {results['file_size_mb']:.2f} MB",
        highlight=False,
    )
    for runtime, prefix in (("PyTorch eager", ""), ("ONNX Runtime", "ort_")):
        for key, lat in results.get(f"{prefix}latency", {}).items():
            speed = results.get(f"{prefix}speedup", {}).get(key)
            extra = f"  speed-up {speed:.2f}x vs dense parent" if speed else ""
            console.print(
                f"latency {key} ({runtime}): {lat['median_ms']:.2f} ms median ({lat['images_per_s']:.0f} img/s, "
                f"{lat['threads']} threads){extra}",
                highlight=False,
            )


def print_quantize(report: dict[str, Any]) -> None:
    """The deployment table of ``prunekit quantize``: accuracy, size and ONNX Runtime latency per stage."""
    from rich.table import Table

    rt = report["runtime"]
    table = Table(title=f"ONNX Runtime ({rt['provider']}, {rt['threads']} threads)")
    for col in ("model", "accuracy", "size on disk", "batch 1", "batch 64"):
        table.add_column(col, justify="left" if col == "model" else "right")
    labels = {
        "dense_fp32": "dense parent, fp32",
        "fp32": "this checkpoint, fp32",
        "int8": "this checkpoint, int8",
    }
    for name, row in report["rows"].items():
        acc = "" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        lat = row["latency"]
        table.add_row(
            labels.get(name, name),
            acc,
            f"{row['size_mb']:.2f} MB",
            f"{lat['batch1']['median_ms']:.3f} ms",
            f"{lat['batch64']['median_ms']:.2f} ms",
        )
    console.print(table)
    for t in report["tries"]:
        console.print(
            f"  int8 tried {t['name']}: {t['accuracy']:.2%} ({-t['drop_points']:+.2f} points against fp32)",
            highlight=False,
        )
    speed = report["speedup_vs_dense_fp32"]
    console.print(
        f"int8 model {report['int8_model']}: {speed['batch1']:.2f}x / {speed['batch64']:.2f}x faster than "
        f"{'the dense' if 'dense_fp32' in report['rows'] else 'its own'} fp32 model at batch 1 / 64",
        highlight=False,
    )


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


def layer_rows(changed: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(layer, attribute, 'before -> after') for every layer pruning changed."""
    return [
        (c["layer"], attr, f"{change[0]} -> {change[1]}")
        for c in changed
        for attr, change in c.items()
        if attr != "layer"
    ]


def print_scan(result: dict[str, Any]) -> None:
    """One line per group of a sensitivity scan: the points of accuracy lost at each ratio."""
    dense, ratios = result["dense_accuracy"], ",".join(f"{r:g}" for r in result["ratios"])
    for name, row in result["groups"].items():
        if "skipped" in row:
            console.print(f"{name:28s} skipped: {row['skipped']}", highlight=False)
            continue
        drops = "  ".join(f"{(dense - a) * 100:+6.2f}" for a in row["accuracy"])
        console.print(f"{name:28s} points lost at {ratios}: {drops}", highlight=False)


def print_prune(report: dict[str, Any]) -> None:
    """The before/after summary and the per-layer channel table of ``prunekit prune``."""
    table = Table(title=f"{report['model']} pruned by {report['importance']}")
    for col in ("", "before pruning", "after pruning"):
        table.add_column(col, justify="right" if col else "left")
    for row in seed_table(report["before"], report["after"]):
        table.add_row(*row)
    table.add_row(
        "MACs (conv+linear)",
        f"{report['macs']['before'] / 1e6:.2f} M",
        f"{report['macs']['after'] / 1e6:.2f} M ({report['macs']['ratio']:.1%})",
    )
    console.print(table)
    console.print(MACS_MEANING, highlight=False, style="dim")
    layers = Table(title=f"{len(report['changed_layers'])} layers changed")
    for col in ("layer", "attribute", "channels"):
        layers.add_column(col)
    for row in layer_rows(report["changed_layers"]):
        layers.add_row(*row)
    console.print(layers)
    if report.get("latency"):
        lat = report["latency"]
        last = lat["attempts"][-1]
        console.print(
            f"latency at batch {lat['batch']} in {lat['runtime']} ({lat['threads']} threads), measured: "
            f"{last['dense_ms']:.2f} -> {last['pruned_ms']:.2f} ms ({last['measured']:.3f} of dense, target "
            f"{lat['target']}; {len(lat['attempts'])} plan(s))",
            highlight=False,
        )
    if report.get("reconstruction"):
        rec = report["reconstruction"]
        fits = rec["layers"]
        before = sum(f["error_before"] for f in fits) / max(len(fits), 1)
        after = sum(f["error_after"] for f in fits) / max(len(fits), 1)
        console.print(
            f"recovery without labels: {len(fits)} layers re-fitted to the dense model's outputs on "
            f"{rec['images']} training images ({rec['seconds']:.1f} s; mean "
            f"relative output error on held-out images {before:.3f} -> {after:.3f})",
            highlight=False,
        )
        if rec.get("batchnorm"):
            bn = rec["batchnorm"]
            console.print(
                f"BatchNorm statistics {bn['chosen']}: KL divergence from the dense model on {bn['images']} "
                f"held-out images {bn['kl_kept']:.4f} with the dense statistics, {bn['kl_re_estimated']:.4f} "
                f"re-estimated",
                highlight=False,
            )
    console.print(f"wrote {report['pruned_checkpoint']}", highlight=False)


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
