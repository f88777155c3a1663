"""Measured ONNX Runtime speed-up of compressed models against their MAC reduction.

For each model (default: torchvision ResNet-18 and MobileNetV2 at 224x224,
random initialisation; latency does not depend on the weights' values) this
applies one policy per variant, exports it to ONNX and times it in ONNX
Runtime with one intra-op thread and with every core
(``hwmodels.measure_onnx``: median of ``--runs`` runs after ``--warmup``,
in ``--rounds`` rounds that interleave the variants; the median over rounds):

- ``original``: the model as given;
- ``prune-25/50/75``: every prune decision at 0.25 / 0.5 / 0.75;
- ``rank``: every rank decision at 0.5, or its smallest choice where 0.5 is not offered;
- ``bn-fold``: every ``merge:bn`` decision;
- ``int8``: every wbits and abits decision at 8 (QDQ ONNX from ``export.int8``).

The efficiency of a variant is (measured speed-up) / (MAC reduction): 1.0
means latency fell exactly as much as MACs did.

    python benchmarks/compression_speedup.py [--models torchvision:resnet18,torchvision:mobilenet_v2]
        [--runs 50] [--warmup 10] [--rounds 5] [--max-minutes 15] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
    if space.of_kind("heads"):  # transformer encoders: half the heads, and every other block dropped
        out["heads-50"] = {d.id: 0.5 for d in space.of_kind("heads") if 0.5 in d.choices}
        out["drop-half"] = {d.id: max(d.choices) for d in space.of_kind("drop")[1::2]}
    return out


def build(ws, name: str, choices: dict, folder: Path, calibration: tuple) -> tuple[Path, int, int]:
    """Apply, export; return (ONNX path, MACs, params) of the variant."""
    space = ws.space
    policy = Policy(space.model, space.fingerprint, choices, space.options)
    example = space.graph.example(1, seed=1)
    model = apply(ws.model, policy, space, calibration=calibration)
    float_model = strip_fake_quant(model)
    path = folder / f"{name}.onnx"
    if name == "int8":
        batches = [tuple(t[i:i + 8] for t in calibration) for i in range(0, len(calibration[0]), 8)]
        export_int8(float_model, example, batches, path, layer_bits(model))
        print(f"{space.model} int8: max |int8 - fp32| / max |fp32| on 8 inputs = "
              f"{int8_error(folder, float_model, example, path, calibration):.4f}", flush=True)
    else:
        export_onnx(float_model, example, path)
    totals = estimate(space, policy).totals()
    return path, int(totals["macs"]), int(totals["params"])


def int8_error(folder: Path, float_model, example, int8_path: Path, calibration: tuple) -> float:
    """How far the int8 file's first output is from the float file's on eight calibration inputs."""
    import numpy as np
    import onnxruntime as ort

    fp32 = export_onnx(float_model, example, folder / "int8-reference.onnx")
    a, b = ort.InferenceSession(str(fp32)), ort.InferenceSession(str(int8_path))
    feeds = {i.name: t[:8].numpy() for i, t in zip(a.get_inputs(), calibration)}
    ref, got = a.run(None, feeds)[0], b.run(None, feeds)[0]
    if np.abs(ref).max() < 1e-9:  # e.g. torchvision's ViT: its classifier starts at zero, so every output is 0
        return float("nan")
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="torchvision:resnet18,torchvision:mobilenet_v2")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per thread count")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="stop measuring new variants after this")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    torch.set_num_threads(1)  # building variants; ONNX Runtime threads are set per measurement
    threads = sorted({int(t) for t in args.threads.split(",")})
    start = time.perf_counter()
    print(f"load average at the start {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    results = []
    for spec in args.models.split(","):
        ws = open_model(spec)
        for m in ws.model.modules():  # zero-initialised classifiers (ViT) make every output 0: give them weights
            if isinstance(m, torch.nn.Linear) and not m.weight.abs().sum():
                torch.nn.init.normal_(m.weight, std=0.02)
        calibration = ws.space.graph.example(16, seed=0)  # one tensor per model input (token ids stay ids)
        with tempfile.TemporaryDirectory(prefix="autocompress-speedup-") as tmp:
            built = {}
            for name, choices in variant_choices(ws.space).items():
                t = time.perf_counter()
                built[name] = build(ws, name, choices, Path(tmp), calibration)
                print(f"{spec} {name}: built in {time.perf_counter() - t:.1f} s, {len(choices)} decisions", flush=True)
            # Rounds interleave the variants, so a change in the machine's load hits all of them alike;
            # each round times every variant (median of --runs after --warmup), the table takes the
            # median over rounds.
            for th in threads:
                per: dict[str, list] = {name: [] for name in built}
                for rnd in range(args.rounds):
                    if (time.perf_counter() - start) / 60 > args.max_minutes:
                        print(f"time cap of {args.max_minutes} min reached after {rnd} rounds at {th} threads")
                        break
                    for name, (path, _, _) in built.items():
                        per[name].append(measure_onnx(path, threads=th, warmup=args.warmup, runs=args.runs))
                    print(f"{spec} threads={th} round {rnd + 1}: " + ", ".join(
                        f"{n} {ms[-1].median_ms:.2f}" for n, ms in per.items()), flush=True)
                for name, ms in per.items():
                    if not ms:
                        continue
                    _, macs, params = built[name]
                    medians = sorted(m.median_ms for m in ms)
                    results.append({"model": spec, "variant": name, "threads": th, "macs": macs, "params": params,
                                    "rounds": len(ms), "runs_per_round": args.runs, "warmup": args.warmup,
                                    "median_ms": statistics.median(medians), "round_min_ms": medians[0],
                                    "round_max_ms": medians[-1],
                                    "cpu_median_ms": statistics.median(m.cpu_median_ms for m in ms)})
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {(time.perf_counter() - start) / 60:.1f} min; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")


def print_table(results: list[dict]) -> None:
    """Speed-ups from the median wall time and from the median process CPU time per run.

    CPU time is steadier where other processes compete for the cores (with
    one thread it is the run's own compute time); with several threads it
    sums their work, so it shows efficiency rather than latency.
    """
    print("\n| model | variant | threads | MACs (M) | MAC reduction | median ms | speed-up | speed-up / MAC reduction "
          "| rounds' range ms | CPU ms | CPU speed-up / MAC reduction |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
              f"| {r['round_min_ms']:.2f}-{r['round_max_ms']:.2f} | {r['cpu_median_ms']:.2f} "
              f"| {cpu_speedup / reduction:.2f} |")


if __name__ == "__main__":
    main()
