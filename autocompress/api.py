"""The Python API the CLI is a thin shell over: load, space, profile, apply.

The top of the package: it may import any part, and no part imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from autocompress.deploy import deployed_accuracy, deployed_gaps, record_measured
from autocompress.search.setup import check_task_args
from autocompress.hwmodels.summary import cost_summary
from autocompress.space.inputs import as_tuple
from autocompress.space.policy import Policy
from autocompress.workspace import Workspace, open_model


def profile(ws: Workspace, target: str = "mobile", policy: Policy | None = None, batch: int = 1) -> dict[str, Any]:
    """Per-layer and total costs (``profile --json`` format), for the model or under ``policy``."""
    from autocompress.compress import estimate
    from autocompress.hwmodels import predict
    from autocompress.hwmodels.first_use import ready_target

    tgt = ready_target(target)  # an uncalibrated local is calibrated first (or refused), never silently off
    table = estimate(ws.space, policy.validate(ws.space)) if policy else ws.space.base_table()
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


def apply_policy(spec: str, policy_path: str | os.PathLike, out: str | os.PathLike, *,
                 weights: str | os.PathLike | None = None, data: str | None = None, target: str = "mobile",
                 input_shape: tuple[int, ...] | None = None, leaf: Iterable[str] = (), epochs: float = 1.0,
                 seed: int = 0, measure: bool = True, task: str | None = None,
                 static_shapes: bool = False) -> dict[str, Any]:
    """Apply a policy file to a model, optionally fine-tune on ``data`` or a ``task``, write the output folder
    (ONNX files with every dimension fixed at the example input's where ``static_shapes``)."""
    import torch

    from autocompress.compress import ApplyContext, apply, estimate
    from autocompress.evaluators.accuracy import evaluate
    from autocompress.export.artifacts import check_out, commit_folder, write_model_files, write_policy_and_result
    from autocompress.hwmodels.first_use import ready_target

    ready_target(target)  # fail on an unknown target before any work; calibrate an uncalibrated local
    check_out(out)
    check_task_args(spec, data, task, input_shape)
    policy = Policy.load(policy_path)
    loaded_task = None
    if task:
        from autocompress.evaluators.task import check_task, load_task

        loaded_task = load_task(task)
    ws = open_model(spec, weights=weights, input_shape=input_shape, leaf=leaf, options=dict(policy.options),
                    pretrained=True, example_input=loaded_task.example_input if loaded_task else None)
    policy = policy.validate(ws.space)  # values normalised to the space's choices
    baseline = cost_summary(ws.space.base_table(), target)
    best = cost_summary(estimate(ws.space, policy), target)
    torch.manual_seed(seed)
    metric = "accuracy"
    score = None  # the held-out metric of a model: the task's, or accuracy on the data's held-out split
    if loaded_task is not None:
        from autocompress.evaluators.task import run_metric
        from autocompress.evaluators.task_finetune import calibration_inputs, task_finetune

        metric = loaded_task.metric
        score = lambda m: run_metric(loaded_task.evaluate, m, f"the task's evaluate ({metric})")  # noqa: E731
        baseline["accuracy"] = check_task(loaded_task, ws.model)
        calibration = calibration_inputs(loaded_task)
        example = tuple(t[:1].clone() for t in as_tuple(loaded_task.example_input))
        ctx = ApplyContext(ws.space, example, calibration=calibration)
        compressed = apply(ws.model, policy, ws.space, calibration=calibration, ctx=ctx)
        if epochs > 0:
            compressed = task_finetune(compressed, ws.model, loaded_task, epochs=epochs, boosted=ctx.boosted,
                                       seed=seed)
        best["accuracy"] = score(compressed)
    else:
        calibration = bundle = None
        if data:
            from autocompress.evaluators.data import as_tensors, load_data

            bundle = load_data(data, ws.space.input_shape)
            calibration = as_tensors(bundle.train, limit=64)[0]
            score = lambda m: evaluate(m.eval(), bundle.val)  # noqa: E731
        torch.manual_seed(seed)
        example = torch.randn(1, *ws.space.input_shape[1:])
        ctx = ApplyContext(ws.space, example, calibration=calibration)
        compressed = apply(ws.model, policy, ws.space, calibration=calibration, ctx=ctx)
        if bundle is not None:
            from autocompress.evaluators.finetune import finetune

            baseline["accuracy"] = score(ws.model)
            if epochs > 0:
                compressed = finetune(compressed, ws.model, bundle, epochs=epochs, boosted=ctx.boosted, seed=seed)
            best["accuracy"] = score(compressed)
    if metric != "accuracy":
        baseline[metric], best[metric] = baseline["accuracy"], best["accuracy"]


    def build(folder):
        info = write_model_files(compressed, example, folder, calibration, static_shapes)
        notes = list(ctx.notes)
        if score is not None:
            best["deployed_accuracy"] = deployed_accuracy(folder, score, compressed, example)
            notes = deployed_gaps(best["accuracy"], best["deployed_accuracy"]) + notes
        if measure:
            record_measured(folder, ws.model, example, best, baseline, static_shapes)
        result = {"target": target, "budget": {}, "baseline": baseline, "best": best, "metric": metric,
                  "trials": {"complete": 0, "failed": 0, "pruned": 0}, "feasible": True,
                  "model": spec, "fingerprint": ws.space.fingerprint, "boosted": sorted(ctx.boosted),
                  "notes": notes, **info}
        if task:
            result["data"] = f"task:{task}"
        write_policy_and_result(folder, policy, result)
        return result

    return commit_folder(out, build)


__all__ = ["Workspace", "apply_policy", "open_model", "profile"]
