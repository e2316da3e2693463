"""Allocation strategies against Torch-Pruning's recipe and a dense control, every row fine-tuned alike.

    python benchmarks/allocation.py BASELINE [--seeds 0,1] [--only global-2x,...] [--commit]
    python benchmarks/allocation.py BASELINE --measure     # latency of every finished row, then table + plot

Each row prunes the baseline (or, for ``dense-control``, leaves it whole), then fine-tunes it with one recipe
(``full`` from lr 0.01, ``--epochs`` epochs, no BatchNorm recalibration, the fine-tuning seed varied). Rows
are resumable: each finished row is appended to ``results/allocation.json`` (and committed with
``--commit``), an interrupted one resumes its fine-tuning; rows of another baseline checkpoint (one trained
again) are moved under ``earlier_baselines`` first. Latency is measured in a separate pass, on a quiet
machine, dense and pruned timed in alternation. The latency-targeted rows ask for the measured latency of
the ``sensitivity`` rows (same allocation, a MACs budget), so they run after ``--measure`` has timed those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import (
    FULL_ARCHIVE,
    RESULTS,
    ROOT,
    TARGETS,
    for_baseline,
    machine,
    min_keep,
    read_results,
    require,
    rounding,
    save_results,
    scan_grid,
    torch_pruning_uniform,
)
from prunekit import api
from prunekit.checkpoint import load_checkpoint
from prunekit.measure import count_macs, count_params, latency
from prunekit.pruning import PruneRequest

# The `full` recipe's rate until 2026-12-07, which every committed row was fine-tuned from (distilled rows
# included); finetune_lr.py fine-tunes the same pruned models from the recipe's 0.025 since then.
LR = 0.01
ROWS = [
    "dense-control",
    *(f"{kind}-{t}" for t in TARGETS for kind in ("torch-pruning", "global", "uniform", "sensitivity")),
    *(f"latency-{t}" for t in TARGETS),
    # "+stem": the input conv pruned too (prunekit protects it by default; Torch-Pruning's recipe does not)
    *(f"{kind}+stem-{t}" for t in TARGETS for kind in ("global", "sensitivity")),
    # "+kd": the pruned model of the row without it, fine-tuned with the baseline as teacher (distillation)
    *(f"{kind}+kd-{t}" for t in TARGETS for kind in ("torch-pruning", "sensitivity")),
    # "+keepNN": no group planned below NN % of its channels (planning.MIN_KEEP_FRACTION; 5 % by default)
    *(f"sensitivity+keep{k}-{t}" for t in TARGETS for k in (25, 35)),
    # "+refitscan": the sensitivity scan scores each try after recovery (scan_recovery, the default since
    # 2026-12-07; the rows without it scan with BatchNorm recalibration only, the default before)
    *(f"sensitivity+refitscan-{t}" for t in TARGETS),
    # "+steps2": two prune/fine-tune rounds (each keeps the square root of the target, then half the epochs),
    # as `prunekit run --steps 2` does: the same fine-tuning budget in all; the plain scan, as the rows above
    *(f"sensitivity+steps2-{t}" for t in TARGETS),
]
# "+roundN": channel counts kept multiples of N (--round-to; ONNX Runtime's fast convolutions want 16)
# "@CRITERION" (before the target): channels scored by that criterion instead of group-l2
# "+grid9": the scan tries every tenth from 0.1 to 0.9 (9 ratios instead of the default 5)
GRIDS = {"grid9": tuple(i / 10 for i in range(1, 10))}
STEPPED = "+steps"
DISTILLED = "+kd"
LATENCY_BATCH = 64
RESULT = RESULTS / "allocation.json"


def load_results(path: Path) -> dict:
    return read_results(path, "rows", "latency")


LATENCY_ALLOCATION = "sensitivity"  # the command line's default for targets: latency rows use it too


def latency_target(results: dict, target: str) -> float | None:
    """The measured batch-64 latency of the MACs-targeted row of the same allocation, as a fraction of the
    dense model's: the latency-targeted row asks for exactly that latency."""
    prefix = f"{LATENCY_ALLOCATION}-{target}/"
    measured = [v for k, v in results["latency"].items() if k.startswith(prefix)]
    if not measured:
        return None
    return statistics.median(m[f"batch{LATENCY_BATCH}"]["ratio"] for m in measured)


