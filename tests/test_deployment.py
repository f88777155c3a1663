"""Deployment truth: `local` ready on first use, devices in the loop through --measure-cmd, budgets met by
measurement (issue 18 parts 1, 3 and 4).

Nothing here times anything for its own sake: measuring commands are scripts that print controlled
numbers (or run ONNX Runtime in a subprocess, only to show that a real command works), and calibration
runs a tiny designed set (``TINY_PLAN``).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from autocompress.errors import UserInputError
from autocompress.hwmodels import TARGETS, get_target, target_path
from autocompress.hwmodels.calibrate import PLANS, Plan
from autocompress.hwmodels.device import (MeasureCommand, MeasureCommandError, Timing, parse_latency, time_rounds,
                                          timer_for)
from autocompress.hwmodels.first_use import FIRST_USE_ENV, LocalNotCalibrated, ready_target
from tests.conftest import assert_one_line_error, run_cli
from tests.test_search import TINY

PY = sys.executable


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh cache per test: no calibrated `local` unless the test seeds or makes one."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(FIRST_USE_ENV, raising=False)


def seed_fitted_local() -> Path:
    """A calibrated `local` in the cache without measuring: the defaults, marked as fitted (what tests
    that search on `local` need; a real machine gets its own from the first use or `calibrate`)."""
    seeded = TARGETS.get("local").with_(calibrated=True, description="seeded by tests",
                                        fit={"fitted_at": "2026-01-01 00:00 UTC", "plan": "seeded",
                                             "held_out": {"samples": 4, "within_10": 0.75, "median_abs_err": 0.05}})
    return seeded.save(target_path("local"))


def _cbr(cin: int, cout: int, k: int, groups: int = 1):
    return lambda: nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())


def tiny_configs():
    return [("conv3x3 16@28", _cbr(16, 16, 3), (1, 16, 28, 28)), ("conv1x1 16->32@28", _cbr(16, 32, 1), (1, 16, 28, 28)),
            ("dw3x3 32@28", _cbr(32, 32, 3, 32), (1, 32, 28, 28)), ("conv3x3 8@14", _cbr(8, 8, 3), (1, 8, 14, 14)),
            ("linear 64->10", lambda: nn.Sequential(nn.Linear(64, 10)), (1, 64))]


# Five layer configurations and one digits-net variant in the fit, two more variants held out; one pass.
TINY_PLAN = Plan("tiny", tiny_configs, (("builtin:digits-net", None),), per_net=1, held_out_per_net=2, warmup=1,
                 runs=3, rounds=1, kinds=("prune", "wbits", "abits"), profile=False, llc_tries=1, widths=1)

ORT_SCRIPT = textwrap.dedent('''
    import statistics, sys, time
    import numpy as np
    import onnxruntime as ort
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.rand(*[d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
             for i in sess.get_inputs()}
    times = []
    for _ in range(8):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    print("warm-up done")
    print(f"{statistics.median(times[3:]):.4f} ms")
''')

# A device whose latency is the file's size in kB times FAKE_SCALE (FAKE_INT8_SCALE for int8 files);
# FAKE_DEVICE=fail exits 3, garbage prints no number, bigfail fails on files over FAKE_BIG bytes.
FAKE_DEVICE = textwrap.dedent('''
    import os, pathlib, sys
    path = pathlib.Path(sys.argv[1])
    mode = os.environ.get("FAKE_DEVICE", "size")
    size = path.stat().st_size
    if mode == "fail" or (mode == "bigfail" and size > int(os.environ["FAKE_BIG"])):
        sys.stderr.write("error: device offline\\n")
        sys.exit(3)
    if mode == "garbage":
        print("Segmentation fault (core dumped)?")
        sys.exit(0)
    scale = os.environ.get("FAKE_INT8_SCALE" if path.name.endswith(".int8.onnx") else "FAKE_SCALE", "1")
    print(f"{size / 1000 * float(scale):.6f}")
''')


@pytest.fixture()
def tiny_onnx(tmp_path: Path) -> Path:
    from autocompress.export.onnx import export_onnx

    folder = tmp_path / "a b's files"  # a path the shell must see quoted
    folder.mkdir()
    return export_onnx(_cbr(8, 8, 3)().eval(), torch.randn(1, 8, 14, 14), folder / "m.onnx")


def _script(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the measuring command ---------------------------------------------------------------------------

def test_a_command_running_onnx_runtime_in_a_subprocess_times_a_quoted_path(tmp_path, tiny_onnx):
    script = _script(tmp_path, "timing_script.py", ORT_SCRIPT)
    ms = MeasureCommand(f"{PY} {script} {{onnx}}", timeout_s=60)(tiny_onnx)
    assert 0 < ms < 1000


def test_failing_garbage_and_hung_commands_are_one_line_errors(tmp_path, tiny_onnx, monkeypatch):
    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    monkeypatch.setenv("FAKE_DEVICE", "fail")
    with pytest.raises(MeasureCommandError, match=r"exited with status 3 on m\.onnx: error: device offline"):
        MeasureCommand(f"{PY} {fake} {{onnx}}")(tiny_onnx)
    monkeypatch.setenv("FAKE_DEVICE", "garbage")
    with pytest.raises(MeasureCommandError, match="printed 'Segmentation fault"):
        MeasureCommand(f"{PY} {fake} {{onnx}}")(tiny_onnx)
    with pytest.raises(MeasureCommandError, match="did not finish within 0.5 s"):
        MeasureCommand("sleep 30; echo 1 {onnx}", timeout_s=0.5)(tiny_onnx)
    with pytest.raises(UserInputError, match="has no {onnx}"):
        MeasureCommand("adb shell perf_test model.onnx")
    with pytest.raises(UserInputError, match="not a valid shell command"):
        MeasureCommand("python 'time.py {onnx}")


def test_the_latency_is_the_last_line_and_must_be_a_positive_number():
    assert parse_latency("loading\n12.5 ms\n\n") == 12.5
    assert parse_latency("3e-1") == 0.3
    for bad in ("", "fast", "-2", "nan", "12.5 s"):
        with pytest.raises(MeasureCommandError):
            parse_latency(bad)


def test_rounds_give_the_median_and_half_the_range_and_a_failing_file_its_reason(tmp_path):
    values = {"a": iter([4.0, 5.0, 4.6]), "b": iter([2.0, 2.0, 2.0])}

    def timer(path: Path) -> float:
        if path.name == "c":
            raise MeasureCommandError("--measure-cmd exited with status 1 on c: boom")
        return next(values[path.name])

    a, b, c = time_rounds([tmp_path / "a", tmp_path / "b", tmp_path / "c"], timer, rounds=3)
    assert (a.latency_ms, a.spread_ms) == (4.6, 0.5) and sorted(a.rounds) == [4.0, 4.6, 5.0]
    assert (b.latency_ms, b.spread_ms) == (2.0, 0.0)
    assert c.latency_ms is None and "boom" in c.error


def test_what_times_a_target():
    assert "ONNX Runtime" in timer_for(get_target("local")).label
    assert timer_for(get_target("mobile")) is None
    phone = timer_for(get_target("mobile"), "adb-time {onnx}")
    assert phone is not None and phone.timer.timeout_s == 120.0
    own = get_target("mobile").with_(measure_cmd="ssh pi time {onnx}", measure_timeout_s=300.0)
    assert timer_for(own).timer == MeasureCommand("ssh pi time {onnx}", 300.0)


# ---- `local` on first use ----------------------------------------------------------------------------

def test_an_uncalibrated_local_is_refused_with_how_to_calibrate(tmp_path, monkeypatch):
    monkeypatch.setenv(FIRST_USE_ENV, "refuse")
    with pytest.raises(LocalNotCalibrated, match="autocompress calibrate --target local"):
        ready_target("local")
    tiny = _script(tmp_path, "tiny.py", TINY)
    out = tmp_path / "out"
    res = run_cli("search", "--model", f"{tiny}:model", "--data", f"{tiny}:data", "--target", "local",
                  "--budget", "0.8x", "--out", str(out))
    assert_one_line_error(res, "not calibrated", "autocompress calibrate --target local", code=3)
    assert not out.exists()
    assert ready_target("mobile") == get_target("mobile")  # other targets are untouched
    monkeypatch.setenv(FIRST_USE_ENV, "sometimes")
    with pytest.raises(UserInputError, match="calibrate' or 'refuse'"):
        ready_target("local")


def test_first_use_calibrates_local_once_and_checks_it_on_held_out_variants(monkeypatch):
    monkeypatch.setitem(PLANS, "first-use", TINY_PLAN)
    assert "calibrated on first use" in run_cli("targets").stdout
    said: list[str] = []
    fitted = ready_target("local", said.append)
    assert fitted.calibrated is True and get_target("local") == fitted and target_path("local").is_file()
    assert fitted.fit["samples"] == 6 and fitted.fit["plan"] == "tiny"
    held = fitted.fit["held_out"]
    assert held["samples"] == 2 and 0.0 <= held["within_10"] <= 1.0 and held["median_abs_err"] >= 0
    assert said[0].startswith("calibrating `local` on first use")
    assert any("timing 8 files" in s for s in said) and "held-out variants within ±10 %" in said[-1]
    # the pruned-width probe ran and set the multiple the search rounds to
    assert any("conv pair at 25 widths" in s for s in said)
    assert fitted.prune_round_to in (1, 2, 4, 8, 16) and fitted.fit["widths"]["round_to"] == fitted.prune_round_to
    assert len(fitted.fit["widths"]["ms"]) == 25 and min(fitted.fit["widths"]["ms"]) > 0
    again: list[str] = []
    assert ready_target("local", again.append) == fitted and again == []  # cached: no second calibration
    table = run_cli("targets", "--json")
    local = next(r for r in json.loads(table.stdout) if r["name"] == "local")
    assert local["calibrated"] is True and local["held_out"]["samples"] == 2 and local["fitted_at"]
    assert f"held-out {round(held['within_10'] * 2)}/2" in run_cli("targets").stdout


# ---- calibrating a device through its command --------------------------------------------------------

def test_calibrate_a_device_through_a_command_running_onnx_runtime(tmp_path, monkeypatch):
    monkeypatch.setitem(PLANS, "quick", TINY_PLAN)
    script = _script(tmp_path, "timing_script.py", ORT_SCRIPT)
    res = run_cli("calibrate", "--target", "bench-pc", "--measure-cmd", f"{PY} {script} {{onnx}}", "--quick",
                  "--base", "x86-server", "--measure-timeout", "60")
    assert res.exit_code == 0, res.output
    assert "held-out variants within ±10 %" in res.stdout
    dev = get_target("bench-pc")
    assert dev.calibrated is True and dev.measure_cmd == f"{PY} {script} {{onnx}}" and dev.measure_timeout_s == 60
    assert dev.fit["held_out"]["samples"] == 2 and "--measure-cmd" in dev.fit["measured_by"]
    assert dev.peak_gmacs == get_target("x86-server").peak_gmacs  # the base's peaks, fitted efficiencies
    assert dev.efficiency != get_target("x86-server").efficiency


@pytest.mark.parametrize("mode,fragment", [("fail", "exited with status 3"), ("garbage", "printed")])
def test_calibrate_with_a_failing_command_is_a_one_line_error(tmp_path, monkeypatch, mode, fragment):
    monkeypatch.setitem(PLANS, "quick", TINY_PLAN)
    monkeypatch.setenv("FAKE_DEVICE", mode)
    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    res = run_cli("calibrate", "--target", "phone", "--measure-cmd", f"{PY} {fake} {{onnx}}", "--quick")
    assert_one_line_error(res, "--measure-cmd", fragment)
    assert not target_path("phone").exists()


def test_calibrate_refuses_a_device_without_a_way_to_measure_it():
    assert_one_line_error(run_cli("calibrate", "--target", "phone"), "--measure-cmd", "--from-csv")
    assert_one_line_error(run_cli("calibrate", "--target", "phone", "--measure-cmd", "time-it"), "{onnx}")


# ---- budgets met by measurement ----------------------------------------------------------------------

class _Scored:
    def __init__(self, model: nn.Module, accuracy: float) -> None:
        self.model, self.accuracy = model, accuracy


class _Evaluator:
    """Finalists of known file sizes: linear layers 64 -> width -> 4, most accurate first."""

    example = torch.randn(1, 64)
    calibration = None
    teacher = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4)).eval()


def _ranked(widths=(128, 64, 16)):
    from autocompress.search.core import Candidate
    from autocompress.space.policy import Policy

    policy = Policy("m", "fp", {})
    return [(Candidate(i, (), policy, 0.9 - 0.1 * i, 1.0), _Scored(
        nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, 4)).eval(), 0.9 - 0.1 * i)) for i, w in enumerate(widths)]


def _config(fake: Path, budget: str):
    from autocompress.search.core import SearchConfig

    return SearchConfig(target="mobile", budget=budget, measure_cmd=f"{PY} {fake} {{onnx}}", finalists=3)


def test_a_finalist_over_the_budget_by_measurement_is_not_returned(tmp_path):
    """Files of about 34, 17 and 4.5 kB measure that many ms: with 20 ms the second is returned, with
    1 ms none fits and the first (the pick by prediction) comes back as measured over."""
    from autocompress.search.measured import measured_choice

    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    events = []
    pick, check = measured_choice(_ranked(), _Evaluator(), _config(fake, "20ms"), events.append)
    sizes = [t.latency_ms for _, _, t in check.finalists]
    assert sizes[0] > 20 >= sizes[1] > sizes[2] and all(t.spread_ms == 0 for _, _, t in check.finalists)
    assert (pick, check.feasible, check.limit_ms) == (1, True, 20.0)
    assert [f for _, f, _ in check.finalists] == ["model.onnx"] * 3
    assert "over the budget" in events[0].message and "within the budget" in events[1].message
    pick, check = measured_choice(_ranked(), _Evaluator(), _config(fake, "1ms"), events.append)
    assert (pick, check.feasible) == (0, False)


def test_on_local_the_finalists_are_timed_in_onnx_runtime_here():
    from autocompress.search.core import SearchConfig
    from autocompress.search.measured import measured_choice

    seed_fitted_local()
    loose = SearchConfig(target="local", budget="1000ms", finalists=3)
    pick, check = measured_choice(_ranked(), _Evaluator(), loose)
    assert check.by.startswith("ONNX Runtime on this machine") and (pick, check.feasible) == (0, True)
    assert all(0 < t.latency_ms < 1000 and len(t.rounds) == 3 for _, _, t in check.finalists)
    pick, check = measured_choice(_ranked(), _Evaluator(), SearchConfig(target="local", budget="0.1us"))
    assert (pick, check.feasible) == (0, False)
    assert measured_choice(_ranked(), _Evaluator(), SearchConfig(target="local", budget="4MB"))[1].reason == \
        "the budget has no latency limit"
    assert measured_choice(_ranked(), _Evaluator(), SearchConfig(target="local", budget="1ms",
                                                                 measure_finalists=False)) == (0, None)


def test_a_relative_budget_is_measured_against_the_timed_original(tmp_path):
    from autocompress.search.measured import measured_choice

    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    pick, check = measured_choice(_ranked(), _Evaluator(), _config(fake, "0.4x"))
    # the original's file is about 71 kB: a 28 ms limit that the first finalist (35 kB) misses
    assert check.baseline is not None and check.limit_ms == pytest.approx(0.4 * check.baseline.latency_ms)
    assert 25 < check.limit_ms < 32 and (pick, check.feasible) == (1, True)


def test_an_unmeasured_finalist_is_recorded_with_its_reason_and_the_next_one_timed(tmp_path, monkeypatch):
    from autocompress.search.measured import measured_choice

    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    monkeypatch.setenv("FAKE_DEVICE", "bigfail")
    monkeypatch.setenv("FAKE_BIG", "25000")
    pick, check = measured_choice(_ranked(), _Evaluator(), _config(fake, "20ms"))
    first = check.finalists[0][2]
    assert first.latency_ms is None and "device offline" in first.error
    assert (pick, check.feasible) == (1, True)
    monkeypatch.setenv("FAKE_DEVICE", "fail")
    pick, check = measured_choice(_ranked(), _Evaluator(), _config(fake, "20ms"))
    assert (pick, check.feasible) == (0, None) and all(t.error for _, _, t in check.finalists)


def test_measurement_within_the_spread_counts_as_within_the_budget():
    from autocompress.search.measured import MeasuredCheck

    check = MeasuredCheck(None, limit_ms=5.0)
    assert check.within(Timing(5.2, 0.25)) is True
    assert check.within(Timing(5.3, 0.25)) is False
    assert check.within(Timing(None, error="x")) is None


def _local_search(tmp_path: Path, out: Path, *extra: str):
    tiny = _script(tmp_path, "tiny.py", TINY)
    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    return run_cli("search", "--model", f"{tiny}:model", "--data", f"{tiny}:data", "--target", "local",
                   "--budget", "48.5us", "--trials", "5", "--low-epochs", "0.5", "--full-epochs", "0.5",
                   "--finalists", "3", "--measure-cmd", f"{PY} {fake} {{onnx}}", "--out", str(out), *extra)


def test_a_local_search_never_returns_a_model_over_the_budget_by_measurement(tmp_path, monkeypatch):
    """A device with slow float and fast int8 kernels (0.01 and 0.001 ms per kB of file): every fp32
    finalist that the prediction puts within 48.5 us (0.85x of the original on the seeded `local`)
    is over it by measurement. The returned model is the first finalist (most accurate first) within
    the budget plus its spread, else a repair of the pick that is, else the pick marked as over."""
    seed_fitted_local()
    monkeypatch.setenv("FAKE_SCALE", "0.01")
    monkeypatch.setenv("FAKE_INT8_SCALE", "0.001")
    out = tmp_path / "out"
    res = _local_search(tmp_path, out)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    m = result["measured"]
    assert result["measured_feasible"] is m["feasible"] and m["by"].startswith("--measure-cmd")
    assert m["limit_ms"] == pytest.approx(0.0485) and "baseline" not in m
    rows = m["finalists"]
    assert len(rows) >= 2 and all(r["latency_ms"] is not None for r in rows)
    assert len({r["trial"] for r in rows}) == len(rows)
    assert any(r["within"] is False for r in rows)  # the check rejected something
    repaired = [r for r in m.get("repairs", []) if r["within"]]  # where every finalist was over
    chosen = repaired[-1] if repaired else next(r for r in rows if r["trial"] == result["best_trial"])
    if result["measured_feasible"] and not repaired:
        assert chosen["latency_ms"] <= m["limit_ms"] + chosen["spread_ms"]
        assert all(not r["within"] for r in rows[:rows.index(chosen)])  # better ones were over
    elif repaired:
        assert chosen["latency_ms"] <= m["limit_ms"] + chosen["spread_ms"] and not any(r["within"] for r in rows)
    else:
        assert chosen is rows[0] and not any(r["within"] for r in rows)
    report = (out / "report.md").read_text()
    assert f"Feasible by measurement: **{result['measured_feasible']}**" in report
    assert f"{chosen['file']} measured {chosen['latency_ms']:.4g}" in report


def test_a_search_whose_command_fails_records_the_finalists_as_not_measured(tmp_path, monkeypatch):
    seed_fitted_local()
    monkeypatch.setenv("FAKE_DEVICE", "fail")
    out = tmp_path / "out"
    res = _local_search(tmp_path, out, "--finalists", "2")
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["measured_feasible"] is None and result["feasible"] is True
    assert all(r["latency_ms"] is None and "exited with status 3" in r["error"] for r in result["measured"]["finalists"])
    assert "Feasible by measurement: **not measured**" in (out / "report.md").read_text()
    assert "not measured: --measure-cmd exited with status 3" in res.output


def test_measure_cmd_and_no_measure_contradict(tmp_path):
    tiny = _script(tmp_path, "tiny.py", TINY)
    res = run_cli("search", "--model", f"{tiny}:model", "--data", f"{tiny}:data", "--target", "mobile",
                  "--budget", "0.8x", "--measure-cmd", "time {onnx}", "--no-measure", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "--measure-cmd", "--no-measure")
    res = run_cli("search", "--model", f"{tiny}:model", "--data", f"{tiny}:data", "--target", "mobile",
                  "--max-drop", "1", "--measure-cmd", "time {onnx}", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "--measure-cmd", "--max-drop")


class _RepairScreen:
    """Predicted latency 0.02 ms per hidden unit of ``_ranked``'s models; a 3 ms predicted limit."""

    def __init__(self, lowest_width: int) -> None:
        from autocompress.hwmodels import parse_budget

        self.budget = parse_budget("3ms")
        self.lowest = {"latency_ms": 0.02 * lowest_width}

    def costs(self, policy) -> dict:
        return {"latency_ms": 0.02 * policy.decisions["w"]}


