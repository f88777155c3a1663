"""Fit a target's per-kernel-class coefficients to measured latencies.

``calibrate_local`` measures a designed set of layer configurations and small
networks in ONNX Runtime on this machine; ``calibrate_from_csv`` reads
latencies measured elsewhere (on the device). Both fit, by least squares on
the log of predicted / measured latency: the efficiency of each kernel class,
DRAM and cache bandwidth, and the kernel, elementwise and per-call overheads.
The peaks, cache size and energies stay as the base target states them.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from autocompress.errors import UserInputError
from autocompress.hwmodels.predict import PARTS, elem_part, kernel_part, predict, structure
from autocompress.hwmodels.target import DTYPES, KERNEL_CLASSES, Target
from autocompress.hwmodels.targets import get_target, target_path
from autocompress.space.costs import CostTable, LayerCost


@dataclass
class Sample:
    """One measured configuration: its cost table and measured latency (ms) at ``batch``."""

    name: str
    table: CostTable
    measured_ms: float
    batch: int = 1
    parts: dict[str, float] | None = None  # milliseconds per latency part, from a runtime profile
    weight: float = 1.0  # the sample's weight in the fit


# ---- fitting -------------------------------------------------------------------------------

# Parts of a profile the fit matches besides the totals. Conversions, reorders, elementwise and
# shape ops are many tiny nodes that profiling inflates by a few microseconds each, so they are
# left to the totals; int8 convs, linear layers and pools are few, large nodes whose share the
# totals alone cannot pin down (int8 convs and conversions always occur together). On the accuracy
# benchmark this lowered RMSPE on held-out variants (docs/hwmodels.md); fitting every part, or
# weighting parts at 0.5, made it worse.
FITTED_PARTS = ("qconv", "linear", "pool")
PART_WEIGHT = 0.3

_GLOBAL = ("dram_gbs", "cache_gbs", "kernel_overhead_us", "elementwise_overhead_us", "call_overhead_us",
           "gemm_k0", "gemm_s0", "out_ns")


class _Problem:
    """Samples flattened into per-kernel arrays, so one evaluation is a few numpy ops per sample."""

    def __init__(self, base: Target, samples: Sequence[Sample], layer_weight: float = 1.0) -> None:
        import numpy as np

        self.base = base
        self.meas = np.array([s.measured_ms * 1e3 for s in samples])
        self.weight = np.array([s.weight * (layer_weight if single_layer(s.table) else 1.0) for s in samples])
        self.rows = []
        used_cls: set[str] = set()
        int8_cls: set[str] = set()
        has = {"qpool": False, "ppool": False, "reorder": False, "convert": False, "view": False}
        plain_cls: set[str] = set()
        # Profiled parts (µs) that the fit also matches, where a sample has a profile.
        self.part_rows: list[tuple[int, Any, Any, Any, float]] = []
        pidx = np.array([PARTS.index(p) for p in FITTED_PARTS], dtype=int)
        for si, s in enumerate(samples):
            if s.parts and len(pidx):
                meas = np.array([s.parts.get(p, 0.0) * 1e3 for p in PARTS])[pidx]
                eps = 0.02 * s.measured_ms * 1e3
                self.part_rows.append((si, pidx, meas >= eps, meas, eps))
            st = structure(s.table, base, s.batch)
            ks, es = st.kernels, st.elems
            ops = {r.name: r.op for r in s.table}
            cls = np.array([KERNEL_CLASSES.index(k[1]) for k in ks], dtype=int)
            dt = np.array([DTYPES.index(k[2]) for k in ks], dtype=int)
            used_cls.update(k[1] for k in ks)
            int8_cls.update(k[1] for k in ks if k[2] == "int8")
            self.rows.append({
                "cls": cls, "dt": dt, "macs": np.array([k[3] for k in ks], dtype=float),
                "abytes": np.array([k[5] - k[8] for k in ks], dtype=float), "lvl": np.array([k[6] for k in ks], dtype=int),
                "wb": np.array([k[8] for k in ks], dtype=float), "wlvl": np.array([k[17] for k in ks], dtype=int),
                "kpart": np.array([PARTS.index(kernel_part(k[1], k[2])) for k in ks], dtype=int),
                "k_len": np.array([k[9] if k[1] not in ("depthwise", "linear") else 1e12 for k in ks], dtype=float),
                "spatial": np.array([k[10] if k[1] != "linear" else 1e12 for k in ks], dtype=float),
                "cv_b": np.array([k[11] for k in ks], dtype=float),
                "n_out": np.array([k[15] for k in ks], dtype=float),
                "plain": np.array([k[16] for k in ks], dtype=bool), "eppool": np.array([e[10] for e in es], dtype=float),
                "ebytes": np.array([e[1] - e[9] for e in es], dtype=float), "elvl": np.array([e[2] for e in es], dtype=int),
                "eview": np.array([e[4] for e in es], dtype=bool), "eqpool": np.array([e[6] for e in es], dtype=float),
                "ecv_b": np.array([e[9] for e in es], dtype=float),
                "epart": np.array([PARTS.index(elem_part(ops.get(e[0], ""))) for e in es], dtype=int),
                "cv_n": sum(k[12] for k in ks) + sum(e[5] for e in es),
                "ro_e": sum(k[13] for k in ks) + sum(e[7] for e in es),
                "ro_n": sum(k[14] for k in ks) + sum(e[8] for e in es)})
            has["qpool"] |= any(e[6] for e in es)
            has["ppool"] |= any(e[10] for e in es)
            plain_cls.update(k[1] for k in ks if k[16])
            has["reorder"] |= any(k[13] for k in ks) or any(e[7] for e in es)
            has["convert"] |= any(k[11] for k in ks) or any(e[9] for e in es)
            has["view"] |= any(e[4] for e in es)
        self.classes = [c for c in KERNEL_CLASSES if c in used_cls]
        llc = ["llc_gbs"] if base.llc_bytes else []
        self.int8_classes = [c for c in KERNEL_CLASSES if c in int8_cls]
        self.plain_classes = [c for c in KERNEL_CLASSES if c in plain_cls]
        self.names = ([f"efficiency.{c}" for c in self.classes] + [f"int8_class_efficiency.{c}" for c in self.int8_classes]
                      + [f"plain_efficiency.{c}" for c in self.plain_classes] + (["plain_pool_ns"] if has["ppool"] else [])
                      + (["int8_out_ns"] if self.int8_classes else [])
                      + list(_GLOBAL) + llc + (["int8_pool_ns"] if has["qpool"] else [])
                      + (["reorder_ns"] if has["reorder"] else []) + (["convert_ns"] if has["convert"] else [])
                      + (["view_overhead_us"] if has["view"] else []))
        self.peak = np.array([base.peak_gmacs[d] for d in DTYPES])

    def x0(self) -> list[float]:
        return [math.log(self._value(self.base, n)) for n in self.names]

    @staticmethod
    def _value(t: Target, name: str) -> float:
        if name.startswith("efficiency."):
            return t.efficiency[name.split(".", 1)[1]]
        if name.startswith("int8_class_efficiency."):
            return t.int8_class_efficiency.get(name.split(".", 1)[1], 1.0)
        if name.startswith("plain_efficiency."):
            return t.plain_efficiency.get(name.split(".", 1)[1], 1.0)
        return max(float(getattr(t, name)), 1e-3)

    def target(self, x: Sequence[float], **extra: Any) -> Target:
        vals = dict(zip(self.names, (math.exp(v) for v in x)))
        eff = dict(self.base.efficiency)
        for c in self.classes:
            eff[c] = vals.pop(f"efficiency.{c}")
        i8 = dict(self.base.int8_class_efficiency)
        for c in self.int8_classes:
            i8[c] = vals.pop(f"int8_class_efficiency.{c}")
        plain = dict(self.base.plain_efficiency)
        for c in self.plain_classes:
            plain[c] = vals.pop(f"plain_efficiency.{c}")
        return self.base.with_(efficiency=eff, int8_class_efficiency=i8, plain_efficiency=plain, **vals, **extra)

    def predicted_parts(self, x: Sequence[float]) -> tuple[Any, Any]:
        """(total µs per sample, µs per part per sample): the same sums as ``predict``, vectorised."""
        import numpy as np

        t = self.target(x)
        eff = np.array([t.efficiency[c] for c in KERNEL_CLASSES])
        i8c = np.array([t.int8_efficiency * t.int8_class_efficiency.get(c, 1.0) for c in KERNEL_CLASSES])
        plc = np.array([t.plain_efficiency.get(c, 1.0) for c in KERNEL_CLASSES])
        inv_d = 1.0 / (t.dram_gbs * 1e3)
        inv = np.array([1.0 / (t.cache_gbs * 1e3), 1.0 / (t.llc_gbs * 1e3) if t.llc_bytes and t.llc_gbs else inv_d, inv_d])
        cvt_us, ro_us, eov = t.convert_ns / 5e3, t.reorder_ns / 1e3, t.elementwise_overhead_us
        vov = t.view_overhead_us or eov
        n_parts = len(PARTS)
        parts = np.zeros((len(self.rows), n_parts))
        ci, ri = PARTS.index("convert"), PARTS.index("reorder")
        for i, r in enumerate(self.rows):
            dt, cls, lvl = r["dt"], r["cls"], r["lvl"]
            slow = (1.0 + t.gemm_k0 / r["k_len"]) * (1.0 + t.gemm_s0 / r["spatial"])
            comp = r["macs"] * slow / (self.peak[dt] * eff[cls] * np.where(dt == 2, i8c[cls], 1.0)
                                       * np.where(r["plain"], plc[cls], 1.0) * 1e3)
            core = (np.maximum(comp, r["abytes"] * inv[lvl] + r["wb"] * inv[r["wlvl"]]) + t.kernel_overhead_us
                    + r["n_out"] * np.where(dt == 2, t.int8_out_ns, t.out_ns) / 1e3)
            ecore = (r["ebytes"] * inv[r["elvl"]] + np.where(r["eview"], vov, eov)
                     + r["eqpool"] * t.int8_pool_ns / 1e3 + r["eppool"] * t.plain_pool_ns / 1e3)
            row = np.bincount(r["kpart"], core, n_parts) + np.bincount(r["epart"], ecore, n_parts)
            row[ci] += ((r["cv_b"] * (inv[lvl] + cvt_us)).sum() + (r["ecv_b"] * (inv[r["elvl"]] + cvt_us)).sum()
                        + r["cv_n"] * eov)
            row[ri] += r["ro_e"] * ro_us + r["ro_n"] * eov
            parts[i] = row
        return parts.sum(axis=1) + t.call_overhead_us, parts

    def predicted_us(self, x: Sequence[float]) -> Any:
        return self.predicted_parts(x)[0]

    def residuals(self, x: Sequence[float]) -> Any:
        """Log error of each sample's total, plus ``PART_WEIGHT`` times the log error of each of its
        profiled ``FITTED_PARTS`` that holds at least 2 % of the total."""
        import numpy as np

        total, parts = self.predicted_parts(x)
        res = [self.weight * np.log(total / self.meas)]
        for i, pidx, mask, meas, eps in self.part_rows:
            res.append(self.weight[i] * PART_WEIGHT * mask * np.log((parts[i][pidx] + eps) / (meas + eps)))
        return np.concatenate(res)


def error_stats(predicted_ms: Sequence[float], measured_ms: Sequence[float]) -> dict[str, float]:
    """nn-Meter's accuracy measures: share within ±10 % and ±5 %, RMSPE, plus the median |error|."""
    errs = [(p - m) / m for p, m in zip(predicted_ms, measured_ms)]
    if not errs:
        return {"samples": 0}
    abs_errs = sorted(abs(e) for e in errs)
    n = len(errs)
    return {"samples": n, "within_10": sum(e <= 0.10 for e in abs_errs) / n,
            "within_5": sum(e <= 0.05 for e in abs_errs) / n,
            "rmspe": math.sqrt(sum(e * e for e in errs) / n), "median_abs_err": abs_errs[n // 2],
            "max_abs_err": abs_errs[-1]}


def fit_target(base: Target, samples: Sequence[Sample], name: str | None = None,
               sources_note: str = "fitted by autocompress calibrate", llc_choices: Sequence[int] = (),
               layer_weight: float = 1.0) -> Target:
    """Least-squares fit of ``base``'s efficiencies, bandwidths and overheads to ``samples``.

    Each sample's residual is weighted by its ``weight``, times ``layer_weight`` for a single-layer
    configuration (``single_layer``; ``LAYER_WEIGHT`` when variants of the searched networks are in).

    ``llc_choices``: last-level cache sizes (bytes) to try; the one whose fit has the lowest loss is
    kept. A cache size is a threshold, not a smooth parameter, so it is chosen by refitting at each.
    """
    import numpy as np
    from scipy.optimize import least_squares

    if len(samples) < 4:
        raise UserInputError(f"calibration needs at least 4 measured configurations, got {len(samples)}")
    best = None
    for llc in dict.fromkeys(llc_choices or [base.llc_bytes]):
        prob = _Problem(base.with_(llc_bytes=int(llc)), samples, layer_weight)
        x0 = np.array(prob.x0())
        # Bounds keep the fit physical: efficiencies up to 3x the stated peak, positive overheads.
        # Dispatching a runtime op costs at least ~0.5 µs on any CPU; without that floor the fit trades
        # per-op overheads against bandwidths and lands on unphysical values.
        lo = np.array([math.log(0.5) if n in ("kernel_overhead_us", "elementwise_overhead_us", "view_overhead_us")
                       else math.log(1e-3) for n in prob.names])
        hi = np.array([math.log(3.0) if n.startswith(("efficiency", "int8_class", "plain_eff")) else math.log(1e6)
                       for n in prob.names])
        x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
        res = least_squares(prob.residuals, x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05, max_nfev=400)
        if best is None or res.cost < best[1].cost:
            best = (prob, res)
    prob, res = best
    pred_ms = prob.predicted_us(res.x) / 1e3
    stats = error_stats(list(pred_ms), [s.measured_ms for s in samples])
    fitted_names = ", ".join(prob.names)
    sources = dict(base.sources)
    sources["fitted"] = f"{sources_note}: {fitted_names} from {len(samples)} measurements"
    if len(set(llc_choices)) > 1:
        sizes = ", ".join(f"{c / 2**20:g}" for c in sorted(set(llc_choices)))
        sources["llc_bytes"] = f"the best fit of {sizes} MiB (this machine's last-level cache and its fractions)"
    return prob.target(res.x, name=name or base.name, calibrated=True, sources=sources,
                       fit={k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()})


def llc_choices(t: Target) -> list[int]:
    """Last-level cache sizes for ``fit_target`` to try on this machine: powers of two above
    ``t.cache_bytes`` up to the largest CPU cache the OS reports. On a shared machine other tenants
    hold part of that cache, so the share a model keeps between calls is found by the fit.
    With no cache reported, just ``t.llc_bytes``."""
    largest = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        try:
            size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0)
        except ValueError:
            continue
        largest = max(largest, size)
    choices = []
    size = max(t.cache_bytes, 1) * 2
    while size <= largest:
        choices.append(size)
        size *= 2
    return choices or [t.llc_bytes]


