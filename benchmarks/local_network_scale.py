"""What a search's own network scale on `local` buys: held-out variants predicted before and after it.

For each network: the calibrated `local` in the cache (its scales removed) predicts ``--held-out`` random
variants (no low-rank decisions, as the scale step builds them; a seed the scale step does not use); then
``ensure_network_scale`` times ``SCALE_VARIANTS`` variants, as a search on `local` does the first time it
meets the network, and the same held-out variants are predicted again. Everything is timed with the
calibration's protocol (``measure_files``). The cached `local` is not changed (a copy is scaled).

    .venv/bin/python benchmarks/local_network_scale.py --models torchvision:resnet18 torchvision:mobilenet_v2 \
        --held-out 12 --seeds 2 3 --out benchmarks/results/local_network_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["torchvision:resnet18", "torchvision:mobilenet_v2"])
    ap.add_argument("--held-out", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[2])
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import torch

    from autocompress.hwmodels import predict
    from autocompress.hwmodels.calibrate import ensure_network_scale, error_stats, measure_files, model_variants
    from autocompress.hwmodels.calibrate._network import scale_kinds
    from autocompress.hwmodels.targets import get_target, target_path
    from autocompress.workspace import open_model

    torch.set_num_threads(1)
    source = target_path("local")
    if not source.is_file():
        raise SystemExit("no calibrated `local` in the cache: run `autocompress calibrate --target local --quick` first")
    base = get_target("local").with_(network_scale={})
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        os.environ["AUTOCOMPRESS_CACHE"] = str(Path(tmp) / "cache")  # the scaled copy lives here
        for spec in args.models:
            ws = open_model(spec)
            kinds = scale_kinds(ws.space)
            for seed in args.seeds:
                base.save(target_path("local"))  # unscaled again for each seed
                held = model_variants(ws.model, ws.space, spec, args.held_out, Path(tmp), seed=100 + seed, kinds=kinds)
                t = time.time()
                scaled = ensure_network_scale("local", ws.model, ws.space, spec)
                scale_s = time.time() - t
                measured = measure_files([b.path for b in held], rounds=2)
                before = [predict(b.table, base).latency_ms for b in held]
                after = [predict(b.table, get_target("local")).latency_ms for b in held]
                row = {"model": spec, "seed": seed, "scale": scaled.scale if scaled else None,
                       "scale_seconds": round(scale_s, 1),
                       "within_10_before": error_stats(before, measured)["within_10"],
                       "within_10_after": error_stats(after, measured)["within_10"],
                       "median_err_before": statistics.median(p / m - 1 for p, m in zip(before, measured)),
                       "median_err_after": statistics.median(p / m - 1 for p, m in zip(after, measured))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for spec in args.models:
        mine = [r for r in rows if r["model"] == spec]
        for key in ("within_10_before", "within_10_after", "scale_seconds"):
            vals = [r[key] for r in mine]
            summary[f"{spec} {key}"] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary, "command": " ".join(sys.argv),
                                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                              "cached_local_fit": base.fit.get("plan")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