def _repair_case(tmp_path: Path, lowest_width: int, *, budget: str = "3ms", repair_max_drop: float = 5.0,
                 accuracy=lambda w: 0.88, between=lambda: None):
    """Finalists of widths 128, 64 and 16 (about 35, 17 and 4.5 kB: as many ms on the fake device) against
    a 3 ms budget: every one is over by measurement, and the pick (width 128, selection 0.9) is repaired.
    ``accuracy`` scores a repair of width w; ``between`` runs after the finalists are timed."""
    from dataclasses import replace

    from autocompress.search.core import Candidate
    from autocompress.search.measured import measured_choice, measured_repair
    from autocompress.space.policy import Policy

    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    config = replace(_config(fake, budget), repair_max_drop=repair_max_drop)
    ranked = [(Candidate(i, (("w", w),), Policy("m", "fp", {"w": w}), 0.9 - 0.1 * i, 0.02 * w), s)
              for i, ((_, s), w) in enumerate(zip(_ranked(), (128, 64, 16)))]
    pick, check = measured_choice(ranked, _Evaluator(), config)
    assert (pick, check.feasible) == (0, False)
    between()

    def evaluator(policy, epochs):
        w = policy.decisions["w"]
        return _Scored(nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, 4)).eval(), accuracy(w))

    for attr in ("example", "calibration", "teacher"):
        setattr(evaluator, attr, getattr(_Evaluator, attr))
    asked = []

    def tighten(candidate, scale):  # the widest model the scaled predicted limit allows
        asked.append(scale)
        return Policy("m", "fp", {"w": max(lowest_width, int(scale * 3.0 / 0.02))})

    events = []
    chosen, timing = ranked[0][0], check.finalists[0][2]
    return measured_repair(chosen, chosen.policy, ranked[0][1], timing, check, evaluator, _RepairScreen(lowest_width),
                           config, tighten, events.append), asked, events


