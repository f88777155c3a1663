"""Static against dynamic ONNX shapes: node count, agreement and ONNX Runtime latency of the same model.

For each model, the original and its all-int8 variant are exported twice (``export_onnx`` /
``export_int8``): with a dynamic batch axis (and token sequence axis), as ``search`` and ``apply``
ship by default, and with ``--static-shapes`` (every dimension fixed at the example input's). Each
pair is checked to compute the same outputs, its nodes are counted, and every file is timed with
``hwmodels.measure_files`` (quiet latency over interleaved passes, one intra-op thread) in
``--repeats`` independent measurements, reported as mean ± sd.

    python benchmarks/static_shapes.py [--models builtin:digits-net,torchvision:mobilenet_v2,...]
        [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from autocompress.api import open_model
from autocompress.compress import apply
from autocompress.compress.quant import layer_bits, strip_fake_quant
from autocompress.export.int8 import export_int8
from autocompress.export.onnx import export_onnx
from autocompress.hwmodels.measure import measure_files
from autocompress.space.policy import Policy

SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Concat", "Slice", "ConstantOfShape", "Expand", "Reshape")


def build(ws, variant: str, folder: Path, calibration: tuple) -> dict[bool, Path]:
    """``variant`` (``fp32``: the model as given; ``int8``: every wbits/abits decision at 8) written to
    ``folder`` with dynamic and with static shapes: {static: path}."""
    space = ws.space
    choices = {d.id: 8 for d in space.of_kind("wbits", "abits")} if variant == "int8" else {}
    model = apply(ws.model, Policy(space.model, space.fingerprint, choices, space.options), space,
                  calibration=calibration)
    float_model = strip_fake_quant(model)
    example = space.graph.example(1, seed=1)
    batches = [tuple(t[i:i + 8] for t in calibration) for i in range(0, len(calibration[0]), 8)]
    paths = {}
    for static in (False, True):
        path = paths[static] = folder / f"{variant}-{'static' if static else 'dynamic'}.onnx"
        if variant == "int8":
            export_int8(float_model, example, batches, path, layer_bits(model), static_shapes=static)
        else:
            export_onnx(float_model, example, path, static_shapes=static)
    return paths


def node_counts(path: Path) -> dict[str, int]:
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {"nodes": sum(ops.values()), "shape_ops": sum(ops[o] for o in SHAPE_OPS)}


def max_difference(a: Path, b: Path, inputs: tuple) -> float:
    """Largest |a - b| over the first outputs on ``inputs`` fed one sample at a time, relative to max |a|."""
    import numpy as np
    import onnxruntime as ort

    sa, sb = ort.InferenceSession(str(a)), ort.InferenceSession(str(b))
    worst, scale = 0.0, 1e-12
    for i in range(len(inputs[0])):
        feeds = {n.name: t[i:i + 1].numpy() for n, t in zip(sa.get_inputs(), inputs)}
        ra, rb = sa.run(None, feeds)[0], sb.run(None, feeds)[0]
        worst, scale = max(worst, float(np.abs(ra - rb).max())), max(scale, float(np.abs(ra).max()))
    return worst / scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="builtin:digits-net,torchvision:resnet18,torchvision:mobilenet_v2,"
                                        "benchmarks/models_transformers.py:bert_mini")
    ap.add_argument("--repeats", type=int, default=3, help="independent interleaved measurements per file")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average at the start {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    rows = []
    for spec in args.models.split(","):
        ws = open_model(spec)
        calibration = ws.space.graph.example(16, seed=0)
        with tempfile.TemporaryDirectory(prefix="autocompress-static-") as tmp:
            files = {(v, s): p for v in ("fp32", "int8") for s, p in build(ws, v, Path(tmp), calibration).items()}
            paths = list(files.values())
            ms: dict[Path, list[float]] = {p: [] for p in paths}
            for rep in range(args.repeats):
                t = time.perf_counter()
                for p, value in zip(paths, measure_files(paths, threads=1, seed=rep)):
                    ms[p].append(value)
                print(f"{spec} repeat {rep + 1}: " + ", ".join(f"{p.stem} {v[-1]:.3f}" for p, v in ms.items())
                      + f" ({time.perf_counter() - t:.0f} s)", flush=True)
            for variant in ("fp32", "int8"):
                dyn, sta = files[(variant, False)], files[(variant, True)]
                row = {"model": spec, "variant": variant, "dynamic": node_counts(dyn), "static": node_counts(sta),
                       "max_rel_difference": max_difference(dyn, sta, calibration)}
                for name, p in (("dynamic", dyn), ("static", sta)):
                    row[name].update(ms=ms[p], mean_ms=statistics.mean(ms[p]),
                                     sd_ms=statistics.stdev(ms[p]) if len(ms[p]) > 1 else 0.0)
                row["speedup"] = row["dynamic"]["mean_ms"] / row["static"]["mean_ms"]
                rows.append(row)
    print("\n| model | variant | nodes dynamic -> static | shape ops | dynamic ms | static ms | static speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, s = r["dynamic"], r["static"]
        print(f"| {r['model']} | {r['variant']} | {d['nodes']} -> {s['nodes']} | {d['shape_ops']} -> {s['shape_ops']} "
              f"| {d['mean_ms']:.3f} ± {d['sd_ms']:.3f} | {s['mean_ms']:.3f} ± {s['sd_ms']:.3f} | {r['speedup']:.3f}x "
              f"| {r['max_rel_difference']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "repeats": args.repeats,
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2))


if __name__ == "__main__":
    main()