def prune_row(row: str, baseline: Path, out: Path, results: dict, data: str) -> dict | None:
    """Write ``out`` (the pruned checkpoint) for ``row``; returns what the pruning reported, with its wall time."""
    kind, target = row.rsplit("-", 1)
    start = time.perf_counter()
    if kind == "torch-pruning":
        info = torch_pruning_uniform(baseline, TARGETS[target], out)
    else:
        # "@refit": that criterion; rows naming none score as they were measured (group-l2, the default
        # from 2026-12-03 until 2026-12-07 evening; rows pruned before 2026-12-03 used l2)
        kind, _, criterion = kind.partition("@")
        allocation, *modifiers = kind.split("+")
        if kind == "latency":
            fraction = latency_target(results, target)
            if fraction is None:
                print(f"{row}: skipped until --measure has timed {LATENCY_ALLOCATION}-{target}", flush=True)
                return None
            request = PruneRequest(
                target_latency=fraction,
                latency_batch=LATENCY_BATCH,
                allocation=LATENCY_ALLOCATION,
                scan_recovery=False,  # as these rows were measured (before the default recovered the scan)
            )
        else:
            request = PruneRequest(
                target_macs=TARGETS[target],
                allocation=allocation,
                prune_input_conv="stem" in modifiers,
                scan_recovery="refitscan" in modifiers,
                round_to=rounding(modifiers),
            )
        keep = next((int(m[4:]) / 100 for m in modifiers if m.startswith("keep")), None)
        with min_keep(keep), scan_grid(next((GRIDS[m] for m in modifiers if m in GRIDS), None)):
            report = api.prune_checkpoint(
                baseline, request, importance=criterion or "group-l2", data=data, out=out, overwrite=True
            )
        info = {"request": report["request"], "macs_ratio": report["macs"]["ratio"], "scan": report["scan"]}
        if report.get("latency"):  # what the latency target measured: plans tried, fast counts per group
            info["latency_target"] = report["latency"]
    return {**info, "prune_s": time.perf_counter() - start}


def run_stepped_row(row: str, seed: int, args: argparse.Namespace, results: dict) -> dict:
    """A ``+stepsN`` row: N rounds of pruning (each to the N-th root of the target, of the model before it)
    and fine-tuning (``epochs // N`` each), every round's output kept so an interrupted row resumes."""
    kind, target = row.rsplit("-", 1)
    steps = int(kind.partition(STEPPED)[2])
    out, source, prune_s = Path(args.runs_dir) / row / f"seed{seed}", args.baseline, 0.0
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        pruned, finetune = out / f"pruned-{step}.safetensors", out / f"finetune-{step}"
        if not pruned.exists():
            began = time.perf_counter()
            # the plain scan, as the one-round sensitivity rows it is compared with
            keep = TARGETS[target] ** (1 / steps)
            request = PruneRequest(target_macs=keep, allocation="sensitivity", scan_recovery=False)
            api.prune_checkpoint(source, request, data=args.data, out=pruned, overwrite=True)
            prune_s += time.perf_counter() - began
        if not (finetune / "model.safetensors").exists():
            resume = (finetune / "checkpoint.safetensors").exists()
            api.finetune_checkpoint(
                pruned,
                finetune,
                recipe="full",
                epochs=args.epochs // steps,
                lr=LR,
                recalibrate=False,
                data=args.data,
                seed=seed,
                resume=resume,
                overwrite=not resume,
            )
        source = finetune / "model.safetensors"
    accuracy = api.evaluate_checkpoint(source, data=args.data, measure_latency=False)["accuracy"]
    return _finished_row(row, seed, args, source, {"prune_s": prune_s, "steps": steps}, start, accuracy, None)