def test_when_every_finalist_is_over_by_measurement_the_pick_is_repaired_until_one_fits(tmp_path):
    (policy, scored, check), asked, events = _repair_case(tmp_path, lowest_width=1, accuracy=lambda w: 0.5 + w / 1000,
                                                          repair_max_drop=100.0)
    # round 1 shrinks the predicted limit by measured / limit (35 ms against 3) and a 5 % margin
    first = check.repairs[0]
    assert first.latency_scale == pytest.approx(2.56 / 3.0 * 3.0 / check.finalists[0][2].latency_ms * 0.95, rel=1e-6)
    assert asked == [r.latency_scale for r in check.repairs] and asked == sorted(asked, reverse=True)
    assert check.feasible is True and check.repairs[-1].within is True and check.repair_stopped == ""
    assert [r.taken for r in check.repairs] == [False] * (len(check.repairs) - 1) + [True]
    assert all(r.within is False and r.limit_ms == check.limit_ms for r in check.repairs[:-1])
    assert policy.decisions["w"] < 16 and scored.accuracy == pytest.approx(0.5 + policy.decisions["w"] / 1000)
    assert check.repairs[-1].predicted_ms == pytest.approx(0.02 * policy.decisions["w"])
    assert check.repairs[-1].accuracy == pytest.approx(scored.accuracy)
    assert "repaired to" in events[-1].message and "within the budget" in events[-1].message
    rows = check.to_json()["repairs"]
    assert [r["within"] for r in rows][-1] is True and all(r["trial"] == 0 and r["limit_ms"] == 3.0 for r in rows)


