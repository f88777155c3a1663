"""Latency predictor accuracy on `local`: predicted vs ONNX Runtime-measured latency of random compressed variants.

Each variant is a random policy over every decision kind of the model's search
space (each decision takes a random non-identity choice with a probability
drawn per variant). The prediction comes from ``compress.estimate`` (no model
is built); the measurement from ``compress.apply`` + ONNX export (int8 QDQ when
the policy puts layers at <= 8 bits) timed in ONNX Runtime with one intra-op
thread. One variant in ``--calib-every`` is used to refit the local target and
is not scored; the rest are scored as nn-Meter reports: % within ±10 %, % within
±5 %, RMSPE.

Sequence models (``--models seq:encoder seq:bert seq:lstm seq:gru``) are scored on random small
architectures instead (widths, heads, layers, directions and sequence lengths drawn per variant;
``calibrate._sequence_nets.random_sequence_net``), exported in float with their own inputs (token ids for
BERT), since the compression decisions for them are not all in place yet.

    .venv/bin/python benchmarks/predictor_accuracy.py --variants 40 --time-cap 900
    .venv/bin/python benchmarks/predictor_accuracy.py --models benchmarks/models_transformers.py:bert_mini \
        torchvision:resnet18 torchvision:mobilenet_v2 --variants 18 --calib-every 3 --jobs 2   # runs V, W
    .venv/bin/python benchmarks/predictor_accuracy.py --models seq:encoder seq:lstm --variants 10 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
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
from autocompress.hwmodels import get_target, predict
from autocompress.hwmodels.measure import profile_onnx
from autocompress.hwmodels.calibrate import (Sample, error_stats, export_deployed, fit_target,
                                             llc_choices, network_scales, probe_widths, random_policy, LAYER_WEIGHT)
from autocompress.space.graph import trace
from autocompress.workspace import open_model

MODELS = ("torchvision:resnet18", "torchvision:mobilenet_v2", "torchvision:googlenet", "torchvision:squeezenet1_0",
          "torchvision:shufflenet_v2_x1_0", "builtin:digits-net",
          "benchmarks/models_transformers.py:bert_mini")  # opened as a search opens it: its own token ids
SEQUENCE_MODELS = ("seq:encoder", "seq:bert", "seq:lstm", "seq:gru")  # random small architectures of each kind


def build_sequence(spec: str, v: int, folder: Path, args: argparse.Namespace) -> dict:
    """One random architecture of a sequence-model kind, traced and exported in float with its own inputs."""
    from autocompress.export.onnx import export_onnx
    from autocompress.hwmodels.calibrate._sequence_nets import random_sequence_net
    from autocompress.space.costs import CostTable

    desc, (make, inputs) = random_sequence_net(spec.split(":", 1)[1], random.Random(f"{args.seed}-{spec}-{v}"))
    model = make().eval()
    table = CostTable.from_graph(trace(model, inputs=inputs))
    path = export_onnx(model, inputs.example(1, seed=0), folder / "model.onnx")
    return {"model": spec, "index": v, "calib": v % args.calib_every == 0, "int8": False, "kinds": ["architecture"],
            "n_decisions": 0, "table": table, "path": str(path), "architecture": desc}


def build_models(specs: list[str], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Make and export variants of ``specs`` (round-robin) into ``args.workdir``; timing comes later."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same random-init weights (and int8 calibration data) in every run
    start = time.time()
    spaces = {}
    for spec in specs:
        if spec.startswith("seq:"):
            continue
        ws = open_model(spec)  # as a search opens it: its own example inputs, attention split into heads
        spaces[spec] = (ws.model.eval(), ws.space, random.Random(f"{args.seed}-{spec}"))
        print(f"space {spec}: {len(spaces[spec][1])} decisions", file=sys.stderr, flush=True)
    records: list[dict] = []
    failures: list[dict] = []
    for v in range(args.variants):
        for spec in specs:
            if time.time() - start > args.time_cap:
                return records, failures
            folder = Path(args.workdir) / f"{spec.replace(':', '_').replace('/', '_')}-{v}"
            folder.mkdir()
            if spec.startswith("seq:"):
                try:
                    records.append(build_sequence(spec, v, folder, args))
                except Exception as exc:  # reported, not scored
                    failures.append({"model": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                continue
            net, space, rng = spaces[spec]
            policy = random_policy(space, rng)
            try:
                table = estimate(space, policy)
                model = apply(net, policy, space)
                path, int8 = export_deployed(model, space.graph.example(1, seed=0), folder)
            except Exception as exc:  # a variant that cannot be built or exported is reported, not scored
                failures.append({"model": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                continue
            kinds = sorted({space[k].kind for k in policy.decisions})
            records.append({"model": spec, "index": v, "calib": v % args.calib_every == 0, "int8": int8,
                            "kinds": kinds, "n_decisions": len(policy.decisions), "table": table, "path": str(path)})
            if len(records) % 20 == 0:
                print(f"{specs[0]}..: {len(records)} variants built, {time.time() - start:.0f}s", file=sys.stderr,
                      flush=True)
    return records, failures


def _worker(job: tuple[list[str], argparse.Namespace]) -> tuple[list[dict], list[dict]]:
    return build_models(*job)


def collect(args: argparse.Namespace) -> dict:
    """Build the designed set and the variants (``--jobs`` processes), then time every file together.

    Timing: ``calibrate.measure_files`` over the designed set's files and every variant at once, so
    a slow stretch of the machine falls on calibration and scored files alike: ``--rounds`` passes,
    each in a new shuffled order, one ORT thread, ``--warmup`` + ``--runs`` calls per pass, the
    lowest over passes of the quietest block's median CPU time (``measure.quiet_latency``), and more
    passes for files whose best came at a slow moment.
    """
    from autocompress.hwmodels.calibrate import VARIANT_NETS, Sample, build_configs, build_variants, designed_set
    from autocompress.hwmodels.measure import measure_files, time_file

    started = time.time()
    torch.set_num_threads(1)
    timing = {"threads": args.threads, "warmup": args.warmup, "runs": args.runs, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="predictor-accuracy-") as workdir, contextlib.ExitStack() as stack:
        args.workdir = workdir
        groups = [g for g in (args.models[i::args.jobs] for i in range(args.jobs)) if g]
        if args.jobs == 1:
            pending = None
        else:
            import multiprocessing as mp

            pool = stack.enter_context(mp.get_context("spawn").Pool(args.jobs))  # workers end with the run, on error too
            pending = pool.map_async(_worker, [(g, args) for g in groups])
        # What `autocompress calibrate --target local` measures: the designed set and variants of small nets.
        suite_dir = Path(workdir) / "designed-set"
        suite_dir.mkdir()
        quick = args.quick_suite  # as `calibrate --quick`: fewer configurations, 2 variants of 2 networks
        designed = (build_configs(designed_set(quick), suite_dir)
                    + build_variants(VARIANT_NETS[:2] if quick else VARIANT_NETS, 2 if quick else 12, suite_dir))
        print(f"designed set: {len(designed)} built, {time.time() - started:.0f}s", file=sys.stderr, flush=True)
        if pending is None:
            results = [build_models(groups[0], args)]
        else:
            results = pending.get()
            pool.close()
            pool.join()
        records = [r for rec, _ in results for r in rec]
        failures = [f for _, fail in results for f in fail]
        print(f"{len(records)} variants built, {time.time() - started:.0f}s; timing", file=sys.stderr, flush=True)
        timings = []

        def measure(path: Path) -> float:  # measure_files' own timing, counted
            timings.append(path)
            return time_file(path, args.threads, args.warmup, args.runs)

        paths = [b.path for b in designed] + [Path(r["path"]) for r in records]
        times = measure_files(paths, measure=measure, **timing)
        print(f"{len(timings)} timings of {len(paths)} files ({len(timings) - args.rounds * len(paths)} beyond "
              f"{args.rounds} passes), {time.time() - started:.0f}s", file=sys.stderr, flush=True)
        suite = [Sample(b.name, b.table, ms, parts=profile_onnx(b.path, threads=args.threads))
                 for b, ms in zip(designed, times)]
        widths_dir = Path(workdir) / "widths"
        widths_dir.mkdir()
        widths = probe_widths(widths_dir, threads=args.threads).to_json()  # as `calibrate --target local` probes
        for r, ms in zip(records, times[len(designed):]):
            r["measured_ms"] = ms
            r["parts"] = profile_onnx(r["path"], threads=args.threads) if r["calib"] else None
            del r["path"]
    return {"records": records, "suite": suite, "widths": widths, "failures": failures, "seconds": round(time.time() - started),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "command": " ".join(["python", "benchmarks/predictor_accuracy.py", *sys.argv[1:]]), **timing,
            "jobs": args.jobs, "timings": len(timings), "files": len(paths)}


def score(raw: dict, models: list[str], channel_block: int = 0, layer_weight: float = LAYER_WEIGHT,
          scale_networks: bool = True) -> dict:
    """Refit `local` on the calibration variants and score the others (nn-Meter's measures)."""
    records = raw["records"]
    for r in records:  # runs recorded before tables named their network: the model spec stands for it
        if not getattr(r["table"], "network", ""):
            r["table"].network = r["model"]
    base = get_target("local")
    if channel_block:  # an experiment: pad to another block (the width probe in raw["widths"] shows the machine's)
        base = base.with_(channel_block=channel_block)
    calib = [Sample(f"{r['model']}#{r['index']}", r["table"], r["measured_ms"], parts=r.get("parts"))
             for r in records if r["calib"]]
    scored = [r for r in records if not r["calib"]]
    suite = raw.get("suite", [])
    # The designed layer set keeps bandwidths and overheads physical; the variants add whole-graph effects.
    llc = llc_choices(base)  # as `autocompress calibrate` chooses the cache size
    # As `calibrate --model` fits: the designed layers weigh LAYER_WEIGHT beside the searched networks' variants.
    fitted = (fit_target(base, suite + calib, "local", llc_choices=llc, layer_weight=layer_weight)
              if len(calib) >= 4 else base)
    unscaled = fitted
    if scale_networks and len(calib) >= 4:  # as `calibrate --model` ends: each network's bias on its own variants
        fitted = fitted.with_(network_scale=network_scales(fitted, calib))
    base = fit_target(base, suite, "local", llc_choices=llc) if len(suite) >= 4 else base  # what calibrate gives
    # Tried against the shipped --model fit: the designed set's coefficients kept, only each network's scale added.
    base_scaled = base.with_(network_scale=network_scales(base, calib)) if len(calib) >= 4 else base
    out = {k: v for k, v in raw.items() if k not in ("records", "suite")}
    out.update({"variants": len(records), "calibration_variants": len(calib), "scored_variants": len(scored),
                "suite_samples": len(suite), "base_target_calibrated": base.calibrated})
    for label, target in (("suite_only", base), ("suite_only_scaled", base_scaled),
                          ("suite_plus_calib_variants_unscaled", unscaled),
                          ("suite_plus_calib_variants", fitted)):
        preds = [predict(r["table"], target).latency_ms for r in scored]
        meas = [r["measured_ms"] for r in scored]
        out[label] = error_stats(preds, meas)
        per_model = {}
        for spec in models:
            idx = [k for k, r in enumerate(scored) if r["model"] == spec]
            per_model[spec] = error_stats([preds[k] for k in idx], [meas[k] for k in idx])
        out[label + "_per_model"] = per_model
        out[label + "_by_precision"] = {
            kind: error_stats([p for p, r in zip(preds, scored) if r["int8"] == is_int8],
                              [r["measured_ms"] for r in scored if r["int8"] == is_int8])
            for kind, is_int8 in (("fp32", False), ("int8", True))}
        if label == "suite_plus_calib_variants":
            out["rows"] = [{"model": r["model"], "index": r["index"], "int8": r["int8"], "kinds": r["kinds"],
                            "architecture": r.get("architecture", ""), "measured_ms": r["measured_ms"],
                            "predicted_ms": p} for r, p in zip(scored, preds)]
    out["part_bias"] = part_bias([r for r in records if r.get("parts")], fitted)
    out["calibration_fit"] = {"suite_only": dict(base.fit), "suite_plus_calib_variants": dict(fitted.fit)}
    out["network_scale"] = dict(fitted.network_scale)
    out["kinds_covered"] = sorted({k for r in records for k in r["kinds"]})
    out["int8_variants"] = sum(r["int8"] for r in records)
    out["channel_block"] = base.channel_block
    out["fitted_target"] = fitted.to_json()
    return out


def reproducibility(raw: dict, other: dict, models: list[str]) -> dict:
    """How well two measuring runs of the same variants agree: the ceiling that timing noise puts on
    any predictor's score (the same nn-Meter measures, one run taken as the prediction of the other)."""
    theirs = {(r["model"], r["index"]): r["measured_ms"] for r in other["records"]}
    pairs = [(theirs[(r["model"], r["index"])], r["measured_ms"], r["model"]) for r in raw["records"]
             if (r["model"], r["index"]) in theirs]
    out = {"other_run": other.get("date", ""), "all": error_stats([a for a, _, _ in pairs], [b for _, b, _ in pairs])}
    for spec in models:
        sel = [(a, b) for a, b, m in pairs if m == spec]
        out[spec] = error_stats([a for a, _ in sel], [b for _, b in sel])
    return out


def part_bias(records: list[dict], target) -> dict:
    """Per model and part: mean and spread of log(predicted / profiled) where the part holds >= 3 %.

    A diagnostic of where the latency model is wrong (profiling inflates tiny nodes a little).
    """
    import math
    import statistics

    from autocompress.hwmodels import PARTS

    acc: dict[str, dict[str, list[float]]] = {}
    for r in records:
        pred = predict(r["table"], target).parts
        for part in PARTS:
            m, p = r["parts"].get(part, 0.0), pred.get(part, 0.0)
            if max(m, p) >= 0.03 * r["measured_ms"]:
                acc.setdefault(r["model"], {}).setdefault(part, []).append(math.log((p + 1e-3) / (m + 1e-3)))
    return {model: {part: {"n": len(v), "mean_log_ratio": round(statistics.fmean(v), 3),
                           "sd": round(statistics.pstdev(v), 3)} for part, v in parts.items()}
            for model, parts in acc.items()}


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
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help=f"model specs, or sequence-model kinds: {' '.join(SEQUENCE_MODELS)}")
    ap.add_argument("--variants", type=int, default=40, help="variants per model")
    ap.add_argument("--calib-every", type=int, default=5, help="every n-th variant calibrates and is not scored")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls per pass")
    ap.add_argument("--runs", type=int, default=20, help="timed calls per pass")
    ap.add_argument("--rounds", type=int, default=4, help="passes over all files (runs x rounds timed calls each)")
    ap.add_argument("--time-cap", type=float, default=900.0, help="stop making variants after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick-suite", action="store_true", help="the designed set of `calibrate --quick`")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (models are split between them)")
    ap.add_argument("--out", default="predictor_accuracy.json")
    ap.add_argument("--raw", default="", help="pickle the measured variants here (tables included)")
    ap.add_argument("--rescore", default="", help="score a --raw pickle again instead of measuring")
    ap.add_argument("--reproducibility", default="",
                    help="a --raw pickle of another run of the same variants: report how well the runs agree")
    ap.add_argument("--channel-block", type=int, default=0,
                    help="score with this channel block instead of local's")
    ap.add_argument("--layer-weight", type=float, default=LAYER_WEIGHT,
                    help="a single layer's weight beside the calibration variants in the --model row's fit")
    args = ap.parse_args()
    import pickle

    if args.rescore:
        raw = pickle.loads(Path(args.rescore).read_bytes())
    else:
        raw = collect(args)
        if args.raw:
            Path(args.raw).write_bytes(pickle.dumps(raw))
    out = score(raw, args.models, args.channel_block, args.layer_weight)
    if args.reproducibility:
        out["reproducibility"] = reproducibility(raw, pickle.loads(Path(args.reproducibility).read_bytes()), args.models)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")
    brief = {k: v for k, v in out.items() if k not in ("rows", "fitted_target")}
    print(json.dumps(brief, indent=1, default=str))


if __name__ == "__main__":
    main()
