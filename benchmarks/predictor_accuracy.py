"""Latency predictor accuracy on `local`: predicted vs ONNX Runtime-measured latency of random compressed variants.

Each variant is a random policy over every decision kind of the model's search
space (each decision takes a random non-identity choice with a probability
drawn per variant). The prediction comes from ``compress.estimate`` (no model
is built); the measurement from ``compress.apply`` + ONNX export (int8 QDQ when
the policy puts layers at <= 8 bits) timed in ONNX Runtime with one intra-op
thread. One variant in ``--calib-every`` is used to refit the local target and
is not scored; the rest are scored as nn-Meter reports: % within ±10 %, % within
±5 %, RMSPE.

    .venv/bin/python benchmarks/predictor_accuracy.py --variants 40 --time-cap 900
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from autocompress.compress import apply, estimate
from autocompress.hwmodels import get_target, measure_onnx, predict
from autocompress.hwmodels.measure import profile_onnx
from autocompress.hwmodels.calibrate import (Sample, error_stats, export_deployed, fit_target, random_policy,
                                             robust_ms)
from autocompress.models import load_model
from autocompress.space.graph import trace
from autocompress.space.space import build_space

MODELS = ("torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:googlenet", "torchvision:squeezenet1_0",
          "torchvision:shufflenet_v2_x1_0", "builtin:digits-net")


def measure_models(specs: list[str], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Make, build and time variants of ``specs`` round-robin until ``--variants`` each or the time cap."""
    torch.set_num_threads(1)
    start = time.time()
    spaces = {}
    for spec in specs:
        lm = load_model(spec)
        spaces[spec] = (lm, build_space(trace(lm.model, lm.input_shape), spec), random.Random(f"{args.seed}-{spec}"))
        print(f"space {spec}: {len(spaces[spec][1])} decisions", file=sys.stderr, flush=True)
    records: list[dict] = []
    failures: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for v in range(args.variants):
            for spec in specs:
                if time.time() - start > args.time_cap:
                    return records, failures
                lm, space, rng = spaces[spec]
                policy = random_policy(space, rng)
                folder = Path(tmp) / f"{spec.replace(':', '_')}-{v}"
                folder.mkdir()
                try:
                    t0 = time.process_time()
                    table = estimate(space, policy)
                    model = apply(lm.model, policy, space)
                    x = torch.randn(*lm.input_shape)
                    t1 = time.process_time()
                    path, int8 = export_deployed(model, x, folder)
                    t2 = time.process_time()
                    m = measure_onnx(path, threads=args.threads, warmup=args.warmup, runs=args.runs)
                    t3 = time.process_time()
                    calib = v % args.calib_every == 0
                    parts = profile_onnx(path, threads=args.threads) if calib else None
                except Exception as exc:  # a variant that cannot be built or exported is reported, not scored
                    failures.append({"model": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                    continue
                kinds = sorted({space[k].kind for k in policy.decisions})
                records.append({"model": spec, "index": v, "calib": calib, "int8": int8, "parts": parts,
                                "kinds": kinds, "n_decisions": len(policy.decisions), "table": table,
                                "measured_ms": robust_ms(m), "wall_median_ms": m.median_ms, "cv": m.cv,
                                "cpu_s": [round(t1 - t0, 2), round(t2 - t1, 2), round(t3 - t2, 2)]})
                if len(records) % 10 == 0:
                    print(f"{specs[0]}..: {len(records)} variants, {time.time() - start:.0f}s", file=sys.stderr, flush=True)
    return records, failures


def _worker(job: tuple[list[str], argparse.Namespace]) -> tuple[list[dict], list[dict]]:
    return measure_models(*job)


def collect(args: argparse.Namespace) -> dict:
    """Measure variants with ``--jobs`` processes (each times with one ORT thread; CPU time is the measure)."""
    from autocompress.hwmodels.calibrate import VARIANT_NETS, _suite, measure_samples, measure_variants

    started = time.time()
    torch.set_num_threads(1)
    # What `autocompress calibrate --target local` measures: the designed set and variants of small nets.
    suite = measure_samples(_suite(False), threads=args.threads, warmup=args.warmup, runs=args.runs, profile=True)
    suite += measure_variants(VARIANT_NETS, 12, threads=args.threads, warmup=args.warmup, runs=args.runs)
    print(f"designed layer set: {len(suite)} measured, {time.time() - started:.0f}s", file=sys.stderr, flush=True)
    groups = [args.models[i::args.jobs] for i in range(args.jobs)]
    if args.jobs == 1:
        results = [measure_models(groups[0], args)]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_worker, [(g, args) for g in groups if g])
    records = [r for rec, _ in results for r in rec]
    failures = [f for _, fail in results for f in fail]
    return {"records": records, "suite": suite, "failures": failures, "seconds": round(time.time() - started),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": " ".join(["python", "benchmarks/predictor_accuracy.py", *sys.argv[1:]]),
            "threads": args.threads, "warmup": args.warmup, "runs": args.runs, "jobs": args.jobs}


def score(raw: dict, models: list[str]) -> dict:
    """Refit `local` on the calibration variants and score the others (nn-Meter's measures)."""
    records = raw["records"]
    base = get_target("local")
    calib = [Sample(f"{r['model']}#{r['index']}", r["table"], r["measured_ms"], parts=r.get("parts"))
             for r in records if r["calib"]]
    scored = [r for r in records if not r["calib"]]
    suite = raw.get("suite", [])
    # The designed layer set keeps bandwidths and overheads physical; the variants add whole-graph effects.
    fitted = fit_target(base, suite + calib, "local") if len(calib) >= 4 else base
    base = fit_target(base, suite, "local") if len(suite) >= 4 else base  # what `autocompress calibrate` gives
    out = {k: v for k, v in raw.items() if k not in ("records", "suite")}
    out.update({"variants": len(records), "calibration_variants": len(calib), "scored_variants": len(scored),
                "suite_samples": len(suite), "base_target_calibrated": base.calibrated})
    for label, target in (("suite_only", base), ("suite_plus_calib_variants", fitted)):
        preds = [predict(r["table"], target).latency_ms for r in scored]
        meas = [r["measured_ms"] for r in scored]
        out[label] = error_stats(preds, meas)
        out[label + "_wall_median"] = error_stats(preds, [r["wall_median_ms"] for r in scored])
        per_model = {}
        for spec in models:
            idx = [k for k, r in enumerate(scored) if r["model"] == spec]
            per_model[spec] = error_stats([preds[k] for k in idx], [meas[k] for k in idx])
        out[label + "_per_model"] = per_model
        if label == "suite_plus_calib_variants":
            out["rows"] = [{"model": r["model"], "int8": r["int8"], "kinds": r["kinds"], "cpu_s": r["cpu_s"],
                            "measured_ms": r["measured_ms"], "wall_median_ms": r["wall_median_ms"],
                            "predicted_ms": p} for r, p in zip(scored, preds)]
    out["calibration_fit"] = {"suite_only": dict(base.fit), "suite_plus_calib_variants": dict(fitted.fit)}
    out["kinds_covered"] = sorted({k for r in records for k in r["kinds"]})
    out["int8_variants"] = sum(r["int8"] for r in records)
    out["fitted_target"] = fitted.to_json()
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime

    return f"{cpu}, {platform.machine()}, onnxruntime {onnxruntime.__version__}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--variants", type=int, default=40, help="variants per model")
    ap.add_argument("--calib-every", type=int, default=5, help="every n-th variant calibrates and is not scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--time-cap", type=float, default=900.0, help="stop making variants after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (models are split between them)")
    ap.add_argument("--out", default="predictor_accuracy.json")
    ap.add_argument("--raw", default="", help="pickle the measured variants here (tables included)")
    ap.add_argument("--rescore", default="", help="score a --raw pickle again instead of measuring")
    args = ap.parse_args()
    import pickle

    if args.rescore:
        raw = pickle.loads(Path(args.rescore).read_bytes())
    else:
        raw = collect(args)
        if args.raw:
            Path(args.raw).write_bytes(pickle.dumps(raw))
    out = score(raw, args.models)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    brief = {k: v for k, v in out.items() if k not in ("rows", "fitted_target")}
    print(json.dumps(brief, indent=1, default=str))


if __name__ == "__main__":
    main()