def test_a_repair_that_costs_more_than_the_allowed_drop_is_not_taken(tmp_path):
    """The first repair scores 0.51 against the pick's 0.9: 39 points more than the default 5 allow. The
    rounds end there and the pick is returned, marked over, with the reason on record."""
    (policy, scored, check), asked, events = _repair_case(tmp_path, lowest_width=1, accuracy=lambda w: 0.5 + w / 1000)
    assert len(check.repairs) == 1 and check.repairs[0].accuracy < 0.52 and not check.repairs[0].taken
    assert check.feasible is False and policy.decisions["w"] == 128 and scored.accuracy == pytest.approx(0.9)
    assert "--repair-max-drop 5" in check.repair_stopped and "points of acc below the pick" in check.repair_stopped
    assert check.to_json()["repair_stopped"] == check.repair_stopped
    assert "not taken" in events[-1].message


def test_a_repair_within_the_allowed_drop_is_taken(tmp_path):
    (policy, scored, check), asked, events = _repair_case(tmp_path, lowest_width=1, accuracy=lambda w: 0.86)
    assert check.feasible is True and policy.decisions["w"] < 16 and scored.accuracy == pytest.approx(0.86)


def test_a_relative_budget_s_repair_is_judged_beside_the_original_timed_again(tmp_path, monkeypatch):
    """The device runs twice as slow once the finalists are timed (a busier machine): the repair's limit
    comes from the original model timed in the repair's own rounds, not from the earlier timing."""
    def slower():
        monkeypatch.setenv("FAKE_SCALE", "2")
        monkeypatch.setenv("FAKE_INT8_SCALE", "2")

    (policy, scored, check), asked, events = _repair_case(tmp_path, lowest_width=1, budget="0.05x", between=slower)
    assert all(r.baseline.latency_ms == pytest.approx(2 * check.baseline.latency_ms, rel=1e-3) for r in check.repairs)
    assert all(r.limit_ms == pytest.approx(2 * check.limit_ms, rel=1e-3) for r in check.repairs)
    last = check.repairs[-1]
    assert check.limit_ms < last.timing.latency_ms <= last.limit_ms  # over the stale limit, within the fresh one
    assert check.feasible is True and check.to_json()["repairs"][0]["baseline"]["latency_ms"] > 0


