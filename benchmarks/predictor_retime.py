"""Time a predictor-accuracy run's scored variants again, to tell the model's misses from the measurement's.

`predictor_accuracy.py` scores each prediction against one measurement. When a variant misses, either the
latency model or that measurement is off. This script rebuilds the run's variants (the same seed, the same
split of models between workers, so the same weights and policies), times them again with the same
protocol (`measure_files`), and reports per variant: the run's measurement, the new one, and the run's
prediction. The machine's overall speed moves between the two timings, so the new times are divided by
their median ratio to the run's before they are compared.

    python benchmarks/predictor_retime.py --run benchmarks/results/predictor_accuracy_run_Y_rescored.json \\
        --models torchvision:resnet18 torchvision:mobilenet_v2 torchvision:googlenet \\
        --all-models torchvision:resnet18 torchvision:mobilenet_v2 torchvision:googlenet \\
            benchmarks/models_transformers.py:bert_mini seq:bert --jobs 2 --variants 30 --seed 12 --out retimed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from predictor_accuracy import build_models  # noqa: E402


def count_within(predicted: list[float], measured: list[float]) -> int:
    """How many of ``predicted`` are within ±10 % of ``measured``: the fit's own ``error_stats`` rule."""
    from autocompress.hwmodels.calibrate import error_stats

    return round(error_stats(predicted, measured)["within_10"] * len(measured)) if measured else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a predictor_accuracy JSON with its scored rows")
    ap.add_argument("--models", nargs="+", required=True, help="the models whose scored variants are timed again")
    ap.add_argument("--all-models", nargs="+", required=True, help="the run's --models, in its order")
    ap.add_argument("--jobs", type=int, required=True, help="the run's --jobs (models are split between workers)")
    ap.add_argument("--variants", type=int, required=True, help="the run's --variants")
    ap.add_argument("--calib-every", type=int, default=3, help="the run's --calib-every")
    ap.add_argument("--seed", type=int, required=True, help="the run's --seed")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="predictor_retime.json")
    args = ap.parse_args()
    from autocompress.hwmodels.measure import measure_files

    rows = {(r["model"], r["index"]): r for r in json.loads(Path(args.run).read_text())["rows"]}
    # Each worker seeds torch once and opens its models in order: keep the order, drop what is not timed.
    groups = [[m for m in args.all_models[i::args.jobs] if m in args.models] for i in range(args.jobs)]
    with tempfile.TemporaryDirectory(prefix="predictor-retime-") as workdir:
        build_args = argparse.Namespace(seed=args.seed, variants=args.variants, time_cap=1e9, workdir=workdir,
                                        calib_every=args.calib_every)
        records = [r for g in groups if g for r in build_models(g, build_args)[0] if (r["model"], r["index"]) in rows]
        times = measure_files([Path(r["path"]) for r in records], rounds=args.rounds)
    scale = statistics.median(ms / rows[(r["model"], r["index"])]["measured_ms"] for r, ms in zip(records, times))
    out_rows = []
    for r, ms in zip(records, times):
        run = rows[(r["model"], r["index"])]
        assert run["int8"] == r["int8"], f"{r['model']} #{r['index']} did not rebuild as the run built it"
        out_rows.append({"model": r["model"], "index": r["index"], "int8": r["int8"], "run_ms": run["measured_ms"],
                         "now_ms": ms, "now_scaled_ms": ms / scale, "predicted_ms": run["predicted_ms"]})
    summary = {}
    for model in args.models:
        for kind in ("fp32", "int8", "all"):
            rs = [x for x in out_rows if x["model"] == model and (kind == "all" or x["int8"] == (kind == "int8"))]
            summary[f"{model} {kind}"] = {
                "variants": len(rs),
                "run_and_now_agree": count_within([x["now_scaled_ms"] for x in rs], [x["run_ms"] for x in rs]),
                "predicted_within_run": count_within([x["predicted_ms"] for x in rs], [x["run_ms"] for x in rs]),
                "predicted_within_now": count_within([x["predicted_ms"] for x in rs],
                                                     [x["now_scaled_ms"] for x in rs])}
    Path(args.out).write_text(json.dumps({"run": args.run, "speed_ratio_now_to_run": scale, "summary": summary,
                                          "rows": out_rows}, indent=1) + "\n")
    print(json.dumps({"speed_ratio_now_to_run": scale, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
