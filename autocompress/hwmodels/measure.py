"""Time an ONNX model in ONNX Runtime: fixed intra-op threads, warm-up, median / p90 / CV.

fp32 files and int8 QDQ files are timed the same way (ORT fuses QDQ pairs into
integer kernels itself). onnxruntime is imported here only, when a measurement
is asked for.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from autocompress.errors import AutocompressError, UserInputError


@dataclass(frozen=True)
class Measurement:
    """Wall-clock latency of one ``session.run`` at a batch, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    cv: float  # standard deviation / mean of the timed runs
    runs: int
    threads: int
    batch: int = 1
    min_ms: float = 0.0
    cpu_median_ms: float = 0.0  # median CPU time of the process per run: robust to other processes on the cores
    quiet_ms: float = 0.0  # ``quiet_latency`` of the runs (CPU time with one thread, else wall time)

    def to_json(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "mean_ms": self.mean_ms, "cv": self.cv,
                "runs": self.runs, "threads": self.threads, "batch": self.batch, "min_ms": self.min_ms,
                "cpu_median_ms": self.cpu_median_ms, "quiet_ms": self.quiet_ms}


QUIET_BLOCK = 10  # consecutive runs per block of ``quiet_latency``


def quiet_latency(series: list[float], block: int = QUIET_BLOCK) -> float:
    """The lowest median of ``block`` consecutive runs (in the order they ran): the latency in the
    quietest stretch of the measurement.

    On a shared machine other tenants slow a run down for seconds at a time (cache and memory
    bandwidth taken, not CPU time: a process's own CPU time grows with it), so a median over the
    whole series lands between the levels (docs/hwmodels.md, "Measurement"). A block's median, not
    the single fastest run, keeps one lucky run from setting it.
    """
    if not series:
        raise ValueError("quiet_latency needs at least one run")
    if len(series) <= block:
        return statistics.median(series)
    return min(statistics.median(series[i:i + block]) for i in range(0, len(series) - block + 1, block))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def session(path: str | os.PathLike, threads: int = 1, profile_prefix: str | None = None) -> Any:
    """An ORT CPU session with ``threads`` intra-op threads and sequential execution.

    With ``profile_prefix`` ONNX Runtime profiles every node into a file starting with it.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # keep ORT's graph-cleanup notices off the user's terminal
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise AutocompressError(f"ONNX Runtime cannot load {str(path)!r}: {str(exc).splitlines()[0]}") from exc


def _example_shapes(sess: Any) -> dict[str, list[int]]:
    import json

    from autocompress.export.onnx import SHAPES_KEY

    raw = sess.get_modelmeta().custom_metadata_map.get(SHAPES_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _feeds(sess: Any, batch: int) -> dict[str, Any]:
    import numpy as np

    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
    rng = np.random.default_rng(0)
    feeds = {}
    examples = _example_shapes(sess)
    for i, inp in enumerate(sess.get_inputs()):
        known = examples.get(inp.name, [])  # symbolic axes other than the batch (a sequence) at the example's size
        shape = [batch if j == 0 and not isinstance(d, int) else d if isinstance(d, int)
                 else (known[j] if j < len(known) else 1) for j, d in enumerate(inp.shape)]
        dtype = types.get(inp.type, np.float32)
        feeds[inp.name] = rng.standard_normal(shape).astype(dtype) if dtype in (np.float32, np.float16) \
            else np.zeros(shape, dtype=dtype)
    return feeds


def measure_onnx(path: str | os.PathLike, threads: int = 1, warmup: int = 10, runs: int = 50,
                 batch: int = 1) -> Measurement:
    """Time ``runs`` calls after ``warmup`` untimed ones; report median, p90, mean and CV."""
    if threads < 1 or runs < 1 or warmup < 0 or batch < 1:
        raise UserInputError(f"measure: threads={threads}, runs={runs}, batch={batch} must be >= 1 and warmup={warmup} >= 0")
    if not Path(path).is_file():
        raise UserInputError(f"ONNX file {str(path)!r} does not exist")
    sess = session(path, threads)
    feeds = _feeds(sess, batch)
    for _ in range(warmup):
        sess.run(None, feeds)
    times, cpu = [], []
    clock, cpu_clock = time.perf_counter_ns, time.process_time_ns
    for _ in range(runs):
        c0 = cpu_clock()
        t0 = clock()
        sess.run(None, feeds)
        t1 = clock()
        cpu.append((cpu_clock() - c0) / 1e6)
        times.append((t1 - t0) / 1e6)
    quiet = quiet_latency(cpu if threads == 1 else times)
    times.sort()
    mean = statistics.fmean(times)
    cv = statistics.pstdev(times) / mean if mean > 0 else 0.0
    return Measurement(median_ms=statistics.median(times), p90_ms=_percentile(times, 0.9), mean_ms=mean,
                       cv=cv, runs=runs, threads=threads, batch=batch, min_ms=times[0],
                       cpu_median_ms=statistics.median(cpu), quiet_ms=quiet)


def measure_model(model: Any, example_input: Any, threads: int = 1, warmup: int = 10, runs: int = 50,
                  batch: int | None = None) -> Measurement:
    """Export ``model`` to a temporary ONNX file and time it (batch defaults to the example's)."""
    from autocompress.export.onnx import export_onnx
    from autocompress.space.inputs import as_tuple

    with tempfile.TemporaryDirectory(prefix="autocompress-measure-") as tmp:
        path = export_onnx(model, example_input, Path(tmp) / "model.onnx")
        return measure_onnx(path, threads=threads, warmup=warmup, runs=runs,
                            batch=batch or int(as_tuple(example_input)[0].shape[0]))


# ONNX Runtime op types -> the latency model's parts (see ``predict.parts``); the rest is "other".
PROFILE_PARTS = {
    "Conv": "conv", "FusedConv": "conv", "QLinearConv": "qconv",
    "Gemm": "linear", "MatMul": "linear", "QGemm": "linear", "MatMulInteger": "linear", "FusedGemm": "linear",
    "MaxPool": "pool", "AveragePool": "pool", "GlobalAveragePool": "pool", "GlobalMaxPool": "pool",
    "NhwcMaxPool": "pool", "QLinearAveragePool": "pool", "QLinearGlobalAveragePool": "pool", "ReduceMean": "pool",
    "Concat": "concat", "QLinearConcat": "concat", "Split": "concat",
    "ReorderInput": "reorder", "ReorderOutput": "reorder",
    "QuantizeLinear": "convert", "DequantizeLinear": "convert",
    "Add": "elementwise", "QLinearAdd": "elementwise", "Sum": "elementwise", "Relu": "elementwise",
    "Clip": "elementwise", "Mul": "elementwise", "BatchNormalization": "elementwise",
    # Sequence models: GEMM-type nodes count as linear (as predict's matmul, attention and rnn kernels do;
    # the softmax inside an SDPA row is predicted there too), normalisation and GELU passes as elementwise.
    "FusedMatMul": "linear", "Attention": "linear", "MultiHeadAttention": "linear", "LSTM": "linear",
    "GRU": "linear", "RNN": "linear", "LayerNormalization": "elementwise", "SkipLayerNormalization": "elementwise",
    "Softmax": "elementwise", "Gelu": "elementwise", "BiasGelu": "elementwise", "FastGelu": "elementwise",
}


def profile_onnx(path: str | os.PathLike, threads: int = 1, warmup: int = 5, runs: int = 20) -> dict[str, float]:
    """Milliseconds per part of the latency model, from ONNX Runtime's per-node profile (median per node).

    A Transpose of a uint8 tensor is the layout change around int8 kernels, so it counts as a
    conversion; other transposes are "other".
    """
    import json

    if not Path(path).is_file():
        raise UserInputError(f"ONNX file {str(path)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="autocompress-profile-") as tmp:
        sess = session(path, threads, profile_prefix=str(Path(tmp) / "profile"))
        feeds = _feeds(sess, 1)
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = {}
    skip: dict[str, int] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "")
        part = PROFILE_PARTS.get(op, "other")
        if op == "Transpose" and any("uint8" in t or "int8" in t for t in args.get("input_type_shape", [{}])[0]):
            part = "convert"
        key = (part, name)
        seen = skip.get(name, 0)
        skip[name] = seen + 1
        if seen < warmup:  # the first calls of each node are warm-up
            continue
        per_node.setdefault(key, []).append(e["dur"] / 1e3)
    parts: dict[str, float] = {}
    for (part, _), durs in per_node.items():
        parts[part] = parts.get(part, 0.0) + statistics.median(durs)
    return parts


# ---- timing many files on a shared machine ---------------------------------------------------

def robust_ms(m: Measurement) -> float:
    """The latency of one measurement that the fit and the benchmark use: its ``quiet_ms``.

    With one intra-op thread that is CPU time, which ORT spends in the calling thread (equal to
    wall time on an idle core, blind to time the process spent preempted), in the quietest block
    of runs (``quiet_latency``), which other tenants' cache and memory traffic did not slow.
    """
    if m.quiet_ms > 0:
        return m.quiet_ms
    return m.cpu_median_ms if m.threads == 1 and m.cpu_median_ms > 0 else m.median_ms


def time_file(path: Path, threads: int = 1, warmup: int = 10, runs: int = 20) -> float:
    """One timing of one ONNX file (``robust_ms`` of a fresh session): what ``measure_files`` repeats."""
    return robust_ms(measure_onnx(path, threads=threads, warmup=warmup, runs=runs))


def _slow_moments(log: Sequence[tuple[float, int, float]], best: Sequence[float], window: int) -> list[float]:
    """For each entry of ``log`` (time, file, ms): how slow the machine ran around it, as the median,
    over the ``window`` measurements of other files nearest in time, of their ms / their file's best."""
    out = []
    for k, (_, i, _) in enumerate(log):
        near = [log[j] for j in range(max(0, k - window), min(len(log), k + window + 1)) if log[j][1] != i]
        out.append(statistics.median(ms / best[j] for _, j, ms in near) if near else 1.0)
    return out


def measure_files(paths: Sequence[Path], threads: int = 1, warmup: int = 10, runs: int = 20,
                  rounds: int = 4, extra_rounds: int | None = None, tolerance: float = 0.03, seed: int = 0,
                  measure: Callable[[Path], float] | None = None,
                  on_timed: Callable[[int], None] | None = None) -> list[float]:
    """Uncontended latency (ms) of each ONNX file: ``rounds`` passes over all files (each pass in a
    new shuffled order), each file in a fresh session per pass (``warmup`` + ``runs`` calls), and the
    lowest ``robust_ms`` over passes.

    Interleaving the passes spreads each file's blocks over the whole measurement, so a file is not
    timed only during one slow stretch of a shared machine (docs/hwmodels.md, "Measurement").
    Slow stretches that outlast a pass are caught by the files themselves: every file timed at the
    same moment runs slow. A file whose best time came at a moment when the files timed just
    before and after it ran more than ``tolerance`` slower (relative to their own bests) than at the
    quietest moment of the measurement is timed again, in up to ``extra_rounds`` (default
    ``rounds``) more passes over such files. ``measure`` replaces the timing of one file (a device
    command, tests); ``on_timed`` hears how many timings are done after each (progress).
    """
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
        if on_timed is not None:
            on_timed(len(log))

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
        slowness_at_best = {}
        for (_, i, ms), s in zip(log, slow):
            if ms == best[i]:
                slowness_at_best[i] = s
        again = [i for i in range(n) if slowness_at_best[i] > quietest * (1 + tolerance)]
        if not again:
            break
        rng.shuffle(again)
        for i in again:
            time_one(i)
    return best