def test_a_repair_the_space_cannot_reach_leaves_the_pick_marked_over(tmp_path):
    """The most compressed policy predicts 2.4 ms (width 120): one round at the space's floor, still over
    by measurement, then no further tightening is possible."""
    (policy, scored, check), asked, events = _repair_case(tmp_path, lowest_width=120)
    assert check.feasible is False and policy.decisions["w"] == 128 and scored.accuracy == pytest.approx(0.9)
    assert len(check.repairs) == 1 and check.repairs[0].latency_scale == pytest.approx(2.4 / 3.0 * 1.02)
    assert check.repairs[0].within is False and "space reaches no lower" in check.repair_stopped


@pytest.mark.parametrize("int8_scale, expected", [("0.001", "model.int8.onnx"), ("0.1", "model.onnx")])
def test_a_finalist_is_timed_as_the_faster_of_its_int8_and_fp32_files(tmp_path, monkeypatch, int8_scale, expected):
    """Both files ship; where int8 kernels lose to float ones (conversions on small layers), the fp32 file
    is what meets a budget, and the timing says which file it is."""
    from autocompress.compress import ApplyContext, apply
    from autocompress.deploy import time_deployed
    from autocompress.hwmodels.device import timer_for
    from autocompress.models import BUILTIN_MODELS
    from autocompress.space.policy import Policy
    from tests.conftest import workspace

    ws = workspace("builtin:digits-net")
    policy = Policy(ws.space.model, ws.space.fingerprint, {"wbits:fc1": 8, "abits:fc1": 8}, ws.space.options)
    example = torch.randn(1, 1, 32, 32)
    torch.manual_seed(0)
    model = apply(BUILTIN_MODELS.get("digits-net").factory().eval(), policy, ws.space, ctx=ApplyContext(ws.space, example))
    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)
    monkeypatch.setenv("FAKE_SCALE", "0.01")
    monkeypatch.setenv("FAKE_INT8_SCALE", int8_scale)
    device = timer_for(get_target("mobile"), f"{PY} {fake} {{onnx}}")
    ((name, timing),), base = time_deployed([model], example, device.timer, rounds=1)
    assert name == expected and base is None and timing.latency_ms > 0


