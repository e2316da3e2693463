"""Turning measurements into console tables, JSON and Markdown (computing them is measure.py's job)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .console import console


def print_eval(results: dict[str, Any]) -> None:
    """Accuracy per class, the seed's torchinfo figures and latency, as printed by ``prunekit eval``."""
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
    for key, lat in results.get("latency", {}).items():
        speed = results.get("speedup", {}).get(key)
        extra = f"  speed-up {speed:.2f}x vs dense parent" if speed else ""
        console.print(
            f"latency {key}: {lat['median_ms']:.2f} ms median ({lat['images_per_s']:.0f} img/s, "
            f"{lat['threads']} threads){extra}",
            highlight=False,
        )


def seed_table(
    before: dict[str, Any],
    after: dict[str, Any],
    before_label: str = "before pruning",
    after_label: str = "after pruning",
) -> list[tuple[str, str, str]]:
    """The seed's torchinfo comparison rows: total params, mult-adds, params size, estimated total size."""
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
    layers = Table(title=f"{len(report['changed_layers'])} layers changed")
    for col in ("layer", "attribute", "channels"):
        layers.add_column(col)
    for row in layer_rows(report["changed_layers"]):
        layers.add_row(*row)
    console.print(layers)
    console.print(f"wrote {report['pruned_checkpoint']}", highlight=False)