# ---- the designed measurement set ----------------------------------------------------------

def _suite(quick: bool) -> list[tuple[str, Callable[[], Any], tuple[int, ...]]]:
    """(name, module factory, input shape): convs, depthwise, linear, elementwise and small networks."""
    from torch import nn

    def cbr(cin: int, cout: int, k: int, s: int = 1, g: int = 1) -> Callable[[], nn.Module]:
        return lambda: nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU())

    out: list[tuple[str, Callable[[], Any], tuple[int, ...]]] = []
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
    for cin, cout in ([(512, 1000), (1280, 1000), (256, 128)] if not quick else [(512, 1000)]):
        out.append((f"linear {cin}->{cout}", lambda cin=cin, cout=cout: nn.Sequential(nn.Linear(cin, cout)), (1, cin)))
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
    return out


def _default_shape(spec: str) -> tuple[int, ...]:
    return (1, 1, 32, 32) if spec == "builtin:digits-net" else (1, 3, 224, 224)


def _mobilenet_v2_half() -> Any:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None, width_mult=0.5)


# Networks the designed set uses that are not in the model registry.
_EXTRA_NETS: dict[str, Callable[[], Any]] = {"tv-mnv2-0.5": _mobilenet_v2_half}


def _net_factory(spec: str) -> Callable[[], Any]:
    def make() -> Any:
        if spec in _EXTRA_NETS:
            return _EXTRA_NETS[spec]()
        from autocompress.models import load_model

        return load_model(spec).model
    return make


