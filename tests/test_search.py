"""The search end to end on a tiny model: outputs, resume after SIGKILL, impossible budgets, failing trials."""

from __future__ import annotations

import csv
import json
import os
import textwrap
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli

TINY = textwrap.dedent('''
    import os
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    INPUT_SHAPE = (1, 1, 16, 16)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            if os.environ.get("TINY_RAISE") and self.conv2.out_channels <= 16:
                raise RuntimeError("this candidate cannot run")
            x = self.pool(torch.relu(self.bn1(self.conv1(x))))
            x = torch.relu(self.bn2(self.conv2(x)))
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def model():
        torch.manual_seed(0)
        return Tiny()

    def data():
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 4, (320,), generator=g)
        x = torch.randn(320, 1, 16, 16, generator=g) * 0.5
        x[:, :, : 8, : 8] += (y == 0).float()[:, None, None, None]
        x[:, :, 8:, 8:] += (y == 1).float()[:, None, None, None]
        x[:, :, :8, 8:] += (y == 2).float()[:, None, None, None]
        return TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])

    def failing_data():
        # A data set whose labels break training for some candidates: out-of-range labels after index 200.
        train, val = data()
        if os.environ.get("TINY_FAIL"):
            x, y = train.tensors
            y = y.clone(); y[200:] = 99
            return TensorDataset(x, y), val
        return train, val
''')

FAST = ["--low-epochs", "0.5", "--full-epochs", "0.5", "--finalists", "1", "--no-measure"]


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return path


def _search_args(tiny: Path, out: Path, trials: int, budget: str = "0.9x", data: str = "data") -> list[str]:
    return ["search", "--model", f"{tiny}:model", "--data", f"{tiny}:{data}", "--target", "mobile",
            "--budget", budget, "--trials", str(trials), "--out", str(out), *FAST]


