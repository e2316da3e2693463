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
