"""The Python API the CLI is a thin shell over: load, space, profile, apply."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import nn

from autocompress.models import LoadedModel, load_model
from autocompress.space.graph import ModelGraph, trace
from autocompress.space.policy import Policy
from autocompress.space.space import SearchSpace, build_space


@dataclass
class Workspace:
    """A loaded model, its traced graph and its search space."""

    loaded: LoadedModel
    space: SearchSpace

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def graph(self) -> ModelGraph:
        return self.space.graph


def open_model(spec: str, *, weights: str | os.PathLike | None = None, input_shape: tuple[int, ...] | None = None,
               leaf: Iterable[str] = (), options: dict[str, Any] | None = None, pretrained: bool = False) -> Workspace:
    """Load ``spec``, trace it and build its search space.

    ``pretrained`` asks for a built-in model's trained weights (trained and
    cached on first use) when no weights file is given.
    """
    loaded = load_model(spec, weights=weights, input_shape=input_shape)
    if pretrained and weights is None and spec.startswith("builtin:"):
        from autocompress.evaluators.train import pretrained_builtin

        loaded.model = pretrained_builtin(spec.partition(":")[2]).eval()
    graph = trace(loaded.model, loaded.input_shape, leaf_paths=leaf)
    return Workspace(loaded, build_space(graph, spec, options=options))


def profile(ws: Workspace, target: str = "mobile", policy: Policy | None = None, batch: int = 1) -> dict[str, Any]:
    """Per-layer and total costs (``profile --json`` format), for the model or under ``policy``."""
    from autocompress.compress import estimate
    from autocompress.compress.apply import base_table
    from autocompress.hwmodels import get_target, predict

    tgt = get_target(target)
    table = estimate(ws.space, policy.validate(ws.space)) if policy else base_table(ws.space)
    pred = predict(table, tgt, batch=batch)
    per_layer = {lp.name: lp for lp in pred.layers}
    totals = table.totals()
    layers = []
    for row in table:
        if row.op in ("input", "getitem"):
            continue
        lp = per_layer.get(row.name)
        layers.append({"name": row.target if row.op in ("conv", "linear", "bn") else row.name, "op": row.op,
                       "macs": row.macs * batch, "params": row.params, "wbits": row.wbits, "abits": row.abits,
                       "latency_ms": lp.latency_ms if lp else 0.0, "energy_mj": lp.energy_mj if lp else 0.0,
                       "fused_into": getattr(lp, "fused_into", None) if lp else None})
    return {
        "model": ws.space.model, "target": tgt.name, "batch": batch,
        "policy": policy.to_json()["decisions"] if policy else None,
        "totals": {"macs": totals["macs"] * batch, "params": totals["params"],
                   "weight_bytes": totals["weight_bytes"], "peak_activation_bytes": totals["peak_activation_bytes"] * batch,
                   "latency_ms": pred.latency_ms, "energy_mj": pred.energy_mj},
        "layers": layers,
    }


def cost_summary(table: Any, target: str) -> dict[str, Any]:
    """The contract's cost fields of one model variant on ``target`` (predicted)."""
    from autocompress.hwmodels import get_target, predict

    pred = predict(table, get_target(target))
    totals = table.totals()
    return {"latency_ms": pred.latency_ms, "energy_mj": pred.energy_mj, "size_bytes": int(totals["weight_bytes"]),
            "macs": int(totals["macs"]), "params": int(totals["params"])}


def measure_local(paths: Sequence[str | os.PathLike]) -> list[float]:
    """Quiet ONNX Runtime latency (ms) of each file on this machine, at the ``local`` target's thread
    count: ``calibrate.measure_files``, the files interleaved over 4 passes, so a slow stretch of a
    shared machine does not fall on one of them only, and the latency is what ``local`` predicts."""
    from autocompress.hwmodels import get_target
    from autocompress.hwmodels.calibrate import measure_files

    threads = int(get_target("local").to_json().get("threads", 1) or 1)
    return measure_files([Path(p) for p in paths], threads=threads)


def record_measured(folder: Path, teacher: Any, example: Any, best: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Time the output folder's fp32 (and int8) model beside the original model with ``measure_local``
    and record ``measured_latency_ms_local[_int8]`` in ``best`` and ``baseline``."""
    from autocompress.export.onnx import export_onnx

    base_onnx = export_onnx(teacher, example, folder / ".baseline.onnx")
    try:
        keys = {"best": folder / "model.onnx", "best_int8": folder / "model.int8.onnx", "baseline": base_onnx}
        keys = {k: p for k, p in keys.items() if p.exists()}
        ms = dict(zip(keys, measure_local(list(keys.values()))))
    finally:
        base_onnx.unlink(missing_ok=True)
    best["measured_latency_ms_local"] = ms["best"]
    if "best_int8" in ms:
        best["measured_latency_ms_local_int8"] = ms["best_int8"]
    baseline["measured_latency_ms_local"] = ms["baseline"]


def apply_policy(spec: str, policy_path: str | os.PathLike, out: str | os.PathLike, *,
                 weights: str | os.PathLike | None = None, data: str | None = None, target: str = "mobile",
                 input_shape: tuple[int, ...] | None = None, leaf: Iterable[str] = (), epochs: float = 1.0,
                 seed: int = 0, measure: bool = True) -> dict[str, Any]:
    """Apply a policy file to a model, optionally fine-tune on ``data``, write the output folder."""
    import torch

    from autocompress.compress import ApplyContext, apply, estimate
    from autocompress.compress.apply import base_table
    from autocompress.export.artifacts import commit_folder, write_model_files, write_policy_and_result
    from autocompress.hwmodels import get_target

    from autocompress.export.artifacts import check_out

    get_target(target)  # fail on an unknown target or a bad --out before any work
    check_out(out)
    policy = Policy.load(policy_path)
    ws = open_model(spec, weights=weights, input_shape=input_shape, leaf=leaf, options=dict(policy.options),
                    pretrained=True)
    policy.validate(ws.space)
    bundle = None
    if data:
        from autocompress.evaluators.data import as_tensors, load_data

        bundle = load_data(data, ws.space.input_shape)
        calibration = as_tensors(bundle.train, limit=64)[0]
    else:
        calibration = None
    torch.manual_seed(seed)
    example = torch.randn(1, *ws.space.input_shape[1:])
    ctx = ApplyContext(ws.space, example, calibration=calibration)
    compressed = apply(ws.model, policy, ws.space, calibration=calibration, ctx=ctx)
    baseline = cost_summary(base_table(ws.space), target)
    best = cost_summary(estimate(ws.space, policy), target)
    if bundle is not None:
        from autocompress.evaluators.accuracy import evaluate
        from autocompress.evaluators.finetune import finetune

        baseline["accuracy"] = evaluate(ws.model, bundle.val)
        if epochs > 0:
            compressed = finetune(compressed, ws.model, bundle, epochs=epochs, boosted=ctx.boosted, seed=seed)
        best["accuracy"] = evaluate(compressed.eval(), bundle.val)

    def build(folder):
        info = write_model_files(compressed, example, folder, calibration)
        if measure:
            record_measured(folder, ws.model, example, best, baseline)
        result = {"target": target, "budget": {}, "baseline": baseline, "best": best,
                  "trials": {"complete": 0, "failed": 0, "pruned": 0}, "feasible": True,
                  "model": spec, "fingerprint": ws.space.fingerprint, "boosted": sorted(ctx.boosted),
                  "notes": ctx.notes, **info}
        write_policy_and_result(folder, policy, result)
        return result

    return commit_folder(out, build)