def test_tiny_search_writes_every_output(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_cli(*_search_args(tiny, out, trials=4))
    assert res.exit_code == 0, res.output
    for name in ("policy.json", "model.onnx", "model.pt2", "model.state.pt", "result.json", "report.md",
                 "pareto.png", "trials.csv"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert result["target"] == "mobile"
    assert result["feasible"] is True
    assert result["best"]["latency_ms"] <= result["budget"]["latency_ms"] + 1e-9
    assert result["budget"]["latency_ms"] == pytest.approx(0.9 * result["baseline"]["latency_ms"], rel=1e-6)
    assert result["trials"]["complete"] == 4
    for key in ("accuracy", "latency_ms", "energy_mj", "size_bytes", "macs"):
        assert key in result["baseline"] and key in result["best"]
    assert 0.0 <= result["best"]["accuracy"] <= 1.0
    policy = json.loads((out / "policy.json").read_text())
    assert policy["format"] == "autocompress.policy/1" and policy["fingerprint"] == result["fingerprint"]
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert sum(r["state"] == "COMPLETE" for r in rows) == 4
    # The saved policy re-applies to the model through `apply`, with the same predicted latency.
    res2 = run_cli("apply", "--model", f"{tiny}:model", "--policy", str(out / "policy.json"), "--out",
                   str(tmp_path / "applied"))
    assert res2.exit_code == 0, res2.output
    applied = json.loads((tmp_path / "applied" / "result.json").read_text())
    assert applied["best"]["latency_ms"] == pytest.approx(result["best"]["latency_ms"], rel=1e-9)


def test_impossible_budget_names_the_lowest_reachable_cost(tiny: Path, tmp_path: Path) -> None:
    res = run_cli(*_search_args(tiny, tmp_path / "out", trials=2, budget="1us"))
    line = assert_one_line_error(res, "cannot be met", "lowest", "latency")
    assert " ms" in line


def test_bad_budget_and_target_are_one_line_errors(tiny: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli(*_search_args(tiny, tmp_path / "o1", 2, budget="fast")), "budget")
    args = _search_args(tiny, tmp_path / "o2", 2)
    args[args.index("mobile")] = "toaster"
    assert_one_line_error(run_cli(*args), "toaster", "mobile")


def test_failing_trials_are_recorded_and_the_search_goes_on(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TINY_FAIL", "1")
    out = tmp_path / "out"
    res = run_cli(*_search_args(tiny, out, trials=3, data="failing_data"))
    # Every candidate fails on the corrupt labels: the search says so instead of inventing a result.
    assert res.exit_code == 1, res.output
    assert "no candidate could be evaluated" in res.stderr
    from autocompress.search.optuna_driver import make_storage
    import optuna

    storage = make_storage(None, out)
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(failed) == 3
    assert all("fail_reason" in t.user_attrs and t.user_attrs["fail_reason"] for t in failed)


def test_a_raising_trial_is_failed_with_its_reason_and_the_search_goes_on(tiny: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("TINY_RAISE", "1")
    out = tmp_path / "out"
    res = run_cli(*_search_args(tiny, out, trials=6), "--space", "layers")  # the sampler proposes broken candidates
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["trials"]["failed"] >= 1 and result["trials"]["complete"] >= 1
    assert result["trials"]["failed"] + result["trials"]["complete"] == 6
    rows = list(csv.DictReader(open(out / "trials.csv")))
    reasons = [r["fail_reason"] for r in rows if r["state"] == "FAIL"]
    assert reasons and all("cannot run" in r for r in reasons)
    chosen = json.loads((out / "policy.json").read_text())["decisions"]
    assert chosen.get("prune:conv2", 0.0) < 0.5


def test_killed_search_resumes_without_losing_trials(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    import optuna

    from autocompress.search.optuna_driver import make_storage
    from cluster_utils import kill_after_completed

    names = [kill_after_completed([*_search_args(tiny, out, trials=6), "--space", "layers"], out)]
    study = optuna.load_study(study_name=names[0], storage=make_storage(None, out))
    done_before = {t.number: t.params for t in study.trials if t.state.name == "COMPLETE"}
    assert len(done_before) >= 2
    assert not (out / "result.json").exists()

    res = run_cli(*_search_args(tiny, out, trials=6), "--space", "layers")
    assert res.exit_code == 0, res.output
    study = optuna.load_study(study_name=names[0], storage=make_storage(None, out))
    after = {t.number: t.params for t in study.trials if t.state.name == "COMPLETE"}
    for number, params in done_before.items():
        assert after[number] == params  # nothing completed before the kill was lost or redone
    result = json.loads((out / "result.json").read_text())
    # as many candidates fine-tuned to the end as an uninterrupted run: the interrupted one ran again
    assert result["trials"]["complete"] == 6 and result["trials"]["failed"] == 0
    by_number = {t.number: t for t in study.trials}
    reruns = [t for t in study.trials if str(t.user_attrs.get("origin", "")).startswith("re-run of ")]
    interrupted = [t for t in study.trials if t.user_attrs.get("reason") == "interrupted; run again"]
    assert len(reruns) == len(interrupted) <= 1
    for t in reruns:  # the interrupted candidate itself runs again
        assert t.params == by_number[int(t.user_attrs["origin"].split()[-1])].params


def test_an_unclaimed_trial_of_a_dead_worker_goes_stale_after_the_grace_period() -> None:
    """A worker killed between asking for a trial and claiming a slot never sent a heartbeat."""
    import optuna

    from autocompress.search import workers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    dead, claimed, mine = study.ask(), study.ask(), study.ask()
    dead.set_user_attr("owner", "host:1")
    claimed.set_user_attr("owner", "host:2")
    claimed.set_user_attr("claimed", True)
    mine.set_user_attr("owner", "host:3")
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in workers.unclaimed_stale(trials, "host:3", 0.0)] == [dead.number]
    assert workers.unclaimed_stale(trials, "host:3", 3600.0) == []  # too young to call dead


def test_an_interrupted_trial_runs_again_once_its_parameters_are_all_drawn() -> None:
    """Claiming a slot comes after the parameters are drawn: a claimed trial killed before it wrote its
    policy runs again like one killed mid-fine-tune; one that never claimed does not."""
    from autocompress.search.workers import RUN_AGAIN, interruption

    assert interruption({"claimed": True, "policy": {"a": 1}}, shared=True) == RUN_AGAIN
    assert interruption({"claimed": True}, shared=True) == RUN_AGAIN
    assert interruption({"owner": "host:1"}, shared=True) == "interrupted before fine-tuning"
    assert interruption({"policy": {"a": 1}}, shared=False) == RUN_AGAIN  # one worker: nothing to claim
    assert interruption({}, shared=False) == "interrupted before a candidate"


def test_finalists_are_the_best_distinct_candidates_faster_first_among_equals() -> None:
    from autocompress.search.core import Candidate
    from autocompress.search.finalists import pick_finalists
    from autocompress.space.policy import Policy

    def cand(number: int, prune: float, acc: float, ms: float) -> Candidate:
        return Candidate(number, (("prune:*", prune),), Policy("m", "f", {"prune:a": prune}), acc, ms)

    ranked = pick_finalists([cand(0, 0.5, 0.8, 2.0), cand(1, 0.25, 0.9, 3.0), cand(2, 0.25, 0.9, 3.0),
                             cand(3, 0.125, 0.9, 2.5), cand(4, 0.75, 0.7, 1.0)], 3)
    assert [c.number for c in ranked] == [3, 1, 0]  # trial 2 repeats trial 1's parameters
    assert [c.number for c in pick_finalists([cand(0, 0.5, 0.8, 2.0)], 0)] == [0]  # always at least one


def test_finalists_tied_on_the_selection_split_are_noted_and_a_measured_difference_is_not() -> None:
    from autocompress.search.core import Finalist
    from autocompress.search.report import finalist_tie_note

    tied = [Finalist(3, "sampler", 0.99, 0.990099, 3.2), Finalist(7, "uniform", 0.98, 0.990099, 3.4),
            Finalist(9, "sampler", 0.99, 0.985148, 3.1)]
    (note,) = finalist_tie_note(tied, "accuracy", 202)
    assert note.startswith("2 of 3 finalists tied on the selection split (accuracy 0.9901, 202 samples)")
    assert finalist_tie_note(tied[1:], "f1", None) == []  # 0.9901 against 0.9851: the split told them apart
    assert finalist_tie_note(tied[:1], "accuracy", 202) == []  # one finalist: nothing to tie with


def test_a_resumed_search_reads_its_sensitivity_table_back(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    from autocompress.search import sensitivity

    calls = []
    real = sensitivity.measure_sensitivity
    monkeypatch.setattr(sensitivity, "measure_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "out"
    first = run_cli(*_search_args(tiny, out, trials=2))
    assert first.exit_code == 0, first.output
    assert len(calls) == 1
    again = run_cli(*_search_args(tiny, out, trials=3))  # the same study, one trial more
    assert again.exit_code == 0, again.output
    assert len(calls) == 1  # measured once, read back from the study on resume
    result = json.loads((out / "result.json").read_text())
    assert result["trials"]["complete"] >= 2
    report = (out / "report.md").read_text()
    assert "## Sensitivity per layer" in report and (out / "sensitivity.png").is_file()
    # Each finalist line carries its predicted latency, which breaks a tie on the selection metric.
    chosen = next(l for l in report.splitlines() if l.startswith(f"- trial {result['best_trial']} ("))
    assert chosen.endswith(f"{result['best']['latency_ms']:.3f} ms predicted")
