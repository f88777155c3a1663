"""The search's output folder: artifacts, result.json, report.md, pareto.png, trials.csv.

Written from a :class:`~autocompress.search.core.SearchResult`; trials.csv and the Pareto plot read
every trial from the driver's Optuna study.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

from optuna.trial import TrialState

from autocompress.search.core import Finalist, SearchResult
from autocompress.search.sensitivity import SensitivityTable
from autocompress.search.sensitivity_report import plot_sensitivity, sensitivity_lines


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def finalist_tie_note(finalists: Sequence[Finalist], metric: str, select_samples: int | None = None) -> list[str]:
    """A note when two or more finalists share the best full-fidelity selection score: their order is then
    the tie rule's (the faster by prediction first), not a difference the selection split measured."""
    if len(finalists) < 2:
        return []
    best = max(f.accuracy_full for f in finalists)
    tied = [f for f in finalists if abs(f.accuracy_full - best) <= 1e-9]
    if len(tied) < 2:
        return []
    size = f", {select_samples} samples" if select_samples else ""
    return [f"{len(tied)} of {len(finalists)} finalists tied on the selection split ({metric} {best:.4f}{size}); "
            "they are ranked by predicted latency, the fastest first: the split cannot tell them apart, so their "
            f"held-out {metric} may differ"]


def write_trials_csv(study: Any, path: Path) -> None:
    keys = ["latency_ms", "energy_mj", "size_bytes", "macs", "params", "seconds", "accuracy_full_select", "origin",
            "reason", "fail_reason", "duplicate_of"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["number", "state", "accuracy_select", *keys, "policy"])
        for t in study.get_trials(deepcopy=False):
            acc = t.values[0] if t.values else ""
            full = study.user_attrs.get(f"full:{t.number}", "")
            w.writerow([t.number, t.state.name, acc, *[full if k == "accuracy_full_select" else t.user_attrs.get(k, "")
                                                        for k in keys],
                        json.dumps(t.user_attrs.get("policy", {k: v for k, v in t.params.items()}))])


def pareto_front(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """(latency, accuracy, number) points not dominated by a faster-and-more-accurate one."""
    front, best = [], -1.0
    for lat, acc, n in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((lat, acc, n))
            best = acc
    return front


def plot_pareto(study: Any, budget_ms: float | None, baseline: dict, best_number: int, path: Path,
                metric: str = "accuracy") -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pts = [(t.user_attrs["latency_ms"], t.values[0], t.number) for t in done]
    screened = [t.user_attrs["latency_ms"] for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
                if "latency_ms" in t.user_attrs]
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.6, label="evaluated (low fidelity)")
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="C1", ms=4, label="Pareto front")
    if screened:
        ax.scatter(screened, [min(p[1] for p in pts) if pts else 0] * len(screened), marker="|", color="grey",
                   alpha=0.5, label="screened out (over budget)")
    if budget_ms:
        ax.axvline(budget_ms, color="red", ls="--", label=f"budget {budget_ms:.3g} ms")
    ax.axvline(baseline["latency_ms"], color="black", ls=":", label="baseline")
    chosen = [p for p in pts if p[2] == best_number]
    if chosen:
        ax.scatter([chosen[0][0]], [chosen[0][1]], s=120, marker="*", color="green", zorder=5, label="chosen")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(f"selection {metric} after short fine-tune")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front


