"""The designed measurement set of ``calibrate --target local``: layer configurations, small networks and
random compressed variants, built and exported as deployed, then timed together."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from autocompress.hwmodels.calibrate._fit import Sample
from autocompress.hwmodels.measure import measure_files, profile_onnx
from autocompress.space.costs import CostTable

# (name, module factory, input shape or, for token ids and other non-float inputs, an ``Inputs``)
Config = tuple[str, Callable[[], Any], Any]


def designed_set(quick: bool) -> list[Config]:
    """(name, module factory, input shape): convs, depthwise, linear, elementwise and small networks."""
    from torch import nn

    def cbr(cin: int, cout: int, k: int, s: int = 1, g: int = 1) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU())

    def linear(cin: int, cout: int) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(nn.Linear(cin, cout))

    out: list[Config] = []
    grid = [(112, 16), (112, 32), (56, 24), (56, 64), (28, 96), (28, 128), (14, 160), (14, 256), (7, 320), (7, 512)]
    if quick:
        grid = grid[1::3]
    for hw, ch in grid:
        out.append((f"conv3x3 {ch}@{hw}", cbr(ch, ch, 3), (1, ch, hw, hw)))
        out.append((f"conv1x1 {ch}->{2 * ch}@{hw}", cbr(ch, 2 * ch, 1), (1, ch, hw, hw)))
        out.append((f"dw3x3 {4 * ch}@{hw}", cbr(4 * ch, 4 * ch, 3, g=4 * ch), (1, 4 * ch, hw, hw)))
        if not quick:
            out.append((f"conv3x3s2 {ch}->{2 * ch}@{hw}", cbr(ch, 2 * ch, 3, 2), (1, ch, hw, hw)))
            out.append((f"conv1x1 {2 * ch}->{ch}@{hw}", cbr(2 * ch, ch, 1), (1, 2 * ch, hw, hw)))
            out.append((f"dw3x3s2 {4 * ch}@{hw}", cbr(4 * ch, 4 * ch, 3, 2, g=4 * ch), (1, 4 * ch, hw, hw)))
            out.append((f"conv5x5 {ch // 2}->{ch}@{hw}", cbr(ch // 2, ch, 5), (1, ch // 2, hw, hw)))
    out += [("stem7x7s2 3->64@224", cbr(3, 64, 7, 2), (1, 3, 224, 224)),
            ("stem3x3s2 3->32@224", cbr(3, 32, 3, 2), (1, 3, 224, 224)),
            ("grouped3x3 g4 128@28", cbr(128, 128, 3, g=4), (1, 128, 28, 28))]
    # Linears as a classifier reads them (one row) and as a transformer does (a row per token), fp32 and int8:
    # without int8 rows per token the fit sets the int8 linear rate from classifiers alone, 100x off for BERT.
    linears = [(512, 1000, 1), (1280, 1000, 1), (256, 128, 1), (256, 1024, 128), (512, 128, 64)]
    for cin, cout, rows in (linears if not quick else linears[::3]):
        shape = (1, cin) if rows == 1 else (1, rows, cin)
        tag = f"linear {cin}->{cout}" + (f" T{rows}" if rows > 1 else "")
        out += [(tag, linear(cin, cout), shape), (f"int8 {tag}", linear(cin, cout), shape)]
    int8 = [(f"int8 conv3x3 {c}@{hw}", cbr(c, c, 3), (1, c, hw, hw)) for hw, c in ((56, 64), (28, 128), (14, 256))]
    int8 += [(f"int8 conv1x1 {c}->{2 * c}@{hw}", cbr(c, 2 * c, 1), (1, c, hw, hw)) for hw, c in ((56, 32), (28, 96), (7, 320))]
    int8 += [(f"int8 dw3x3 {c}@{hw}", cbr(c, c, 3, g=c), (1, c, hw, hw)) for hw, c in ((56, 144), (14, 576))]
    out += int8[::3] if quick else int8
    out += [("maxpool3x3s2 64@112", lambda: nn.MaxPool2d(3, 2, 1), (1, 64, 112, 112)),
            ("avgpool global 512@7", lambda: nn.AdaptiveAvgPool2d(1), (1, 512, 7, 7))]
    # Widths that are not whole channel blocks (pruned layers): plain kernels and pools on `local`.
    plain = [("dw3x3 58@28 (plain)", cbr(58, 58, 3, g=58), (1, 58, 28, 28)),
             ("conv1x1 58->116@28 (plain)", cbr(58, 116, 1), (1, 58, 28, 28)),
             ("conv3x3 29->64@28 (plain)", cbr(29, 64, 3), (1, 29, 28, 28)),
             ("dw3x3s2 54@56 (plain)", cbr(54, 54, 3, 2, g=54), (1, 54, 56, 56)),
             ("maxpool3x3s1 72@28 (plain)", lambda: nn.MaxPool2d(3, 1, 1), (1, 72, 28, 28))]
    out += plain[:1] if quick else plain
    nets = [("digits-net", "builtin:digits-net", None), ("resnet18@112", "torchvision:resnet18", (1, 3, 112, 112)),
            ("mobilenet_v2 x0.5@160", "tv-mnv2-0.5", (1, 3, 160, 160)),
            ("squeezenet1_1@112", "torchvision:squeezenet1_1", (1, 3, 112, 112)),
            ("shufflenet_v2_x0_5", "torchvision:shufflenet_v2_x0_5", None)]
    for name, spec, shape in (nets[:2] if quick else nets):
        out.append((name, _net_factory(spec), shape or _default_shape(spec)))
    if not quick:
        out.append(("int8 resnet18@112", _net_factory("torchvision:resnet18"), (1, 3, 112, 112)))
    from autocompress.hwmodels.calibrate._sequence_nets import sequence_configs

    return out + sequence_configs(quick)  # attention, GELU, LayerNorm, LSTM/GRU and Conv1d rows


def _default_shape(spec: str) -> tuple[int, ...]:
    return (1, 1, 32, 32) if spec == "builtin:digits-net" else (1, 3, 224, 224)


def _mobilenet_v2_half() -> Any:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)


def _mobilenet_v2_three_quarters() -> Any:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, width_mult=0.75)


# Networks the designed set uses that are not in the model registry.
_EXTRA_NETS: dict[str, Callable[[], Any]] = {"tv-mnv2-0.5": _mobilenet_v2_half,
                                              "tv-mnv2-0.75": _mobilenet_v2_three_quarters}


def _net_factory(spec: str) -> Callable[[], Any]:
    def make() -> Any:
        if spec in _EXTRA_NETS:
            return _EXTRA_NETS[spec]()
        from autocompress.models import load_model

        return load_model(spec).model
    return make


# Small networks whose random compressed variants calibrate `local` (other widths and resolutions
# than the zoo models a user searches, so the fit is not tuned to them).
# The last one has 224x224 activations of several MB, which other tenants' cache traffic slows more than
# the small networks' (without it MobileNetV2 at 224x224 was underpredicted by 9 % on two machine states).
VARIANT_NETS = (("builtin:digits-net", None), ("torchvision:resnet18", (1, 3, 112, 112)),
                ("tv-mnv2-0.5", (1, 3, 160, 160)), ("torchvision:squeezenet1_1", (1, 3, 112, 112)),
                ("torchvision:shufflenet_v2_x0_5", None), ("tv-mnv2-0.75", (1, 3, 224, 224)))


@dataclass(frozen=True)
class Built:
    """A configuration as it deploys: its cost table and its exported ONNX file."""

    name: str
    table: CostTable
    path: Path


def time_built(built: Sequence[Built], threads: int = 1, warmup: int = 10, runs: int = 20, rounds: int = 4,
               profile: bool = True, measure: Callable[[Path], float] | None = None,
               on_timed: Callable[[int], None] | None = None) -> list[Sample]:
    """Samples from built configurations: all timed together with ``measure_files``, so layers and
    networks share the machine's conditions, and profiled per node if asked. ``measure`` times one
    file elsewhere (a device command) instead of ONNX Runtime here."""
    times = measure_files([b.path for b in built], threads=threads, warmup=warmup, runs=runs, rounds=rounds,
                          measure=measure, on_timed=on_timed)
    return [Sample(b.name, b.table, ms, parts=profile_onnx(b.path, threads=threads) if profile else None)
            for b, ms in zip(built, times)]


def build_configs(configs: Iterable[Config], folder: Path, on_built: Callable[[], None] | None = None) -> list[Built]:
    """Export and trace each configuration into ``folder``; a name starting with "int8 " is
    exported with every layer at 8 bits, as the int8 exporter deploys it."""
    import torch

    from autocompress.compress.quant import layer_bits
    from autocompress.export.int8 import export_int8
    from autocompress.export.onnx import export_onnx
    from autocompress.space.graph import trace
    from autocompress.space.inputs import Inputs

    built = []
    sub = Path(tempfile.mkdtemp(prefix="configs-", dir=folder))
    for name, make, shape in configs:
        model = make().eval()
        if isinstance(shape, Inputs):  # several or non-float inputs (token ids)
            x, table = shape.example(1, seed=0), CostTable.from_graph(trace(model, inputs=shape))
        else:
            x, table = torch.randn(*shape), CostTable.from_graph(trace(model, shape))
        stem = sub / str(len(built))
        if name.startswith("int8 "):
            bits = {p: (8, 8) for p in layer_bits(model)}
            calib = shape.example(2, seed=1) if isinstance(shape, Inputs) else torch.randn(2, *shape[1:])
            path = export_int8(model, x, [calib], stem.with_suffix(".int8.onnx"), bits).path
            for r in table:
                if r.op in ("conv", "linear"):
                    r.wbits = r.abits = 8
        else:
            path = export_onnx(model, x, stem.with_suffix(".onnx"))
        built.append(Built(name, table, path))
        if on_built is not None:
            on_built()
    return built


def build_variants(nets: Sequence[tuple[str, tuple[int, ...] | None]], per_net: int, folder: Path,
                   seed: int = 0, kinds: Sequence[str] = (), on_built: Callable[[], None] | None = None) -> list[Built]:
    """Random compressed variants (every decision kind, or only ``kinds``) of each (model spec, input
    shape or None for the model's own), exported as deployed into ``folder``. A spec opens as a search
    opens it (``workspace.open_model``): its own example inputs (token ids and several inputs included),
    attention split into heads."""
    from autocompress.compress import build_space
    from autocompress.space.graph import trace
    from autocompress.workspace import open_model

    built = []
    for spec, shape in nets:
        if spec in _EXTRA_NETS:
            model = _EXTRA_NETS[spec]().eval()
            space = build_space(trace(model, shape or _default_shape(spec)), spec)
        else:
            ws = open_model(spec, input_shape=shape)
            model, space = ws.model.eval(), ws.space
        built += model_variants(model, space, spec, per_net, folder, seed=seed, kinds=kinds, on_built=on_built)
    return built


def model_variants(model: Any, space: Any, label: str, count: int, folder: Path, seed: int = 0,
                   kinds: Sequence[str] = (), on_built: Callable[[], None] | None = None) -> list[Built]:
    """``count`` random compressed variants of one opened model (its search space), exported as deployed
    into ``folder`` and named ``variant_name(label, i)``."""
    from autocompress.compress import apply, estimate

    model = model.eval()
    example = space.graph.example(1, seed=0)
    rng = random.Random(f"{seed}-{label}")
    built = []
    for v in range(count):
        policy = random_policy(space, rng, kinds)
        sub = Path(tempfile.mkdtemp(prefix="variant-", dir=folder))
        path, _ = export_deployed(apply(model, policy, space), example, sub)
        built.append(Built(variant_name(label, v), estimate(space, policy), path))
        if on_built is not None:
            on_built()
    return built


_VARIANT = " variant "


def variant_name(spec: str, index: int) -> str:
    """The name of ``spec``'s ``index``-th random variant (``spec_of_variant`` reads it back)."""
    return f"{spec}{_VARIANT}{index}"


def spec_of_variant(name: str) -> str:
    """The model spec of a variant named by ``variant_name`` ("" for any other configuration)."""
    spec, sep, _ = name.rpartition(_VARIANT)
    return spec if sep else ""


def random_policy(space: Any, rng: random.Random, kinds: Sequence[str] = ()) -> Any:
    """A random policy over every decision kind (or only ``kinds``): each decision takes a random
    non-identity choice with a probability drawn per policy (0.1-0.6)."""
    from autocompress.space.policy import Policy

    p = rng.uniform(0.1, 0.6)
    chosen = {}
    for d in space.decisions:
        if kinds and d.kind not in kinds:
            continue
        others = [c for c in d.choices if c != d.identity]
        if others and rng.random() < p:
            chosen[d.id] = rng.choice(others)
    return Policy(space.model, space.fingerprint, chosen, space.options)


def export_deployed(model: Any, example: Any, folder: Path) -> tuple[Path, bool]:
    """The file a compressed model deploys as: int8 QDQ where a layer ``runs_int8``, else fp32.
    ``example`` is a tensor or a tuple of tensors (one per model input)."""
    from autocompress.export.artifacts import deployed_file
    from autocompress.space.inputs import Inputs

    calibration = Inputs.from_example(example).example(2, seed=0)  # ranges only: the file is timed, not scored
    path = deployed_file(model, example, folder, calibration)
    return path, path.name == "model.int8.onnx"