def run_row(row: str, seed: int, args: argparse.Namespace, results: dict) -> dict | None:
    out = Path(args.runs_dir) / row / f"seed{seed}"
    distilled, pruning = DISTILLED in row, row.replace(DISTILLED, "")  # "+kd": that row's pruned model
    pruned_by = Path(args.runs_dir) / pruning / f"seed{seed}"
    pruned = pruned_by / "pruned.safetensors"
    info_file = pruned_by / "pruned.info.json"
    if row == "dense-control":
        source, info = args.baseline, {"prune_s": 0.0}
    elif info_file.exists():  # pruned before an interruption: the fine-tuning resumes below
        source, info = pruned, json.loads(info_file.read_text())
    else:
        info = prune_row(pruning, args.baseline, pruned, results, args.data)
        if info is None:
            return None
        info_file.write_text(json.dumps(info, indent=1))
        source = pruned
    finetune = out / "finetune"
    start = time.perf_counter()
    result = api.finetune_checkpoint(
        source,
        finetune,
        recipe="full",
        epochs=args.epochs,
        lr=LR,
        recalibrate=False,
        data=args.data,
        seed=seed,
        teacher=args.baseline if distilled else None,
        distill=True if distilled else None,
        resume=(finetune / "checkpoint.safetensors").exists(),
        overwrite=not (finetune / "checkpoint.safetensors").exists(),
    )
    accuracy, before = result["accuracy"]["finetuned"], result["accuracy"]["pruned"]
    return _finished_row(row, seed, args, finetune / "model.safetensors", info, start, accuracy, before)


def _finished_row(
    row: str,
    seed: int,
    args: argparse.Namespace,
    model_file: Path,
    info: dict,
    start: float,
    accuracy: float,
    before: float | None,
) -> dict:
    """A finished row's entry: the fine-tuned model's test accuracy and its size against the baseline's."""
    model = load_checkpoint(model_file).model
    dense = load_checkpoint(args.baseline).model
    size = 32
    return {
        "row": row,
        "seed": seed,
        **info,
        "accuracy": accuracy,
        "accuracy_before_finetuning": before,
        "macs": count_macs(model, size),
        "params": count_params(model),
        "macs_ratio": count_macs(model, size) / count_macs(dense, size),
        "params_ratio": count_params(model) / count_params(dense),
        "finetune_s": time.perf_counter() - start,
        "checkpoint": str(model_file),
        "date": machine()["date"],
    }


def measure(results: dict, baseline: Path, repeats: int, redo: bool) -> None:
    """Batch-1 and batch-64 latency of every finished row, each timed in alternation with the dense parent."""
    dense = load_checkpoint(baseline).model
    for key, row in results["rows"].items():
        if key in results["latency"] and not redo:
            continue
        model = load_checkpoint(row["checkpoint"]).model
        entry = {}
        for batch in (1, LATENCY_BATCH):
            d, p = latency([dense, model], 32, batch_size=batch, repeats=repeats)
            entry[f"batch{batch}"] = {
                "dense_ms": d["median_ms"],
                "pruned_ms": p["median_ms"],
                "ratio": p["median_ms"] / d["median_ms"],
                "speedup": d["median_ms"] / p["median_ms"],
                "threads": p["threads"],
                "repeats": repeats,
            }
        results["latency"][key] = entry
        print(key, {b: round(v["speedup"], 3) for b, v in entry.items()}, flush=True)


