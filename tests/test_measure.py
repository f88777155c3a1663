import subprocess
import sys

import pytest
import torch
from torch import nn

from autocompress.errors import UserInputError
from autocompress.export.onnx import export_onnx
from autocompress.hwmodels import Measurement, measure_model, measure_onnx
from autocompress.hwmodels.measure import quiet_latency, robust_ms


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return export_onnx(_tiny(), torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("m") / "tiny.onnx")


def _check(m: Measurement, runs: int, threads: int = 1) -> None:
    assert m.runs == runs and m.threads == threads
    assert 0 < m.min_ms <= m.median_ms <= m.p90_ms
    assert m.mean_ms > 0 and m.cv >= 0
    assert m.cpu_median_ms > 0
    assert m.quiet_ms > 0 and robust_ms(m) == m.quiet_ms


def test_measure_onnx_statistics(tiny_onnx):
    m = measure_onnx(tiny_onnx, threads=1, warmup=10, runs=50)
    _check(m, 50)
    assert m.median_ms < 50  # a 16x16 conv runs in well under 50 ms even on a busy machine
    assert set(m.to_json()) >= {"median_ms", "p90_ms", "mean_ms", "cv", "runs", "threads"}


def test_measure_batch_and_threads(tiny_onnx):
    m = measure_onnx(tiny_onnx, threads=2, warmup=2, runs=12, batch=4)
    _check(m, 12, threads=2)
    assert m.batch == 4


def test_measure_int8_qdq_file(tiny_onnx, tmp_path):
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"input": np.random.randn(1, 3, 16, 16).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.data, None)

    out = tmp_path / "tiny.int8.onnx"
    quantize_static(str(tiny_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    _check(measure_onnx(out, warmup=10, runs=20), 20)


def test_measure_model_exports_and_times():
    m = measure_model(_tiny(), torch.randn(1, 3, 16, 16), warmup=3, runs=15)
    _check(m, 15)
    assert m.batch == 1


def test_quiet_latency_is_the_best_block_median():
    # a contended stretch (8.6 ms) around a quiet one (6.3 ms), one lucky 1 ms run in the slow stretch
    series = [8.6] * 10 + [6.2, 6.3, 6.4] * 3 + [6.3] + [8.6] * 9 + [1.0]
    assert quiet_latency(series, block=10) == pytest.approx(6.3)
    assert quiet_latency([8.6] * 25 + [1.0] * 4, block=10) == pytest.approx(8.6)  # a short tail is not a block
    assert quiet_latency([3.0, 1.0, 2.0], block=10) == pytest.approx(2.0)  # fewer runs than a block: the median
    with pytest.raises(ValueError):
        quiet_latency([])


def test_robust_ms_falls_back_to_the_median_without_a_quiet_latency():
    old = Measurement(median_ms=5.0, p90_ms=6.0, mean_ms=5.2, cv=0.1, runs=20, threads=1, cpu_median_ms=4.8)
    assert robust_ms(old) == 4.8
    assert robust_ms(Measurement(median_ms=5.0, p90_ms=6.0, mean_ms=5.2, cv=0.1, runs=20, threads=2)) == 5.0


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"threads": 0}, {"warmup": -1}, {"batch": 0}])
def test_bad_arguments_are_user_errors(tiny_onnx, kwargs):
    with pytest.raises(UserInputError):
        measure_onnx(tiny_onnx, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        measure_onnx(tmp_path / "nope.onnx")


def test_importing_hwmodels_does_not_import_onnxruntime_or_ray():
    code = ("import sys, autocompress, autocompress.hwmodels; "
            "print('onnxruntime' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_profile_splits_the_time_into_model_parts(tmp_path):
    """A float conv, then an int8 conv: ONNX Runtime's per-node profile lands in conv, qconv and convert."""
    from autocompress.export.int8 import export_int8
    from autocompress.hwmodels import PARTS
    from autocompress.hwmodels.measure import profile_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 16, 28, 28)
    report = export_int8(model, x, [x], tmp_path / "m.onnx", {"0": (32, 32), "2": (8, 8)})
    parts = profile_onnx(report.path, warmup=2, runs=10)
    assert set(parts) <= set(PARTS)
    assert parts["conv"] > 0 and parts["qconv"] > 0 and parts["convert"] > 0
    m = measure_onnx(report.path, warmup=2, runs=10)
    assert 0 < sum(parts.values()) <= 3 * m.p90_ms


def _contended_timer(true_ms: dict, slow_calls: set, factor: float = 1.2):
    """A fake timer: each call returns the file's true latency, `factor` slower on the calls in
    `slow_calls` (a stretch when other tenants load the machine), with ±1 % noise."""
    import random

    rng = random.Random(1)
    calls = []

    def measure(path):
        slow = factor if len(calls) in slow_calls else 1.0
        calls.append(path)
        return true_ms[path] * slow * (1 + rng.uniform(-0.01, 0.01))
    return measure, calls


def test_measure_files_times_again_a_file_whose_best_came_in_a_slow_stretch(tmp_path):
    """20 files, 4 passes; the machine is slow for passes 1-2, half of pass 3 and half of pass 4,
    so some files never see a quiet moment. Those (and only few others) are timed again after,
    and every file ends within 2 % of its true latency; without the extra passes some stay >= 15 % slow."""
    from autocompress.hwmodels.measure import measure_files

    paths = [tmp_path / f"{i}.onnx" for i in range(20)]
    true_ms = {p: 1.0 + 0.1 * i for i, p in enumerate(paths)}
    slow_calls = set(range(50)) | set(range(70, 80))

    measure, _ = _contended_timer(true_ms, slow_calls)
    plain = measure_files(paths, rounds=4, extra_rounds=0, measure=measure)
    assert max(b / true_ms[p] for p, b in zip(paths, plain)) >= 1.15

    measure, calls = _contended_timer(true_ms, slow_calls)
    best = measure_files(paths, rounds=4, measure=measure)
    assert all(abs(b / true_ms[p] - 1) <= 0.02 for p, b in zip(paths, best))
    assert 80 < len(calls) <= 80 + 4 * 20


def test_measure_files_on_a_quiet_machine_takes_the_planned_passes(tmp_path):
    from autocompress.hwmodels.measure import measure_files

    paths = [tmp_path / f"{i}.onnx" for i in range(12)]
    true_ms = {p: 0.5 + 0.3 * i for i, p in enumerate(paths)}
    measure, calls = _contended_timer(true_ms, set())
    best = measure_files(paths, rounds=3, measure=measure)
    assert len(calls) == 36
    assert all(abs(b / true_ms[p] - 1) <= 0.01 for p, b in zip(paths, best))
    # every pass visits every file once, in its own order
    passes = [calls[k * 12:(k + 1) * 12] for k in range(3)]
    assert all(sorted(p) == sorted(paths) for p in passes) and passes[0] != passes[1]
