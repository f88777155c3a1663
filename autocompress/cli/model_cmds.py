"""``space``, ``profile`` and ``apply``: one typed function each, calling the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from autocompress.cli.app import app, console, guard

ModelOpt = typer.Option(..., "--model", "-m", help="builtin:NAME, torchvision:NAME or path/to/file.py:factory")
ShapeOpt = typer.Option(None, "--input-shape", help="N,C,H,W (defaults per model source)")
LeafOpt = typer.Option([], "--leaf", help="module path to keep as one opaque layer when tracing (repeatable)")
TaskOpt = typer.Option(None, "--task", help="file.py:factory returning an autocompress.Task (its example_input "
                                            "replaces --input-shape)")


def _shape(text: Optional[str]):
    from autocompress.models.sources import parse_input_shape

    return parse_input_shape(text) if text else None


def _ready(target: str) -> None:
    """An uncalibrated ``local`` is calibrated here, with a line per stage, before the command's own work."""
    from autocompress.hwmodels.first_use import ready_target

    import sys

    # stderr: stdout may carry --json
    ready_target(target, progress=lambda text: print(f"calibrating local on first use: {text}", file=sys.stderr,
                                                     flush=True))


def _example(task: Optional[str], input_shape: Optional[str]):
    """The task's example input, or None; a task and a shape together are refused."""
    if not task:
        return None
    from autocompress.errors import UserInputError
    from autocompress.evaluators.task import load_task

    if input_shape:
        raise UserInputError("--task and --input-shape both given: the task's example_input is the model's input; "
                             "drop --input-shape")
    return load_task(task).example_input


@app.command()
@guard
def space(model: str = ModelOpt, input_shape: Optional[str] = ShapeOpt, leaf: list[str] = LeafOpt,
          task: Optional[str] = TaskOpt,
          as_json: bool = typer.Option(False, "--json", help="print the space as JSON")) -> None:
    """List the search space's decisions for a model."""
    from autocompress.api import open_model

    ws = open_model(model, input_shape=_shape(input_shape), leaf=leaf, example_input=_example(task, input_shape))
    data = ws.space.to_json()
    if as_json:
        print(json.dumps(data))
        return
    counts: dict[str, int] = {}
    for d in ws.space.decisions:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    table = Table(title=f"{model}: {len(ws.space)} decisions ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    for col in ("id", "kind", "layers", "choices"):
        table.add_column(col, overflow="fold")
    for d in ws.space.decisions:
        layers = ", ".join(d.layers[:3]) + (f" (+{len(d.layers) - 3})" if len(d.layers) > 3 else "")
        table.add_row(d.id, d.kind, layers, " ".join(str(c) for c in d.choices))
    console.print(table)
    if data.get("not_compressible"):
        rest = Table(title=f"not compressible: {len(data['not_compressible'])} layers (no decision covers them)")
        for col in ("layer", "op", "MACs", "params", "reason"):
            rest.add_column(col, justify="right" if col in ("MACs", "params") else "left", overflow="fold")
        for row in data["not_compressible"]:
            rest.add_row(row["layer"], row["op"], f"{row['macs']:,}", f"{row['params']:,}", row["reason"])
        console.print(rest)


@app.command()
@guard
def profile(model: str = ModelOpt, target: str = typer.Option("mobile", "--target", "-t"),
            policy: Optional[Path] = typer.Option(None, "--policy", help="costs after this policy"),
            batch: int = typer.Option(1, "--batch", min=1), input_shape: Optional[str] = ShapeOpt,
            leaf: list[str] = LeafOpt, weights: Optional[Path] = typer.Option(None, "--weights"),
            task: Optional[str] = TaskOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Per-layer and total MACs, params, bytes, predicted latency and energy."""
    from autocompress.api import open_model, profile as run_profile
    from autocompress.space.policy import Policy

    _ready(target)
    pol = Policy.load(policy) if policy else None
    ws = open_model(model, weights=weights, input_shape=_shape(input_shape), leaf=leaf,
                    options=dict(pol.options) if pol else None, example_input=_example(task, input_shape))
    data = run_profile(ws, target, pol, batch)
    if as_json:
        print(json.dumps(data))
        return
    t = data["totals"]
    table = Table(title=f"{model} on {data['target']} (batch {batch})")
    table.caption = "BN, activations and adds that run fused into a conv's kernel are counted in its row"
    for col in ("layer", "op", "MACs", "params", "bits w/a", "latency ms", "energy mJ"):
        table.add_column(col, justify="left" if col in ("layer", "op") else "right")
    for row in data["layers"]:
        if row["op"] in ("conv", "linear") or row["latency_ms"] > 0:
            table.add_row(row["name"], row["op"], f"{row['macs']:,}", f"{row['params']:,}",
                          f"{row['wbits']}/{row['abits']}" if row["op"] in ("conv", "linear") else "",
                          f"{row['latency_ms']:.3f}", f"{row['energy_mj']:.4f}")
    table.add_row("total", "", f"{t['macs']:,}", f"{t['params']:,}", "", f"{t['latency_ms']:.3f}",
                  f"{t['energy_mj']:.4f}", style="bold")
    console.print(table)
    console.print(f"weights {t['weight_bytes'] / 1e6:.2f} MB, peak activations {t['peak_activation_bytes'] / 1e6:.2f} MB")


@app.command()
@guard
def apply(model: str = ModelOpt, policy: Path = typer.Option(..., "--policy"),
          out: Path = typer.Option(..., "--out"), weights: Optional[Path] = typer.Option(None, "--weights"),
          data: Optional[str] = typer.Option(None, "--data", help="fine-tune with distillation on this data"),
          task: Optional[str] = typer.Option(None, "--task", help="file.py:factory returning an autocompress.Task: "
                                                                    "fine-tune and score with your metric"),
          target: str = typer.Option("mobile", "--target", "-t"), epochs: float = typer.Option(1.0, "--epochs"),
          input_shape: Optional[str] = ShapeOpt, leaf: list[str] = LeafOpt,
          seed: int = typer.Option(0, "--seed"),
          measure: bool = typer.Option(True, "--measure/--no-measure",
                                       help="time the written files in ONNX Runtime on this machine"),
          static_shapes: bool = typer.Option(False, "--static-shapes",
                                             help="ONNX files with every dimension fixed at the model's input "
                                                  "shape (NNAPI, Core ML, QNN, TFLite converters)")) -> None:
    """Apply a policy and write the compressed model (fine-tunes when data is given)."""
    from autocompress.api import apply_policy

    _ready(target)
    result = apply_policy(model, policy, out, weights=weights, data=data, target=target, epochs=epochs,
                          input_shape=_shape(input_shape), leaf=leaf, seed=seed, measure=measure, task=task,
                          static_shapes=static_shapes)
    b, a = result["baseline"], result["best"]
    table = Table(title=f"{model} -> {out}")
    for col in ("", "MACs", "params", "size MB", f"{target} ms", "local ms", result.get("metric", "accuracy")):
        table.add_column(col, justify="right")
    for name, r in (("before", b), ("after", a)):
        acc = f"{r['accuracy']:.4f}" if "accuracy" in r else "-"
        local = f"{r['measured_latency_ms_local']:.2f}" if "measured_latency_ms_local" in r else "-"
        table.add_row(name, f"{r['macs']:,}", f"{r['params']:,}", f"{r['size_bytes'] / 1e6:.2f}",
                      f"{r['latency_ms']:.2f}", local, acc)
    console.print(table)