def test_the_local_timer_takes_the_quiet_latency_not_one_session(monkeypatch, tmp_path):
    """Fresh ONNX Runtime sessions here are bimodal (some run 1.7x slower): one call is the lowest of the
    4 sessions calibration's protocol times, so a slow session cannot move a finalist's or a budget's number."""
    import autocompress.hwmodels.measure as measure
    from autocompress.hwmodels.device import local_timer

    sessions = iter([0.70, 0.42, 0.71, 0.43, 0.44, 0.72, 0.41, 0.73])
    monkeypatch.setattr(measure, "time_file", lambda path, threads=1, warmup=10, runs=20: next(sessions))
    timer = local_timer(1)
    assert [timer(tmp_path / "m.onnx") for _ in range(2)] == [0.42, 0.41]


def test_the_summary_says_both_verdicts_and_a_repair():
    from autocompress.cli.search_cmds import feasibility_words

    assert feasibility_words({"feasible": True}) == "feasible: True"
    assert feasibility_words({"feasible": True, "measured_feasible": False}) == \
        "feasible: True by prediction, False by measurement"
    repaired = {"feasible": True, "measured_feasible": True, "measured": {"repairs": [{"within": False}, {"within": True}]}}
    assert feasibility_words(repaired) == "feasible: True by prediction, True by measurement (the pick repaired to fit)"
    costly = {"feasible": True, "measured_feasible": False, "measured": {
        "repairs": [{"within": True, "taken": False}], "repair_stopped": "the repair to 0.60x scored 64.0 points"}}
    assert feasibility_words(costly) == ("feasible: True by prediction, False by measurement "
                                         "(not repaired: the repair to 0.60x scored 64.0 points)")