def robust_ms(m: Any) -> float:
    """The latency of one measurement that the fit and the benchmark use: its ``quiet_ms``.

    With one intra-op thread that is CPU time, which ORT spends in the calling thread (equal to
    wall time on an idle core, blind to time the process spent preempted), in the quietest block
    of runs (``measure.quiet_latency``), which other tenants' cache and memory traffic did not slow.
    """
    if m.quiet_ms > 0:
        return m.quiet_ms
    return m.cpu_median_ms if m.threads == 1 and m.cpu_median_ms > 0 else m.median_ms


def time_file(path: Path, threads: int = 1, warmup: int = 10, runs: int = 20) -> float:
    """One timing of one ONNX file (``robust_ms`` of a fresh session): what ``measure_files`` repeats."""
    from autocompress.hwmodels.measure import measure_onnx

    return robust_ms(measure_onnx(path, threads=threads, warmup=warmup, runs=runs))


def _slow_moments(log: Sequence[tuple[float, int, float]], best: Sequence[float], window: int) -> list[float]:
    """For each entry of ``log`` (time, file, ms): how slow the machine ran around it, as the median,
    over the ``window`` measurements of other files nearest in time, of their ms / their file's best."""
    import statistics

    out = []
    for k, (_, i, _) in enumerate(log):
        near = [log[j] for j in range(max(0, k - window), min(len(log), k + window + 1)) if log[j][1] != i]
        out.append(statistics.median(ms / best[j] for _, j, ms in near) if near else 1.0)
    return out


