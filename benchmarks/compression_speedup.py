"""Measured ONNX Runtime speed-up of compressed models against their MAC reduction.

For each model (default: torchvision ResNet-18 and MobileNetV2 at 224x224,
random initialisation; latency does not depend on the weights' values) this
applies one policy per variant, exports it to ONNX and times it in ONNX
Runtime with one intra-op thread and with every core
(``hwmodels.measure_onnx``: median of ``--runs`` runs after ``--warmup``):

- ``original``: the model as given;
- ``prune-25/50/75``: every prune decision at 0.25 / 0.5 / 0.75;
- ``rank``: every rank decision at 0.5, or its smallest choice where 0.5 is not offered;
- ``bn-fold``: every ``merge:bn`` decision;
- ``int8``: every wbits and abits decision at 8 (QDQ ONNX from ``export.int8``).

The efficiency of a variant is (measured speed-up) / (MAC reduction): 1.0
means latency fell exactly as much as MACs did.

    python benchmarks/compression_speedup.py [--models torchvision:resnet18,torchvision:mobilenet_v2]
        [--runs 50] [--warmup 10] [--max-minutes 15] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from autocompress.api import open_model
from autocompress.compress import apply, estimate
from autocompress.compress.quant import layer_bits, strip_fake_quant
from autocompress.export.int8 import export_int8
from autocompress.export.onnx import export_onnx
from autocompress.hwmodels import measure_onnx
from autocompress.space.policy import Policy


def variant_choices(space) -> dict[str, dict]:
    """Variant name -> {decision id: choice}."""
    out: dict[str, dict] = {"original": {}}
    for ratio in (0.25, 0.5, 0.75):
        out[f"prune-{int(ratio * 100)}"] = {d.id: ratio for d in space.of_kind("prune")}
    out["rank"] = {d.id: (0.5 if 0.5 in d.choices else min(d.choices)) for d in space.of_kind("rank")}
    out["bn-fold"] = {d.id: 1 for d in space.of_kind("merge") if d.id.startswith("merge:bn:")}
    out["int8"] = {d.id: 8 for d in space.of_kind("wbits", "abits")}
    return out


def build(ws, name: str, choices: dict, folder: Path, calibration: torch.Tensor) -> tuple[Path, int, int]:
    """Apply, export; return (ONNX path, MACs, params) of the variant."""
    space = ws.space
    policy = Policy(space.model, space.fingerprint, choices, space.options)
    example = torch.randn(1, *space.input_shape[1:])
    model = apply(ws.model, policy, space, calibration=calibration)
    float_model = strip_fake_quant(model)
    path = folder / f"{name}.onnx"
    if name == "int8":
        batches = [calibration[i:i + 8] for i in range(0, len(calibration), 8)]
        export_int8(float_model, example, batches, path, layer_bits(model))
    else:
        export_onnx(float_model, example, path)
    totals = estimate(space, policy).totals()
    return path, int(totals["macs"]), int(totals["params"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="torchvision:resnet18,torchvision:mobilenet_v2")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="stop measuring new variants after this")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    torch.set_num_threads(1)  # building variants; ONNX Runtime threads are set per measurement
    threads = sorted({int(t) for t in args.threads.split(",")})
    start = time.perf_counter()
    results = []
    for spec in args.models.split(","):
        ws = open_model(spec)
        torch.manual_seed(0)
        calibration = torch.randn(16, *ws.space.input_shape[1:])
        with tempfile.TemporaryDirectory(prefix="autocompress-speedup-") as tmp:
            built = {}
            for name, choices in variant_choices(ws.space).items():
                t = time.perf_counter()
                built[name] = build(ws, name, choices, Path(tmp), calibration)
                print(f"{spec} {name}: built in {time.perf_counter() - t:.1f} s, {len(choices)} decisions", flush=True)
            names = list(built) + ["original"]  # the original again at the end shows the drift of the machine
            for th in threads:
                for i, name in enumerate(names):
                    if (time.perf_counter() - start) / 60 > args.max_minutes:
                        print(f"time cap of {args.max_minutes} min reached; {spec} {name} at {th} threads not measured")
                        break
                    path, macs, params = built[name]
                    m = measure_onnx(path, threads=th, warmup=args.warmup, runs=args.runs)
                    results.append({"model": spec, "variant": name if i < len(names) - 1 else "original (again)",
                                    "threads": th, "macs": macs, "params": params, **m.to_json()})
                    print(f"{spec} {name} threads={th}: median {m.median_ms:.2f} ms, min {m.min_ms:.2f} ms, "
                          f"cpu {m.cpu_median_ms:.2f} ms, cv {m.cv:.2f}", flush=True)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")


def print_table(results: list[dict]) -> None:
    """Speed-ups from the median wall time and from the median process CPU time per run.

    CPU time is steadier where other processes compete for the cores (with
    one thread it is the run's own compute time); with several threads it
    sums their work, so it shows efficiency rather than latency.
    """
    print("\n| model | variant | threads | MACs (M) | MAC reduction | median ms | speed-up | speed-up / MAC reduction "
          "| CPU ms | CPU speed-up / MAC reduction |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["model"], r["threads"]): r for r in results if r["variant"] == "original"}
    for r in results:
        b = base.get((r["model"], r["threads"]))
        if b is None:
            continue
        reduction = b["macs"] / r["macs"]
        speedup = b["median_ms"] / r["median_ms"]
        cpu_speedup = b["cpu_median_ms"] / r["cpu_median_ms"]
        print(f"| {r['model'].partition(':')[2]} | {r['variant']} | {r['threads']} | {r['macs'] / 1e6:.0f} "
              f"| {reduction:.2f}x | {r['median_ms']:.2f} | {speedup:.2f}x | {speedup / reduction:.2f} "
              f"| {r['cpu_median_ms']:.2f} | {cpu_speedup / reduction:.2f} |")


if __name__ == "__main__":
    main()
