"""Replays a selection rule on recorded search-quality runs: keep the best uniform baseline unless the search's
pick beats it on the selection split by more than ``margin`` samples.

The question: does preferring the hand-made policy where the 202-sample selection split cannot tell the two
apart close the cells where the search trails the best baseline, without losing the cells it wins? The
replay reads ``benchmarks/results/search_quality_*_s*.json`` (no training); each uniform baseline's recorded
fine-tune stands in for the search's own fine-tune of that policy.

    .venv/bin/python benchmarks/baseline_preference.py --margins 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass

from search_quality_report import RESULTS, is_baseline

GROUPS = ("matrix_digits-net_mid", "matrix_digits-net_tight", "matrix_resnet18_digits_mid",
          "matrix_resnet18_digits_tight", "matrix_digits-net-mnist5k_mid", "matrix_digits-net-mnist5k_tight",
          "matrix_resnet18_digits-mnist5k_tight", "default_digits-net_5pct", "default_digits-net_mid_b05",
          "default_digits-net_mid_b025")
UNIFORM = ("uniform-int8", "uniform-fp32")


@dataclass(frozen=True)
class Run:
    methods: dict
    select_samples: int


def scored(run: Run, method: str) -> bool:
    return "accuracy" in run.methods.get(method, {})


def replay(run: Run, margin: int) -> float:
    """Held-out accuracy of what the rule returns in one run."""
    ours = run.methods["ours"]
    uniform = [run.methods[k] for k in UNIFORM if scored(run, k) and run.methods[k].get("meets_budget", True)]
    if not uniform:
        return ours["accuracy"]
    base = max(uniform, key=lambda m: (m["accuracy_select"], -m["latency_ms"]))
    lead = (ours["accuracy_select"] - base["accuracy_select"]) * run.select_samples
    if lead > margin + 1e-6 or (margin == 0 and abs(lead) < 1e-6 and ours["latency_ms"] < base["latency_ms"]):
        return ours["accuracy"]
    return base["accuracy"]


def cells() -> dict[tuple[str, str], list[Run]]:
    found: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for group in GROUPS:
        for path in sorted(RESULTS.glob(f"search_quality_{group}_s*.json")):
            data = json.loads(path.read_text())
            for budget, cell in data["budgets"].items():
                run = Run(cell["methods"], data["finetune"]["select_samples"])
                if scored(run, "ours"):
                    found[(group, budget)].append(run)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--margins", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    heads = " | ".join(f"margin {m}" for m in args.margins)
    print(f"| model | data | budget | effort | best baseline | shipped | {heads} |")
    print("|---" * (6 + len(args.margins)) + "|")
    for (group, budget), runs in cells().items():
        baselines = [k for k in runs[0].methods if is_baseline(k) and all(scored(r, k) for r in runs)]
        best = max(statistics.mean(r.methods[k]["accuracy"] for r in runs) for k in baselines)
        shipped = statistics.mean(r.methods["ours"]["accuracy"] for r in runs)
        rows = [statistics.mean(replay(r, m) for r in runs) for m in args.margins]
        model = "resnet18_digits" if "resnet18" in group else "digits-net"
        data = "mnist5k" if "mnist5k" in group else "digits"
        effort = "12 trials, 2 epochs" if group.startswith("matrix") else "32 trials, 4 epochs"
        points = " | ".join(f"{(x - best) * 100:+.2f}" for x in [shipped, *rows])
        print(f"| {model} | {data} | {float(budget) * 100:.0f} % | {effort} | {best:.4f} | {points} |")


if __name__ == "__main__":
    main()
