"""The tables of ``benchmarks/search_quality.py``'s result files: one run per model in full (``--report``) and
held-out accuracy mean ± sd over seeds (``--summary``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("ours", "allocation", "ours-layers", "random", "uniform-fp32", "uniform-int8", "tp-fp32", "tp-int8")


def is_baseline(method: str) -> bool:
    """The hand-made methods the search must beat: uniform and Torch-Pruning policies."""
    return method.startswith(("uniform", "tp-"))


def merge_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Result files of one model (e.g. one per budget or per method group) merged into one entry per model."""
    merged: dict[str, dict[str, Any]] = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        m = merged.setdefault(d["model"], {**d, "budgets": {}, "total_wall_s": 0.0})
        m["total_wall_s"] += d.get("total_wall_s", 0.0)
        for frac, entry in d["budgets"].items():
            m["budgets"].setdefault(frac, {"budget_ms": entry["budget_ms"], "methods": {}})["methods"].update(entry["methods"])
    for m in merged.values():
        m["budgets"] = dict(sorted(m["budgets"].items(), key=lambda kv: -float(kv[0])))
    return list(merged.values())


def report(paths: list[Path]) -> str:
    lines = []
    for d in merge_results(paths):
        b = d["baseline"]
        cfg = d["config"]
        lines.append(f"**{d['model']}** — baseline: held-out acc {b['accuracy']:.4f}, predicted mobile "
                     f"{b['latency_ms']:.3f} ms, {b['macs'] / 1e6:.1f} M MACs"
                     + (f", measured local {b['measured_local_ms']:.3f} ms" if "measured_local_ms" in b else "")
                     + f"; N = {cfg['trials']} trials at {cfg['low_epochs']} epochs, {cfg['finalists']} finalists, "
                       f"full fine-tune {cfg['full_epochs']} epochs (commit {d.get('commit', '?')})\n")
        lines.append("| budget | method | held-out acc | select acc | pred. mobile ms | MACs (M) | local ORT ms | wall s | choice |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for frac, entry in d["budgets"].items():
            for name in METHODS:
                r = entry["methods"].get(name)
                if r is None:
                    continue
                if "error" in r or "infeasible" in r:
                    lines.append(f"| {frac}x ({entry['budget_ms']:.3f} ms) | {name} | — | — | — | — | — | "
                                 f"{r.get('wall_s', '')} | {r.get('error') or r.get('infeasible')} |")
                    continue
                if name in ("ours", "ours-layers", "random"):
                    t = r["trials"]
                    choice = (f"trial {r['best_trial']} ({r['best_origin']}); {t['complete']} run, {t['pruned']} screened"
                              + (f", {t['failed']} failed" if t["failed"] else ""))
                elif name == "allocation":
                    choice = ", ".join(f"{v} {k}" for k, v in sorted(r.get("decisions_by_kind", {}).items()))
                elif name.startswith("uniform"):
                    choice = f"ratio {r['ratio']}"
                else:
                    choice = f"pruning_ratio {r['pruning_ratio']:.3f}"
                ort = f"{r['measured_local_ms']:.3f} ({r['onnx']})" if "measured_local_ms" in r else "—"
                ok = "" if r.get("meets_budget", True) else " (over!)"
                lines.append(f"| {frac}x ({entry['budget_ms']:.3f} ms) | {name} | {r['accuracy']:.4f} | "
                             f"{r['accuracy_select']:.4f} | {r['latency_ms']:.3f}{ok} | {r['macs'] / 1e6:.2f} | {ort} | "
                             f"{r['wall_s']:.0f} | {choice} |")
        lines.append("")
    return "\n".join(lines)


def summary(paths: list[Path]) -> str:
    """Held-out accuracy mean ± sd over the seeds (one result file per seed), per model, budget and method.

    A later file's row replaces an earlier one's for the same model, budget, method and seed: a method
    re-run on newer code is summarised beside the baselines of the first run."""
    import statistics

    rows: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    budget_ms: dict[tuple[str, str], float] = {}
    base: dict[str, float] = {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        data = d.get("data", "sklearn:digits")
        model = d["model"] if data == "sklearn:digits" else f"{d['model']} on {data}"  # another set, another row
        base[model] = d["baseline"]["accuracy"]
        for frac, entry in d["budgets"].items():
            budget_ms[(model, frac)] = entry["budget_ms"]
            for name, r in entry["methods"].items():
                if "accuracy" in r:
                    rows.setdefault((model, frac), {}).setdefault(name, {})[d["config"]["seed"]] = r["accuracy"]
    cells = {key: {name: list(by_seed.values()) for name, by_seed in methods.items()} for key, methods in rows.items()}
    lines = ["| model | budget | method | held-out acc, mean ± sd | seeds | vs best baseline |", "|---|---|---|---|---|---|"]
    for (model, frac), methods in sorted(cells.items(), key=lambda kv: (kv[0][0], -float(kv[0][1]))):
        baselines = [statistics.mean(v) for k, v in methods.items() if is_baseline(k)]
        best_base = max(baselines) if baselines else None
        for name in METHODS:
            v = methods.get(name)
            if not v:
                continue
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            diff = f"{100 * (statistics.mean(v) - best_base):+.2f} pts" if best_base is not None else ""
            lines.append(f"| {model} (uncompressed {base[model]:.4f}) | {frac}x ({budget_ms[(model, frac)]:.3f} ms) | "
                         f"{name} | {statistics.mean(v):.4f} ± {sd:.4f} | {len(v)} | {diff} |")
    return "\n".join(lines)