def measure_files(paths: Sequence[Path], threads: int = 1, warmup: int = 10, runs: int = 20,
                  rounds: int = 4, extra_rounds: int | None = None, tolerance: float = 0.03, seed: int = 0,
                  measure: Callable[[Path], float] | None = None) -> list[float]:
    """Uncontended latency (ms) of each ONNX file: ``rounds`` passes over all files (each pass in a
    new shuffled order), each file in a fresh session per pass (``warmup`` + ``runs`` calls), and the
    lowest ``robust_ms`` over passes.

    Interleaving the passes spreads each file's blocks over the whole measurement, so a file is
    not timed only during one slow stretch of a shared machine. On this project's VM, 15
    ShuffleNetV2, MobileNetV2 and digits-net files timed in 6 runs over 8 minutes agreed within
    ±10 % in every pair of runs (worst 7.9 %) this way; with the median over 3 passes of each
    pass's median, a pair of runs agreed on 58 % of the files on average (worst 29 %).

    Slow stretches that outlast a pass are caught by the files themselves: every file timed at the
    same moment runs slow. A file whose best time came at a moment when the files timed just
    before and after it ran more than ``tolerance`` slower (relative to their own bests) than at the
    quietest moment of the measurement is timed again, in up to ``extra_rounds`` (default
    ``rounds``) more passes over such files. ``measure`` replaces the timing of one file (tests).
    """
    import random
    import time

    if measure is None:
        def measure(path: Path) -> float:
            return time_file(path, threads, warmup, runs)

    n = len(paths)
    best = [math.inf] * n
    log: list[tuple[float, int, float]] = []
    rng = random.Random(seed)

    def time_one(i: int) -> None:
        ms = measure(paths[i])
        log.append((time.monotonic(), i, ms))
        best[i] = min(best[i], ms)

    order = list(range(n))
    for _ in range(max(1, rounds)):
        rng.shuffle(order)
        for i in order:
            time_one(i)
    window = 4
    for _ in range(rounds if extra_rounds is None else extra_rounds):
        if n < 2 * window:
            break
        slow = _slow_moments(log, best, window)
        quietest = min(slow)
        at_best = {}
        for (_, i, ms), s in zip(log, slow):
            if ms == best[i]:
                at_best[i] = s
        again = [i for i in range(n) if at_best[i] > quietest * (1 + tolerance)]
        if not again:
            break
        rng.shuffle(again)
        for i in again:
            time_one(i)
    return best


