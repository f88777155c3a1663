"""The contract's cost fields of one model variant on a target: predicted latency and energy, size, MACs, params."""

from __future__ import annotations

from typing import Any

from autocompress.hwmodels.predict import predict
from autocompress.hwmodels.targets import get_target
from autocompress.space.costs import CostTable


def cost_summary(table: CostTable, target: Any) -> dict[str, Any]:
    """The contract's cost fields of one model variant on ``target`` (predicted)."""
    pred = predict(table, get_target(target))
    totals = table.totals()
    return {"latency_ms": pred.latency_ms, "energy_mj": pred.energy_mj, "size_bytes": int(totals["weight_bytes"]),
            "macs": int(totals["macs"]), "params": int(totals["params"])}