def test_the_report_says_why_no_repair_was_taken_and_judges_a_repair_by_its_own_limit():
    from autocompress.search.report import measured_lines

    finalist = {"trial": 3, "file": "model.onnx", "latency_ms": 0.40, "spread_ms": 0.01, "within": False}
    stopped = {"measured_feasible": False, "best_trial": 3, "measured": {
        "by": "onnxruntime", "limit_ms": 0.22, "finalists": [finalist],
        "repairs": [{"trial": 3, "latency_scale": 0.6, "latency_ms": 0.2, "spread_ms": 0.0, "limit_ms": 0.3,
                     "file": "model.onnx", "within": True, "taken": False, "accuracy_select": 0.3}],
        "repair_stopped": "the repair to 0.60x scored 64.0 points of macro_f1 below the pick, more than "
                          "--repair-max-drop 5"}}
    # within the budget, yet not taken (it cost too much): the report speaks of the pick
    text = measured_lines(stopped)[0]
    assert "0.4 ± 0.01 ms against 0.22 ms" in text and "not taken: the repair to 0.60x scored 64.0" in text
    fixed = {"measured_feasible": True, "best_trial": 3, "measured": {**stopped["measured"], "repair_stopped": ""}}
    fixed["measured"]["repairs"] = [{**stopped["measured"]["repairs"][0], "taken": True}]
    text = measured_lines(fixed)[0]
    assert "measured 0.2 ± 0 ms against 0.3 ms" in text and "allocated again under 0.60x" in text