Built = tuple  # (name, CostTable, ONNX path)

# The weight of a single layer (or pool) configuration in a fit that has variants of the networks
# being searched (``calibrate --model``), against 1 for a network. The designed layers keep the
# coefficients physical; the searched networks carry the effects between layers (what stays in
# cache, fused chains) that the predictions are for. Measured on four runs of the accuracy benchmark
# (BENCHMARKS.md): weight 1 gave 82.4-93.5 % of held-out variants within ±10 % on four runs, 0.25 gave
# 85.6-93.5 %. Without such variants layers keep weight 1: on the same runs 0.25 lost up to 9 points.
LAYER_WEIGHT = 0.25


def single_layer(table: CostTable) -> bool:
    """A table of at most one conv, linear or pool: a layer configuration, not a network."""
    return sum(r.op in ("conv", "linear", "pool") for r in table) <= 1


def time_built(built: Sequence[Built], threads: int = 1, warmup: int = 10, runs: int = 20, rounds: int = 4,
               profile: bool = True) -> list[Sample]:
    """Samples from built configurations: all timed together with ``measure_files``, so layers and
    networks share the machine's conditions, and profiled per node if asked."""
    from autocompress.hwmodels.measure import profile_onnx

    times = measure_files([b[2] for b in built], threads=threads, warmup=warmup, runs=runs, rounds=rounds)
    return [Sample(name, table, ms, parts=profile_onnx(path, threads=threads) if profile else None)
            for (name, table, path), ms in zip(built, times)]


