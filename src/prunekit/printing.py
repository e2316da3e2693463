"""Console printers: the tables and summaries the commands print (the Markdown run report is report.py's)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .console import console, note
from .measure import MACS_MEANING
from .report import seed_table


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
    note(results.get("note"))


def print_quantize(report: dict[str, Any]) -> None:
    """The deployment table of ``prunekit quantize``: accuracy, size and ONNX Runtime latency per stage."""
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
