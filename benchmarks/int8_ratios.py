"""Predicted int8 speed-up of each fixed target, per op class and per whole network, against published ones.

For every built-in target with published numbers (``calibrated is None``: mobile, rpi4, x86-server,
gpu) this predicts one call of each model three times through the public API (``compress.estimate``
+ ``hwmodels.predict``): with no policy (fp32), with every ``wbits``/``abits`` decision at 16 (fp16)
and at 8 (int8). A ratio is float latency / int8 latency (above 1: int8 is faster). Models (random
init, no downloads):

- single-op models, one per op class, at shapes from MobileNetV2 / ResNet-18 / MobileNetV3-Large /
  BERT-base: dense 3x3 conv, depthwise 3x3 conv, pointwise 1x1 conv, Linear (one row, and 128 rows),
  and a MobileNetV3-Large block (expand 1x1, depthwise, squeeze-excitation, hard-swish, project 1x1,
  residual);
- whole networks: MobileNetV1 (defined here: torchvision has none), torchvision mobilenet_v2,
  mobilenet_v3_small/large, resnet18, resnet50, googlenet, squeezenet1_1, vgg16.

For the whole networks each conv/linear kernel's latency is also summed per op class (a kernel's
fused BN/activation/add counted in it; conversions, pools and other standalone ops under "other"),
so the per-class ratio inside a real network shows beside the single-op one. Each published ratio
of ``benchmarks/int8_published.py`` is then set beside the prediction for the model it names;
docs/int8-ratios.md discusses the comparison.

    .venv/bin/python benchmarks/int8_ratios.py [--json benchmarks/results/int8_ratios.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from autocompress.compress import estimate
from autocompress.hwmodels import TARGETS, get_target, predict
from autocompress.hwmodels.kernels import kernel_class
from autocompress.space.costs import CostTable
from autocompress.space.policy import Policy
from autocompress.workspace import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the published table sits beside this script
from int8_published import PUBLISHED_RATIOS, PublishedRatio  # noqa: E402

BAND = 1.5  # a predicted ratio within this factor of the published one agrees with it
NETWORKS = ("mobilenet_v1", "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small",
            "torchvision:mobilenet_v3_large", "torchvision:resnet18", "torchvision:resnet50", "torchvision:googlenet",
            "torchvision:squeezenet1_1", "torchvision:vgg16")
PRECISIONS = {"fp32": None, "fp16": 16, "int8": 8}  # every wbits/abits decision at these bits (None: no policy)
# Batches each target is predicted at: the GPU also at a throughput batch, where launches no longer dominate.
BATCHES = {"gpu": (1, 256)}
NETWORK = "network"
OTHER = "other"


@dataclass(frozen=True)
class OpModel:
    """A single-op (or single-block) model of one op class (inside a Sequential: a bare root layer is not traced)."""

    name: str
    op_class: str
    shape: tuple[int, ...]  # input shape at batch 1
    make: Callable[[], nn.Module]
    note: str


def _mbv3_block() -> nn.Module:
    from torchvision.models.mobilenetv3 import InvertedResidual, InvertedResidualConfig

    # MobileNetV3-Large's 112-channel stage at 14x14: expand to 672, 3x3 depthwise, SE, hard-swish.
    cfg = InvertedResidualConfig(112, 3, 672, 112, True, "HS", 1, 1, 1.0)
    return InvertedResidual(cfg, nn.BatchNorm2d)


def _conv(cin: int, cout: int, k: int, groups: int = 1, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def mobilenet_v1() -> nn.Module:
    """MobileNetV1 1.0 (Howard et al., 2017, Table 1): the model of the TFLite, ncnn and XNNPACK MobileNet tables."""
    widths = (64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
    strides = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)
    layers, cin = [_conv(3, 32, 3, stride=2)], 32
    for cout, stride in zip(widths, strides):
        layers += [_conv(cin, cin, 3, groups=cin, stride=stride), _conv(cin, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 1000))


OP_MODELS = (
    OpModel("conv3x3", "conv", (1, 64, 56, 56), lambda: _conv(64, 64, 3), "ResNet-18 layer1 conv, 64->64 at 56x56"),
    OpModel("depthwise3x3", "depthwise", (1, 144, 56, 56), lambda: _conv(144, 144, 3, groups=144),
            "MobileNetV2 block-2 depthwise, 144 ch at 56x56"),
    OpModel("pointwise1x1", "pointwise", (1, 24, 56, 56), lambda: _conv(24, 144, 1),
            "MobileNetV2 block-2 expansion, 24->144 at 56x56"),
    OpModel("linear", "linear", (1, 1280), lambda: nn.Sequential(nn.Linear(1280, 1000)),
            "MobileNetV2 classifier, 1280->1000, one row"),
    OpModel("bert_ffn", "linear", (1, 128, 768), lambda: nn.Sequential(nn.Linear(768, 3072)),
            "BERT-base FFN up-projection, 768->3072 over 128 tokens"),
    OpModel("mbv3_block", "hswish_se_block", (1, 112, 14, 14), _mbv3_block,
            "MobileNetV3-Large block: 112->672->112, 3x3 depthwise, SE, hard-swish, at 14x14"),
)
LOCAL_NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mobilenet_v1": (mobilenet_v1, (1, 3, 224, 224))}


@dataclass(frozen=True)
class Case:
    """A model and its cost table at each precision."""

    name: str
    op_class: str  # the op model's class, or NETWORK
    tables: dict[str, CostTable]


@dataclass(frozen=True)
class Ratio:
    """Predicted latency of one model (or one op class inside a network) on one target at each precision."""

    target: str
    batch: int
    model: str
    op_class: str  # an op class; NETWORK for a whole network's total
    fp32_ms: float
    fp16_ms: float
    int8_ms: float

    def over(self, baseline: str) -> float:
        """Baseline latency / int8 latency."""
        base = self.fp32_ms if baseline == "fp32" else self.fp16_ms
        return base / self.int8_ms if self.int8_ms > 0 else float("nan")


@dataclass(frozen=True)
class Comparison:
    """A published ratio and the predicted one for the model (and part) it names."""

    published: PublishedRatio
    predicted: float

    @property
    def factor(self) -> float:
        return self.predicted / self.published.ratio

    @property
    def agrees(self) -> bool:
        return 1 / BAND <= self.factor <= BAND


def build(name: str, op_class: str, module: nn.Module | None = None, shape: tuple[int, ...] | None = None) -> Case:
    ws = open_model(name, module=module, input_shape=shape)
    space = ws.space
    tables = {}
    for precision, bits in PRECISIONS.items():
        chosen = {} if bits is None else {d.id: bits for d in space.of_kind("wbits", "abits")}
        tables[precision] = estimate(space, Policy(space.model, space.fingerprint, chosen, space.options))
    return Case(name, op_class, tables)


def build_cases() -> list[Case]:
    cases = [build(m.name, m.op_class, m.make(), m.shape) for m in OP_MODELS]
    for spec in NETWORKS:
        make, shape = LOCAL_NETWORKS.get(spec, (None, None))
        cases.append(build(spec, NETWORK, make() if make else None, shape))
    return cases


def class_of_rows(table: CostTable) -> dict[str, str]:
    """Row name -> the op class its latency counts in (conv/linear rows by kernel class, the rest OTHER)."""
    return {r.name: (kernel_class(r.op, r.in_ch, r.groups, tuple(r.kernel)) if r.op in ("conv", "linear") else OTHER)
            for r in table}


def per_class_ms(table: CostTable, target: str, batch: int) -> tuple[float, dict[str, float]]:
    pred = predict(table, get_target(target), batch=batch)
    classes = class_of_rows(table)
    out: dict[str, float] = {}
    for layer in pred.layers:
        c = classes.get(layer.name, OTHER)
        out[c] = out.get(c, 0.0) + layer.latency_ms
    out[OTHER] = out.get(OTHER, 0.0) + (pred.latency_ms - sum(l.latency_ms for l in pred.layers))  # call overhead
    return pred.latency_ms, out


def ratios(case: Case, target: str, batch: int) -> list[Ratio]:
    totals, parts = {}, {}
    for precision, table in case.tables.items():
        totals[precision], parts[precision] = per_class_ms(table, target, batch)
    out = [Ratio(target, batch, case.name, case.op_class, *(totals[p] for p in PRECISIONS))]
    if case.op_class == NETWORK:
        for c in sorted(set().union(*parts.values())):
            out.append(Ratio(target, batch, case.name, c, *(parts[p].get(c, 0.0) for p in PRECISIONS)))
    return out


def compare(rows: list[Ratio]) -> list[Comparison]:
    """Each published ratio beside the predicted one for its model (the whole model, or the op class it names)."""
    op_class = {m.name: m.op_class for m in OP_MODELS}
    index = {(r.target, r.batch, r.model, r.op_class): r for r in rows}
    return [Comparison(p, index[(p.target, p.batch, p.compare_with,
                                 p.part or op_class.get(p.compare_with, NETWORK))].over(p.baseline))
            for p in PUBLISHED_RATIOS]


def fixed_targets() -> list[str]:
    return [n for n in TARGETS.names() if TARGETS.get(n).calibrated is None]


def machine() -> str:
    return f"{platform.node() or 'unknown'}: {platform.processor() or platform.machine()}, {platform.system()}"


def print_tables(rows: list[Ratio], comparisons: list[Comparison]) -> None:
    print(f"{'target':11s} {'batch':>5s} {'model':32s} {'op class':16s} {'fp32 ms':>10s} {'fp16 ms':>10s} "
          f"{'int8 ms':>10s} {'fp32/int8':>9s} {'fp16/int8':>9s}")
    for r in rows:
        print(f"{r.target:11s} {r.batch:5d} {r.model:32s} {r.op_class:16s} {r.fp32_ms:10.4f} {r.fp16_ms:10.4f} "
              f"{r.int8_ms:10.4f} {r.over('fp32'):9.2f} {r.over('fp16'):9.2f}")
    print()
    print(f"{'target':11s} {'compared with':32s} {'published model':30s} {'device':44s} {'base':>4s} "
          f"{'published':>9s} {'predicted':>9s} {'pred/pub':>8s}")
    for c in comparisons:
        p = c.published
        model = p.compare_with + (f"/{p.part}" if p.part else "")
        print(f"{p.target:11s} {model:32s} {p.published_model[:30]:30s} {p.device[:44]:44s} {p.baseline:>4s} "
              f"{p.ratio:9.2f} {c.predicted:9.2f} {c.factor:8.2f}{'' if c.agrees else '  outside x' + str(BAND)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="benchmarks/results/int8_ratios.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = build_cases()
    rows = [r for t in fixed_targets() for b in BATCHES.get(t, (1,)) for case in cases for r in ratios(case, t, b)]
    comparisons = compare(rows)
    print_tables(rows, comparisons)
    out: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "command": " ".join(["python", "benchmarks/int8_ratios.py", *sys.argv[1:]]), "band": BAND,
        "targets": {t: {k: v for k, v in TARGETS.get(t).summary().items()
                        if k in ("peak_gmacs", "efficiency", "int8_efficiency", "int8_class_efficiency", "fast_int8",
                                 "fast_fp16")} for t in fixed_targets()},
        "op_models": {m.name: {"op_class": m.op_class, "input_shape": list(m.shape), "note": m.note}
                      for m in OP_MODELS},
        "rows": [{**asdict(r), "fp32_over_int8": r.over("fp32"), "fp16_over_int8": r.over("fp16")} for r in rows],
        "comparisons": [{**asdict(c.published), "published_ratio": c.published.ratio, "predicted_ratio": c.predicted,
                         "predicted_over_published": c.factor, "agrees": c.agrees} for c in comparisons]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