def build_configs(configs: Iterable[tuple[str, Callable[[], Any], tuple[int, ...]]], folder: Path) -> list[Built]:
    """Export and trace each configuration into ``folder``; a name starting with "int8 " is
    exported with every layer at 8 bits, as the int8 exporter deploys it."""
    import tempfile

    import torch

    from autocompress.compress.quant import layer_bits
    from autocompress.export.int8 import export_int8
    from autocompress.export.onnx import export_onnx
    from autocompress.space.graph import trace

    built = []
    sub = Path(tempfile.mkdtemp(prefix="configs-", dir=folder))
    for name, make, shape in configs:
        model = make().eval()
        x = torch.randn(*shape)
        table = CostTable.from_graph(trace(model, shape))
        stem = sub / str(len(built))
        if name.startswith("int8 "):
            bits = {p: (8, 8) for p in layer_bits(model)}
            path = export_int8(model, x, [torch.randn(2, *shape[1:])], stem.with_suffix(".int8.onnx"), bits).path
            for r in table:
                if r.op in ("conv", "linear"):
                    r.wbits = r.abits = 8
        else:
            path = export_onnx(model, x, stem.with_suffix(".onnx"))
        built.append((name, table, path))
    return built


def build_variants(nets: Sequence[tuple[str, tuple[int, ...] | None]], per_net: int, folder: Path,
                   seed: int = 0) -> list[Built]:
    """Random compressed variants (every decision kind) of each (model spec, input shape or None for
    the model's own), exported as deployed into ``folder``."""
    import random
    import tempfile

    import torch

    from autocompress.compress import apply, estimate
    from autocompress.space.graph import trace
    from autocompress.compress import build_space

    built = []
    for spec, shape in nets:
        if spec in _EXTRA_NETS:
            model, shape = _EXTRA_NETS[spec](), shape or _default_shape(spec)
        else:
            from autocompress.models import load_model

            lm = load_model(spec)
            model, shape = lm.model, shape or lm.input_shape
        model.eval()
        space = build_space(trace(model, shape), spec)
        rng = random.Random(f"{seed}-{spec}")
        for v in range(per_net):
            policy = random_policy(space, rng)
            sub = Path(tempfile.mkdtemp(prefix="variant-", dir=folder))
            path, _ = export_deployed(apply(model, policy, space), torch.randn(*shape), sub)
            built.append((f"{spec} variant {v}", estimate(space, policy), path))
    return built