def table(results: dict) -> str:
    """Markdown: one line per row, mean and spread over seeds."""
    by_row: dict[str, list[str]] = {}
    for key in results["rows"]:
        by_row.setdefault(key.split("/")[0], []).append(key)
    control = [results["rows"][k]["accuracy"] for k in by_row.get("dense-control", [])]
    ref = statistics.mean(control) if control else None
    lines = [
        "| row | seeds | accuracy % (each seed) | vs dense control | MACs | params | speed-up b1 | speed-up b64 "
        "| pruning s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        keys = by_row.get(row)
        if not keys:
            continue
        rows = [results["rows"][k] for k in keys]
        accs = [r["accuracy"] * 100 for r in rows]
        lat = [results["latency"][k] for k in keys if k in results["latency"]]

        def speed(batch: str, lat=lat) -> str:
            return f"{statistics.median(m[batch]['speedup'] for m in lat):.2f}x" if lat else "-"

        delta = f"{statistics.mean(accs) - ref * 100:+.2f}" if ref is not None else "-"
        lines.append(
            f"| {row} | {len(rows)} | {statistics.mean(accs):.2f} ({', '.join(f'{a:.2f}' for a in accs)}) "
            f"| {delta} | {statistics.mean(r['macs_ratio'] for r in rows):.3f} "
            f"| {statistics.mean(r['params_ratio'] for r in rows):.3f} | {speed('batch1')} "
            f"| {speed(f'batch{LATENCY_BATCH}')} | {statistics.mean(r['prune_s'] for r in rows):.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Accuracy against measured batch-64 latency, every row and seed, with the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for key, row in results["rows"].items():
        if key in results["latency"]:
            ms = results["latency"][key][f"batch{LATENCY_BATCH}"]["pruned_ms"]
            points.append((ms, row["accuracy"] * 100, key.split("/")[0]))
    if not points:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(p[2] for p in points):
        xs = [p[0] for p in points if p[2] == name]
        ys = [p[1] for p in points if p[2] == name]
        ax.scatter(xs, ys, label=name, s=28)
    front, best = [], -1.0
    for ms, acc, _ in sorted(points):
        if acc > best:
            front.append((ms, acc))
            best = acc
    ax.plot(*zip(*front, strict=True), "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel(
        f"measured latency at batch {LATENCY_BATCH}, ms (PyTorch, {torch.get_num_threads()} threads)"
    )
    ax.set_ylabel("CIFAR-10 test accuracy, %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path)
    parser.add_argument("--data", default=str(FULL_ARCHIVE))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", default=",".join(ROWS))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "allocation"))
    parser.add_argument("--measure", action="store_true", help="time the finished rows; write table and plot")
    parser.add_argument("--remeasure", action="store_true", help="with --measure: time rows timed before too")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--commit", action="store_true", help="git-commit the results file after each row")
    parser.add_argument("--results", type=Path, default=RESULT)
    args = parser.parse_args()
    if args.data == str(FULL_ARCHIVE):
        require(FULL_ARCHIVE)
    kept = ("rows", "latency", "recipe", "baseline", "machine")
    results = for_baseline(load_results(args.results), args.baseline, kept)
    results.setdefault("latency", {})
    results["commands"] = sorted(
        set(results.get("commands", []))
        | {
            f"python benchmarks/allocation.py {args.baseline}",
            f"python benchmarks/allocation.py {args.baseline} --measure",
        }
    )
    results["recipe"] = {"finetune": "full", "epochs": args.epochs, "lr": LR, "recalibrate": False}
    baseline = load_checkpoint(args.baseline).meta.get("metrics", {})
    results["baseline"] = {"checkpoint": str(args.baseline), "accuracy": baseline.get("test_accuracy")}
    save_results(args.results, results, None)  # rows of an earlier baseline moved aside before any row runs
    if args.measure:
        measure(results, args.baseline, args.repeats, args.remeasure)
        args.results.with_suffix(".md").write_text(table(results))
        plot(results, args.results.with_suffix(".png"))
        save_results(args.results, results, "bench: allocation latency" if args.commit else None)
        print(table(results))
        return
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in [r for r in ROWS if r in args.only.split(",")]:
            key = f"{row}/seed{seed}"
            if key in results["rows"]:
                continue
            print(f"== {key}", flush=True)
            entry = (run_stepped_row if STEPPED in row else run_row)(row, seed, args, results)
            if entry is None:
                continue
            results = {
                **load_results(args.results),
                **{k: v for k, v in results.items() if k not in ("rows", "latency")},
            }
            results["rows"][key] = entry
            save_results(args.results, results, f"bench: allocation row {key}" if args.commit else None)
            print(json.dumps({key: entry["accuracy"]}), flush=True)


if __name__ == "__main__":
    main()
