"""Every classification model prunekit builds, end to end: train step, prune to half the MACs, reload, ONNX.

One command, resumable: each model runs in its own process under a time limit, and its row lands in
``results/model_sweep.json`` (and the Markdown table beside it) as soon as it finishes.

    OMP_NUM_THREADS=1 python benchmarks/model_sweep.py            # every model not yet in the results
    OMP_NUM_THREADS=1 python benchmarks/model_sweep.py --only resnet18,vit_b_16   # redo some rows
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

NAME = "model_sweep"
STEPS = ("build", "train", "prune", "reload", "onnx")
CANDIDATE_SIZES = (64, 96, 128, 224, 299)  # tried in turn when a model refuses its minimum size
ONNX_TOLERANCE = 1e-3  # max abs difference relative to the largest output


def one_line(exc: BaseException) -> str:
    """An exception as one short line for the table."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def pick_input_size(name: str, model) -> int:
    """The model's minimum input size, or the first larger candidate its forward pass accepts."""
    import torch

    from prunekit.models import min_input_size

    first = min_input_size(name)
    model.eval()
    for size in (first, *[s for s in CANDIDATE_SIZES if s > first]):
        try:
            with torch.no_grad():
                model(torch.randn(1, 3, size, size))
            return size
        except Exception:
            continue
    raise RuntimeError(f"no input size in {first}..{CANDIDATE_SIZES[-1]} runs")


def train_step(model, size: int) -> None:
    """One SGD step on a random batch of 2: the model trains (backward works) before and after pruning."""
    import torch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    out = model(torch.randn(2, 3, size, size))
    logits = out.logits if hasattr(out, "logits") else out
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    # BatchNorm over a batch of 2 at 1x1 spatial size gives huge gradients on random weights; clip them so
    # one step does not turn the weights into NaN (the step checks that training works, not what it learns)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def grouped_convs(model) -> dict[str, tuple[int, int, int]]:
    """(in, out, groups) of each grouped conv that is not depthwise."""
    import torch.nn as nn

    return {
        n: (m.in_channels, m.out_channels, m.groups)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels
    }


def meta_for(name: str, size: int) -> dict[str, Any]:
    return {
        "model": name,
        "num_classes": 10,
        "classes": [str(i) for i in range(10)],
        "input_size": size,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }


def reload_in_fresh_process(ckpt: Path, io_file: Path, timeout: float, env: dict | None = None) -> str:
    """Load ``ckpt`` in a new interpreter and compare its output on the saved input: 'ok' or the reason."""
    cmd = [sys.executable, __file__, "--reload-check", str(ckpt), str(io_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines and lines[-1] == "ok":
        return "ok"
    tail = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return tail[:300]


def reload_check(ckpt: str, io_file: str) -> int:
    """Child side of the reload step: prints 'ok' when the reloaded model's output is bitwise identical."""
    import torch
    from safetensors.torch import load_file

    from prunekit.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    io = load_file(io_file)
    try:
        model = load_checkpoint(ckpt).model
        with torch.no_grad():
            got = model(io["x"])
    except Exception as exc:
        print(one_line(exc))
        return 1
    if not torch.equal(got, io["y"]):
        print(f"outputs differ after reload (max abs diff {float((got - io['y']).abs().max()):.3g})")
        return 1
    print("ok")
    return 0


def onnx_check(ckpt: Path, x, expected) -> tuple[str, float | None]:
    """Export through prunekit and run ONNX Runtime on ``x``: 'ok' when within tolerance of ``expected``."""
    import onnxruntime as ort

    from prunekit.export import export_checkpoint

    out = export_checkpoint(ckpt, "onnx", ckpt.with_suffix(".onnx"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    scale = float(expected.abs().max()) or 1.0
    diff = float(abs(got - expected.numpy()).max()) / scale
    return ("ok" if diff < ONNX_TOLERANCE else f"ONNX Runtime differs by {diff:.2g} (relative)"), diff


def run_steps(
    name: str, row: dict[str, Any], emit: Callable[[], None], timeout: float, env: dict | None = None
) -> None:
    """The steps for one model, recording each outcome in ``row`` (``emit`` saves it after each step);
    ``env`` is the environment of the fresh process that reloads the checkpoint."""
    import torch
    from safetensors.torch import save_file

    import prunekit
    from prunekit.checkpoint import save_checkpoint
    from prunekit.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 10)
    size = pick_input_size(name, model)
    row.update(build="ok", input_size=size, params=sum(p.numel() for p in model.parameters()))
    emit()
    try:
        train_step(model, size)
        row["train"] = "ok"
    except Exception as exc:
        row["train"] = one_line(exc)
    emit()
    example = torch.randn(1, 3, size, size)
    grouped = grouped_convs(model)
    try:
        report = prunekit.prune(model, example, target_macs=0.5)
        if grouped:  # how many grouped convs (1 < groups < channels) lost channels, groups kept
            after = grouped_convs(model)
            row["grouped_pruned"] = f"{sum(after[n] != grouped[n] for n in grouped)}/{len(grouped)}"
        row.update(
            prune="ok", macs_ratio=round(report.macs_ratio, 4), params_ratio=round(report.params_ratio, 4)
        )
        train_step(model, size)  # the pruned model still trains
    except Exception as exc:
        row["prune"] = one_line(exc)
    emit()
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            y = model(x)
        try:
            save_checkpoint(ckpt, model, meta_for(name, size))
            save_file({"x": x, "y": y.contiguous()}, str(Path(tmp) / "io.safetensors"))
            row["reload"] = reload_in_fresh_process(ckpt, Path(tmp) / "io.safetensors", timeout, env)
        except Exception as exc:
            row["reload"] = one_line(exc)
        emit()
        try:
            row["onnx"], row["onnx_rel_diff"] = onnx_check(ckpt, x, y)
        except Exception as exc:
            row["onnx"] = one_line(exc)
        emit()


def worker(name: str, row_file: str, timeout: float) -> int:
    """Run one model's steps, writing its (partial) row to ``row_file`` after every step."""
    import torch

    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}
    start = time.perf_counter()

    def emit() -> None:
        row["seconds"] = round(time.perf_counter() - start, 1)
        Path(row_file).write_text(json.dumps(row))

    try:
        run_steps(name, row, emit, timeout)
    except Exception as exc:
        row.setdefault("build", one_line(exc))
    emit()
    return 0


def run_model(name: str, timeout: float) -> dict[str, Any]:
    """One model in its own process; on timeout, the steps it finished plus 'timeout' for the one it was in."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        row_file = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", name, str(row_file), "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=timeout)
        crashed = proc.returncode != 0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its reload child
        proc.communicate()
        err, crashed = b"", None
    try:
        row = json.loads(row_file.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        row = {}
    row_file.unlink(missing_ok=True)
    row["model"] = name
    pending = next((s for s in STEPS if s not in row), None)
    if pending is not None:
        if crashed is None:
            row[pending] = f"timeout: over {timeout:.0f} s in total"
            row["seconds"] = timeout
        else:
            tail = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            row[pending] = f"worker died (exit {proc.returncode}): {tail[:200]}"
    return row


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": {}}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|") if value is not None else ""


def markdown(results: dict[str, Any]) -> str:
    """The results as a table: one row per model, each step ok or the reason it failed."""
    rows = results["rows"]
    counts = {s: sum(1 for r in rows.values() if r.get(s) == "ok") for s in STEPS[1:]}
    lines = [
        "# Model sweep: every torchvision classifier through prunekit",
        "",
        f"{len(rows)} models; generated by `benchmarks/model_sweep.py` from `model_sweep.json`. "
        "Random weights, 10 classes, one thread. Passing: "
        + ", ".join(f"{s} {n}/{len(rows)}" for s, n in counts.items())
        + ".",
        "",
        "| model | input | train step | prune 0.5 (MACs ratio) | grouped convs pruned | reload | ONNX | reason | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in sorted(rows):
        r = rows[name]
        marks = {s: "ok" if r.get(s) == "ok" else ("fail" if s in r else "-") for s in STEPS}
        prune = f"ok ({r['macs_ratio']:.3f})" if r.get("prune") == "ok" else marks["prune"]
        reasons = [f"{s}: {r[s]}" for s in STEPS if s in r and r[s] != "ok"]
        lines.append(
            f"| {name} | {_cell(r.get('input_size'))} | {marks['train']} | {prune} | {_cell(r.get('grouped_pruned'))} | "
            f"{marks['reload']} | "
            f"{marks['onnx']} | {_cell('; '.join(reasons))} | {_cell(r.get('seconds'))} |"
        )
    return "\n".join(lines) + "\n"


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    path.with_suffix(".md").write_text(markdown(results))


SLOW_FAMILIES = ("swin", "vit_", "maxvit")  # 224 px transformers: last, so one stall delays nothing else


def sweep_order(names: list[str]) -> list[str]:
    """The CNNs first, the slow transformers last; alphabetical within each."""
    return sorted(names, key=lambda n: (n.startswith(SLOW_FAMILIES), n))


def sweep(names: list[str], path: Path, timeout: float) -> None:
    machine_info = machine()
    for name in sweep_order(names):
        print(f"{name} ...", flush=True)
        row = run_model(name, timeout)
        results = load_results(path)  # re-read: another sweep (--only) may have landed rows meanwhile
        results.update(machine=machine_info, timeout_s=timeout)
        results["rows"][name] = row
        save_results(path, results)
        print("  " + ", ".join(f"{s}={row.get(s)}" for s in STEPS), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated model names to (re)do")
    p.add_argument("--timeout", type=float, default=300, help="seconds per model, all steps together")
    p.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--reload-check", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(*args.worker, args.timeout)
    if args.reload_check:
        return reload_check(*args.reload_check)
    from prunekit.models import available_models

    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    else:
        done = load_results(args.out)["rows"]
        names = [n for n in available_models() if n not in done]
    sweep(names, args.out, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