def random_policy(space: Any, rng: Any) -> Any:
    """A random policy over every decision kind: each decision takes a random non-identity choice
    with a probability drawn per policy (0.1-0.6)."""
    from autocompress.space.policy import Policy

    p = rng.uniform(0.1, 0.6)
    chosen = {}
    for d in space.decisions:
        others = [c for c in d.choices if c != d.identity]
        if others and rng.random() < p:
            chosen[d.id] = rng.choice(others)
    return Policy(space.model, space.fingerprint, chosen)


def export_deployed(model: Any, example: Any, folder: Path) -> tuple[Path, bool]:
    """The file a compressed model deploys as: int8 QDQ where layers are at <= 8 bits, else fp32."""
    import torch

    from autocompress.compress.quant import layer_bits, strip_fake_quant
    from autocompress.export.onnx import export_onnx

    float_model = strip_fake_quant(model)
    bits = layer_bits(model)
    if any(w <= 8 and a <= 8 for w, a in bits.values()):
        from autocompress.export.int8 import export_int8

        calib = torch.randn(2, *example.shape[1:])
        export_int8(float_model, example, [calib], folder / "model.int8.onnx", bits)
        return folder / "model.int8.onnx", True
    return export_onnx(float_model, example, folder / "model.onnx"), False


# Small networks whose random compressed variants calibrate `local` (other widths and resolutions
# than the zoo models a user searches, so the fit is not tuned to them).
VARIANT_NETS = (("builtin:digits-net", None), ("torchvision:resnet18", (1, 3, 112, 112)),
                ("tv-mnv2-0.5", (1, 3, 160, 160)), ("torchvision:squeezenet1_1", (1, 3, 112, 112)),
                ("torchvision:shufflenet_v2_x0_5", None))


def calibrate_local(threads: int = 1, quick: bool = False, models: Sequence[str] = (),
                    per_model: int = 12) -> tuple[Target, Path]:
    """Measure the designed set on this machine, fit ``local`` and save it in the cache dir.

    The designed set is layer configurations and small networks (``_suite``) plus random
    compressed variants of small networks (``VARIANT_NETS``). ``models`` (specs as
    ``load_model`` takes them) add ``per_model`` random variants each of the networks the user
    will search, so the fit sees their layers in their context. Everything is timed together
    (``time_built``) and profiled per node.
    """
    if threads < 1:
        raise UserInputError(f"--threads must be >= 1, got {threads}")
    if per_model < 1:
        raise UserInputError(f"--variants must be >= 1, got {per_model}")
    import tempfile

    from autocompress.hwmodels.targets import TARGETS

    base = TARGETS.get("local").with_(threads=threads)
    warmup, runs, rounds = (3, 10, 1) if quick else (10, 20, 4)
    with tempfile.TemporaryDirectory(prefix="autocompress-calibrate-") as tmp:
        # The user's models first, so a spec that does not load fails before minutes of work.
        built = build_variants([(m, None) for m in dict.fromkeys(models)], per_model, Path(tmp), seed=1)
        built += build_configs(_suite(quick), Path(tmp))
        built += build_variants(VARIANT_NETS[:2] if quick else VARIANT_NETS, 2 if quick else 12, Path(tmp))
        samples = time_built(built, threads=threads, warmup=warmup, runs=runs, rounds=rounds, profile=True)
    fitted = fit_target(base, samples, "local", llc_choices=llc_choices(base), layer_weight=LAYER_WEIGHT if models else 1.0,
                        sources_note=f"fitted by autocompress calibrate on this machine (ONNX Runtime, {threads} thread(s))"
                        + (f" with variants of {', '.join(dict.fromkeys(models))}" if models else ""))
    fitted = fitted.with_(description=f"this machine through ONNX Runtime, {threads} intra-op thread(s); calibrated"
                          + (f" with variants of {', '.join(dict.fromkeys(models))}" if models else ""))
    return fitted, fitted.save(target_path("local"))


# ---- measured numbers from a CSV -------------------------------------------------------------

CSV_COLUMNS = ("op", "in_ch", "out_ch", "kernel", "stride", "groups", "hw", "latency_ms")