# ---- the searched network's own scale on `local` ----------------------------------------------------------
def test_a_network_s_own_scale_is_the_median_over_its_variants_saved_once_and_applied():
    from autocompress.compress import estimate
    from autocompress.hwmodels import predict
    from autocompress.hwmodels.calibrate import SCALE_VARIANTS, ensure_network_scale
    from autocompress.space.policy import Policy
    from autocompress.workspace import open_model

    seed_fitted_local()
    ws = open_model("builtin:digits-net")
    timed: list[Path] = []

    def measure(path: Path) -> float:  # every variant 1.5 ms, whatever it is predicted at
        timed.append(path)
        return 1.5

    table = estimate(ws.space, Policy.identity(ws.space))
    before = predict(table, get_target("local")).latency_ms
    first = ensure_network_scale("local", ws.model, ws.space, "builtin:digits-net", measure=measure)
    assert first is not None and first.measured_now and first.network == table.network
    assert len({p.parent for p in timed}) == SCALE_VARIANTS  # four variants, each timed in two passes
    saved = get_target("local")
    assert saved.network_scale == {table.network: pytest.approx(first.scale)}
    assert saved.fit["network_scale_by_model"] == {"builtin:digits-net": pytest.approx(first.scale)}
    assert 0.67 <= first.scale <= 1.5  # measured / predicted, clipped to NETWORK_SCALE_BOUNDS
    assert predict(table, saved).latency_ms == pytest.approx(before * first.scale, rel=1e-9)
    n = len(timed)
    again = ensure_network_scale("local", ws.model, ws.space, "builtin:digits-net", measure=measure)
    assert again is not None and not again.measured_now and again.scale == first.scale and len(timed) == n


def test_a_network_scale_that_cannot_be_timed_leaves_the_search_unscaled():
    from autocompress.search import run

    seed_fitted_local()
    said: list[str] = []

    class Broken:  # a workspace whose model cannot be compressed or exported
        model = None
        space = None

    run._own_scale(Broken(), "mine.py:net", "local", said.append)
    assert said and said[-1].startswith("could not time variants of mine.py:net on `local` (")
    assert get_target("local").network_scale == {}
    run._own_scale(Broken(), "mine.py:net", "mobile", said.append)  # a fixed target is not timed, nor changed
    assert len(said) == 1 and not target_path("mobile").exists()


def test_a_device_target_gets_the_network_s_scale_through_its_own_command(tmp_path, monkeypatch):
    from autocompress.compress import estimate
    from autocompress.hwmodels import predict
    from autocompress.search import run
    from autocompress.space.policy import Policy
    from autocompress.workspace import open_model

    fake = _script(tmp_path, "fake.py", FAKE_DEVICE)  # prints the file's size in kB x FAKE_SCALE as its ms
    monkeypatch.setenv("FAKE_DEVICE", "size")
    monkeypatch.setenv("FAKE_SCALE", "0.004")  # 2-14 ms for digits-net's variants, near what `mobile` predicts
    device = get_target("mobile").with_(name="phone", calibrated=True, measure_cmd=f"{PY} {fake} {{onnx}}")
    device.save(target_path("phone"))
    ws = open_model("builtin:digits-net")
    said: list[str] = []
    run._own_scale(ws, "builtin:digits-net", "phone", said.append)
    table = estimate(ws.space, Policy.identity(ws.space))
    scale = get_target("phone").network_scale[table.network]
    assert said[-1] == f"`phone` predictions for builtin:digits-net scaled by {scale:.3f} (saved with the target)"
    assert predict(table, get_target("phone")).latency_ms == pytest.approx(
        predict(table, device).latency_ms * scale, rel=1e-9)


@pytest.mark.parametrize("best, shown", [
    ({"measured_latency_ms_local": 0.888, "measured_latency_ms_local_int8": 0.337}, "0.337 (int8)"),
    ({"measured_latency_ms_local": 0.5, "measured_latency_ms_local_int8": 0.7}, "0.500"),
    ({"measured_latency_ms_local": 1.017}, "1.017"),
    ({}, "-"),
])
def test_the_summary_shows_the_time_of_the_file_that_deploys(best, shown):
    from autocompress.cli.search_cmds import _local_ms

    assert _local_ms(best) == shown
