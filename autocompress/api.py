"""The Python API the CLI is a thin shell over: load, space, profile, apply.

The top of the package: it may import any part, and no part imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from autocompress.deploy import record_measured
from autocompress.hwmodels.summary import cost_summary
from autocompress.space.policy import Policy
from autocompress.workspace import Workspace, open_model


def profile(ws: Workspace, target: str = "mobile", policy: Policy | None = None, batch: int = 1) -> dict[str, Any]:
    """Per-layer and total costs (``profile --json`` format), for the model or under ``policy``."""
    from autocompress.compress import estimate
    from autocompress.hwmodels import get_target, predict

    tgt = get_target(target)
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
                 seed: int = 0, measure: bool = True) -> dict[str, Any]:
    """Apply a policy file to a model, optionally fine-tune on ``data``, write the output folder."""
    import torch

    from autocompress.compress import ApplyContext, apply, estimate
    from autocompress.export.artifacts import commit_folder, write_model_files, write_policy_and_result
    from autocompress.hwmodels import get_target

    from autocompress.export.artifacts import check_out

    get_target(target)  # fail on an unknown target or a bad --out before any work
    check_out(out)
    policy = Policy.load(policy_path)
    ws = open_model(spec, weights=weights, input_shape=input_shape, leaf=leaf, options=dict(policy.options),
                    pretrained=True)
    policy = policy.validate(ws.space)  # values normalised to the space's choices
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
    baseline = cost_summary(ws.space.base_table(), target)
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


__all__ = ["Workspace", "apply_policy", "open_model", "profile"]