def layer_table(row: dict[str, str], where: str) -> tuple[CostTable, int]:
    """A one-kernel cost table for a CSV row: conv(+BN+ReLU), dwconv, linear, add or pool."""
    def num(key: str, default: int | None = None) -> int:
        v = (row.get(key) or "").strip()
        if not v:
            if default is None:
                raise UserInputError(f"{where}: column {key!r} is empty")
            return default
        try:
            return int(float(v))
        except ValueError:
            raise UserInputError(f"{where}: {key}={v!r} is not a number") from None

    op = (row.get("op") or "").strip()
    cin, cout = num("in_ch"), num("out_ch", num("in_ch"))
    k, s, g, hw = num("kernel", 1), num("stride", 1), num("groups", 1), num("hw", 1)
    wb, ab, batch = num("wbits", 32), num("abits", 32), num("batch", 1)
    ohw = -(-hw // s)
    inp = LayerCost("x", "input", out_numel=cin * hw * hw)
    if op in ("conv", "dwconv"):
        g = cin if op == "dwconv" else g
        conv = LayerCost("conv", "conv", inputs=["x"], out_numel=cout * ohw * ohw, in_ch=cin, out_ch=cout,
                         kernel=(k, k), stride=(s, s), groups=g, spatial=ohw * ohw, wbits=wb, abits=ab)
        bn = LayerCost("bn", "bn", inputs=["conv"], out_numel=conv.out_numel, in_ch=cout, out_ch=cout)
        act = LayerCost("act", "act", inputs=["bn"], out_numel=conv.out_numel)
        return CostTable([inp, conv, bn, act], inp.out_numel), batch
    if op == "linear":
        lin = LayerCost("fc", "linear", inputs=["x"], out_numel=cout, in_ch=cin, out_ch=cout, bias=True,
                        wbits=wb, abits=ab)
        return CostTable([LayerCost("x", "input", out_numel=cin), lin], cin), batch
    if op in ("add", "pool", "concat"):
        other = LayerCost("y", "input", out_numel=cin * hw * hw)
        out_numel = cin * ohw * ohw if op == "pool" else cin * hw * hw * (2 if op == "concat" else 1)
        ins = ["x"] if op == "pool" else ["x", "y"]
        return CostTable([inp, other, LayerCost("op", op, inputs=ins, out_numel=out_numel)], inp.out_numel), batch
    raise UserInputError(f"{where}: op {op!r} is not one of conv, dwconv, linear, add, pool, concat")


def read_csv_samples(path: str | Path) -> list[Sample]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserInputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in ("op", "in_ch", "latency_ms") if c not in (reader.fieldnames or [])]
    if missing:
        raise UserInputError(f"{str(path)!r}: missing columns {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)} "
                             "(optional: wbits, abits, batch)")
    samples = []
    for i, row in enumerate(reader, start=2):
        where = f"{path}:{i}"
        table, batch = layer_table(row, where)
        try:
            ms = float(row["latency_ms"])
        except (TypeError, ValueError):
            raise UserInputError(f"{where}: latency_ms={row.get('latency_ms')!r} is not a number") from None
        if ms <= 0:
            raise UserInputError(f"{where}: latency_ms must be positive")
        samples.append(Sample(f"row {i}", table, ms, batch))
    return samples


def calibrate_from_csv(path: str | Path, name: str, base: str = "mobile") -> tuple[Target, Path]:
    """Fit ``base``'s coefficients to a CSV of on-device latencies; save as target ``name``."""
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
        raise UserInputError(f"bad target name {name!r}: use letters, digits, '-', '_' or '.'")
    start = get_target(base)
    samples = read_csv_samples(path)
    fitted = fit_target(start, samples, name, sources_note=f"fitted by autocompress calibrate --from-csv {Path(path).name}")
    if name != base:
        fitted = fitted.with_(description=f"calibrated from {Path(path).name} (starting from {base})")
    return fitted, fitted.save(target_path(name))


def check(target: Target | str, samples: Sequence[Sample]) -> dict[str, float]:
    """Error statistics of ``target``'s predictions on measured samples (for scoring held-out data)."""
    t = get_target(target)
    return error_stats([predict(s.table, t, s.batch).latency_ms for s in samples], [s.measured_ms for s in samples])