def per_layer_table(space: Any, decisions: dict) -> list[str]:
    """Markdown rows: one per layer that any chosen decision touches, one column per kind."""
    kinds = ("prune", "heads", "rank", "wbits", "abits", "merge", "branch", "drop")
    rows: dict[str, dict[str, str]] = {}
    for d in space.decisions:
        if d.id not in decisions:
            continue
        value = str(decisions[d.id])
        if d.kind in ("merge", "branch"):
            value = d.id.split(":")[1] if d.kind == "merge" else {1: "fuse", 2: "absorb"}.get(decisions[d.id], value)
        if d.kind == "prune":
            root = d.info.get("root", d.layers[0])
            for layer, side, _ in d.info.get("deps", [(p, "out", 1.0) for p in d.layers]):
                text = value if layer == root else (f"in {value}" if side == "in" else f"({value})")
                cell = rows.setdefault(layer, {})
                cell["prune"] = ", ".join(x for x in (cell.get("prune"), text) if x)
            continue
        rows.setdefault(d.layers[0], {})[d.kind] = value
    out = ["| layer | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for layer, cells in rows.items():
        out.append(f"| `{layer}` | " + " | ".join(cells.get(k, "") for k in kinds) + " |")
    return out


def taken_repair(measured: dict) -> dict | None:
    """The repair a result.json's ``measured`` returned, if any (files written before ``taken``: the one within)."""
    return next((r for r in measured.get("repairs") or [] if r.get("taken", r.get("within"))), None)


def measured_lines(result: dict) -> list[str]:
    """report.md's sentence on the budget by measurement (``measured_feasible``), then a blank line."""
    m = result.get("measured") or {}
    verdict = result.get("measured_feasible")
    if verdict is None:
        why = m.get("reason") or ("no finalist could be measured" if m.get("finalists") else "not measured")
        return [f"Feasible by measurement: **not measured** ({why}).", ""]
    repairs = m.get("repairs") or []
    fixed = taken_repair(m)
    chosen = fixed or next((r for r in m.get("finalists", []) if r["trial"] == result.get("best_trial")), {})
    limit = (fixed or {}).get("limit_ms") or m.get("limit_ms") or 0.0
    text = (f"Feasible by measurement: **{verdict}**: each finalist's deployed file timed by {m.get('by')}; the "
            f"chosen {chosen.get('file', 'file')} measured {chosen.get('latency_ms', 0.0):.4g} ± "
            f"{chosen.get('spread_ms', 0.0):.2g} ms against {limit:.4g} ms")
    if fixed:
        text += (f" (every finalist was over by measurement: trial {fixed['trial']} was allocated again under "
                 f"{fixed['latency_scale']:.2f}x of the predicted latency limit and fine-tuned)")
    elif not verdict:
        text += " (no finalist was within the budget by measurement: this is the pick by prediction"
        why = m.get("repair_stopped") or "they were over too"
        text += f"; {len(repairs)} repair(s) under tighter limits were not taken: {why})" if repairs else ")"
    return [text + ".", ""]


def _timed(row: dict | None) -> str:
    if not row:
        return ""
    if row.get("latency_ms") is None:
        return f"; not measured: {row.get('error', '')}"
    verdict = {True: ", within the budget", False: ", over the budget"}.get(row.get("within"), "")
    return f"; {row['file']} measured {row['latency_ms']:.4g} ± {row['spread_ms']:.2g} ms{verdict}"


def write_report(path: Path, result: dict, found: SearchResult, front: list, decisions: dict,
                 extra_sections: list[str] = ()) -> None:
    b, s = result["baseline"], result["best"]
    goal = (f"The cheapest {result['minimise']} within {result['max_drop']:g} points of the baseline's "
            f"{result.get('metric', 'accuracy')} (--max-drop)" if result.get("max_drop") is not None
            else f"Budget: {json.dumps(result['budget'])}")
    lines = [f"# autocompress search: {result['model']} on {result['target']}", "",
             f"{goal}. Feasible: **{result['feasible']}**. "
             f"Trials: {result['trials']['complete']} evaluated, "
             f"{result['trials']['pruned'] - result['trials'].get('duplicates', 0) - result['trials'].get('early_stopped', 0)}"
             f" screened out by the analytic model, {result['trials']['failed']} failed"
             f"{', %d stopped early by successive halving' % result['trials']['early_stopped'] if result['trials'].get('early_stopped') else ''}.", "",
             *measured_lines(result), "| | baseline | chosen | change |", "|---|---:|---:|---:|"]
    metric = result.get("metric", "accuracy")
    rows = [(f"{metric} (held-out)", "accuracy", 4), (f"predicted latency on {result['target']} (ms)", "latency_ms", 3),
            ("measured latency, local ONNX Runtime fp32 (ms)", "measured_latency_ms_local", 3),
            ("predicted energy (mJ)", "energy_mj", 4), ("weights (bytes)", "size_bytes", 0), ("MACs", "macs", 0),
            ("params", "params", 0)]
    for label, key, nd in rows:
        bv, sv = b.get(key), s.get(key)
        if bv is None or sv is None:
            continue
        change = f"{sv / bv:.2f}x" if isinstance(bv, (int, float)) and bv else ""
        lines.append(f"| {label} | {_fmt(bv, nd)} | {_fmt(sv, nd)} | {change} |")
    for name, value in (s.get("deployed_accuracy") or {}).items():
        shown = _fmt(value, 4) if value is not None else "not scored"
        lines.append(f"| {metric} of {name} through ONNX Runtime | | {shown} | |")
    if "measured_latency_ms_local_int8" in s:
        lines.append(f"| measured latency, local ONNX Runtime int8 (ms) | | {_fmt(s['measured_latency_ms_local_int8'])} | |")
    if result.get("onnx_shapes") == "static":
        lines += ["", "The ONNX files have static shapes: every dimension fixed at the model's input shape "
                      "(`--static-shapes`); they were timed and scored as shipped."]
    kinds = result.get("decision_kinds")
    lines += ["", "## Chosen decisions per layer", "",
              *([f"Decision kinds searched: {', '.join(kinds)}.", ""] if kinds else []),
              "Prune ratios apply to a layer's coupled channel group (all layers that must keep the same "
              "width); blank cells keep the identity.", ""]
    lines += per_layer_table(found.space, decisions)
    lines += ["", "The root layer of a coupled channel group shows its prune ratio; the other members show it in "
              "brackets, or after `in` where only their input channels shrink."]
    if result.get("int8"):
        lines += ["", "## Bit-widths: realised in model.int8.onnx vs simulated", "",
                  "| layer | requested w/a | realised w/a | simulated only |", "|---|---|---|---|"]
        for row in result["int8"].get("layers", []):
            req, real = row.get("requested", {}), row.get("realised", {})
            lines.append(f"| `{row.get('layer')}` | {req.get('wbits')}/{req.get('abits')} | "
                         f"{real.get('wbits')}/{real.get('abits')} | {'yes' if row.get('simulated_only') else 'no'} |")
    lines += ["", f"## Pareto front (low-fidelity {metric} vs predicted latency)", "",
              f"| trial | latency (ms) | {metric} |", "|---:|---:|---:|"]
    lines += [f"| {n} | {lat:.3f} | {acc:.4f} |" for lat, acc, n in front]
    lines += ["", "Finalists re-trained at full fidelity:", ""]
    timed = {row["trial"]: row for row in (result.get("measured") or {}).get("finalists", [])}
    for f in found.finalists:
        lines.append(f"- trial {f.number} ({f.origin}): selection {metric} {f.accuracy_low:.4f} (short) -> "
                     f"{f.accuracy_full:.4f} (full)"
                     + (f", {f.latency_ms:.3f} ms predicted" if f.latency_ms is not None else "")
                     + _timed(timed.get(f.number)))
    if extra_sections:
        lines += ["", *extra_sections]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    lines += ["", "![Pareto front](pareto.png)", ""]
    path.write_text("\n".join(lines))


def write_search_outputs(found: SearchResult, evaluator: Any, base_acc: dict, out: Path, *, study: Any, model: str,
                         data: str, measure: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (all files or none) and return the result.json content; ``extra`` adds driver-specific keys."""
    from autocompress.deploy import deployed_accuracy, deployed_gaps, record_measured
    from autocompress.export.artifacts import commit_folder, write_model_files, write_policy_and_result

    policy, config = found.best_policy, found.config
    best_costs = dict(found.best_costs)
    baseline = dict(found.baseline_costs)
    baseline["accuracy"] = base_acc["accuracy"]
    best_costs["accuracy"] = evaluator.held_out(found.best_model)
    best_costs["accuracy_select"] = found.best_scored.accuracy
    metric = getattr(evaluator, "metric", "accuracy")
    if metric != "accuracy":  # the task's metric under its own name too; "accuracy" keeps the format's key
        baseline[metric], best_costs[metric] = baseline["accuracy"], best_costs["accuracy"]

    def build(folder: Path) -> dict[str, Any]:
        info = write_model_files(found.best_model, evaluator.example, folder, evaluator.calibration,
                                 config.static_shapes)
        best_costs["deployed_accuracy"] = deployed_accuracy(folder, evaluator.held_out, found.best_model,
                                                            evaluator.example)
        gaps = deployed_gaps(best_costs["accuracy"], best_costs["deployed_accuracy"])
        select = getattr(evaluator, "select", None)
        ties = finalist_tie_note(found.finalists, metric, len(select) if hasattr(select, "__len__") else None)
        if measure:
            record_measured(folder, evaluator.teacher, evaluator.example, best_costs, baseline, config.static_shapes)
        result = {"target": config.target, "budget": found.budget.to_json(), "baseline": baseline,
                  "best": best_costs, "trials": dict(found.counts), "feasible": found.feasible,
                  "measured_feasible": found.measured_feasible,
                  "measured": found.measured.to_json() if found.measured is not None else None, "model": model,
                  "data": data, "fingerprint": found.space.fingerprint, "study": found.study_name,
                  "metric": metric, "best_trial": found.best_trial, "lowest_reachable": dict(found.lowest_reachable),
                  "fidelity": {"low_epochs": config.low_epochs, "full_epochs": config.full_epochs},
                  "search_space": config.space, "decision_kinds": sorted({d.kind for d in found.space.decisions}),
                  "boosted": found.best_scored.boosted, "notes": [*gaps, *ties, *found.best_scored.notes],
                  "deployed_gap": bool(gaps), **info, **(extra or {})}
        write_policy_and_result(folder, policy, result)
        write_trials_csv(study, folder / "trials.csv")
        front = plot_pareto(study, found.budget.latency_ms, baseline, found.best_trial, folder / "pareto.png", metric)
        sections: list[str] = []
        stored = study.user_attrs.get("sensitivity")
        if stored:
            table = SensitivityTable.from_json(stored)
            plot_sensitivity(table, found.space, folder / "sensitivity.png")
            sections = sensitivity_lines(table, found.space) + ["", "![Sensitivity](sensitivity.png)"]
        write_report(folder / "report.md", result, found, front, dict(policy.decisions), sections)
        return result

    return commit_folder(out, build)
