"""User tasks: the user's metric, batches and int64 inputs with a dict output, from the CLI and the Python API."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_one_line_error, run_cli

TOKENS = textwrap.dedent('''
    import math
    import torch
    from torch import nn

    import autocompress

    VOCAB, SEQ = 50, 12

    class Bag(nn.Module):
        """Token ids and a mask in, a dict out: {"logits": ..., "pooled": ...}."""

        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 64)
            self.fc1 = nn.Linear(64, 512)
            self.fc2 = nn.Linear(512, 64)
            self.head = nn.Linear(64, 3)

        def forward(self, ids, mask):
            m = mask.unsqueeze(-1).float()
            x = torch.relu(self.fc2(torch.relu(self.fc1(self.emb(ids)))))  # per token
            pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
            return {"logits": self.head(pooled), "pooled": pooled}

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 3, (n,), generator=g)
        ids = torch.randint(10, VOCAB, (n, SEQ), generator=g)
        ids[:, 0] = y + 1  # the label's token leads every sentence
        mask = torch.ones(n, SEQ, dtype=torch.long)
        mask[:, SEQ - 2:] = 0
        return ids, mask, y

    def model():
        torch.manual_seed(0)
        net = Bag()
        ids, mask, y = data(256, 5)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(60):
            loss = nn.functional.cross_entropy(net(ids, mask)["logits"], y)
            opt.zero_grad(); loss.backward(); opt.step()
        return net.eval()

    def balanced_accuracy(pred, y):
        return sum(float((pred[y == c] == c).float().mean()) for c in range(3)) / 3

    def task(evaluate=None, example=None):
        ids, mask, y = data(192, 1)
        tids, tmask, ty = data(96, 2)
        def score(net):
            return balanced_accuracy(net(tids, tmask)["logits"].argmax(-1), ty)
        train = [((ids[i:i + 32], mask[i:i + 32]), y[i:i + 32]) for i in range(0, 192, 32)]
        return autocompress.Task(evaluate=evaluate or score, train=train,
                                 example_input=example if example is not None else (tids[:1], tmask[:1]),
                                 metric="balanced_acc", lr=1e-3)

    def not_a_task():
        return {"evaluate": None}

    def raising_metric():
        def evaluate(net):
            raise ValueError("labels file missing")
        return task(evaluate=evaluate)

    def nan_metric():
        return task(evaluate=lambda net: math.nan)

    def wrong_example():
        return task(example=torch.randn(1, 3, 8, 8))

    def sized():
        """A metric that tells candidates apart: the balanced accuracy scaled by the share of weights kept."""
        full = sum(p.numel() for p in model().parameters())
        tids, tmask, ty = data(96, 2)
        return task(evaluate=lambda net: balanced_accuracy(net(tids, tmask)["logits"].argmax(-1), ty)
                    * sum(p.numel() for p in net.parameters()) / full)

    def fragile():
        """A metric that only the untouched model passes: any compression costs all of it."""
        full = sum(p.numel() for p in model().parameters())
        return task(evaluate=lambda net: float(sum(p.numel() for p in net.parameters()) == full and
                                               not any("Quant" in type(m).__name__ for m in net.modules())))
''')


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.py"
    path.write_text(TOKENS)
    return path


def _args(tokens: Path, out: Path, *extra: str, trials: int = 3) -> list[str]:
    return ["search", "--model", f"{tokens}:model", "--task", f"{tokens}:task", "--target", "mobile",
            "--budget", "0.6x", "--trials", str(trials), "--low-epochs", "0.5", "--full-epochs", "1",
            "--finalists", "1", "--no-measure", "--out", str(out), *extra]


def test_a_task_search_from_the_cli_names_its_metric_and_ships_named_int64_inputs(tokens: Path, tmp_path: Path):
    import onnxruntime as ort

    out = tmp_path / "out"
    res = run_cli(*_args(tokens, out))
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["metric"] == "balanced_acc" and result["data"] == f"task:{tokens}:task"
    assert result["baseline"]["balanced_acc"] == result["baseline"]["accuracy"] > 0.9  # the trained model
    assert 0.0 <= result["best"]["balanced_acc"] <= 1.0
    assert result["best"]["latency_ms"] <= result["budget"]["latency_ms"] * (1 + 1e-9)
    report = (out / "report.md").read_text()
    assert "| balanced_acc (held-out) |" in report and "selection balanced_acc" in report
    deployed = result["best"]["deployed_accuracy"]  # the user's metric on the shipped files, run in ONNX Runtime
    assert "model.onnx" in deployed and all(0.0 <= v <= 1.0 for v in deployed.values())
    assert "| balanced_acc of model.onnx through ONNX Runtime |" in report
    sess = ort.InferenceSession(str(out / "model.onnx"))
    inputs = sess.get_inputs()
    assert [i.name for i in inputs] == ["ids", "mask"] and inputs[0].type == "tensor(int64)"
    assert inputs[0].shape == ["batch", "sequence"]
    assert [o.name for o in sess.get_outputs()] == ["logits", "pooled"]
    ids = np.random.default_rng(0).integers(10, 50, (5, 20)).astype(np.int64)  # another batch and sequence length
    logits = sess.run(["logits"], {"ids": ids, "mask": np.ones_like(ids)})[0]
    assert logits.shape == (5, 3) and np.isfinite(logits).all()
    # the found policy applied again, fine-tuned and scored with the same task
    res = run_cli("apply", "--model", f"{tokens}:model", "--policy", out / "policy.json", "--task", f"{tokens}:task",
                  "--epochs", "0.5", "--no-measure", "--out", tmp_path / "applied")
    assert res.exit_code == 0, res.output
    applied = json.loads((tmp_path / "applied" / "result.json").read_text())
    assert applied["metric"] == "balanced_acc" and applied["baseline"]["balanced_acc"] > 0.9
    assert applied["best"]["macs"] == result["best"]["macs"] and 0.0 <= applied["best"]["balanced_acc"] <= 1.0


def test_the_python_api_searches_an_in_memory_model_with_a_task_object(tokens: Path, tmp_path: Path):
    import autocompress
    from autocompress.userfile import import_function

    make_model, module = import_function(str(tokens), "model", ValueError, "model")
    make_task, _ = import_function(str(tokens), "task", ValueError, "task")
    model, task = make_model(), make_task()
    outcome = autocompress.search(model, task, target="mobile", budget="0.6x", out=tmp_path / "api", trials=3,
                                  low_epochs=0.5, full_epochs=1.0, finalists=1, measure=False)
    assert outcome.metric == "balanced_acc" and outcome.feasible
    assert outcome.best["balanced_acc"] == pytest.approx(task.evaluate(outcome.model.eval()), abs=1e-6)
    assert outcome.paths["policy.json"].exists() and outcome.paths["model.onnx"].exists()
    assert outcome.result["model"] == "python:Bag"
    ids, mask = task.example_input
    assert outcome.model(ids, mask)["logits"].shape == (1, 3)
    with pytest.raises(autocompress.UserInputError, match="unknown search option"):
        autocompress.search(model, task, budget="0.6x", out=tmp_path / "x", trails=3)


@pytest.mark.parametrize("factory, fragments", [
    ("not_a_task", ("returned dict, not an autocompress.Task",)),
    ("raising_metric", ("evaluate (balanced_acc) on the original model raised ValueError: labels file missing",)),
    ("nan_metric", ("returned nan", "finite number")),
    ("wrong_example", ("rejects", "example input")),
])
def test_bad_tasks_are_refused_before_the_search_starts(tokens: Path, tmp_path: Path, factory: str, fragments):
    out = tmp_path / "out"
    args = _args(tokens, out)
    args[args.index("--task") + 1] = f"{tokens}:{factory}"
    res = run_cli(*args)
    assert_one_line_error(res, *fragments)
    assert not (out / "study.journal").exists() and not (out / "result.json").exists()


def test_task_and_data_together_are_refused(tokens: Path, tmp_path: Path):
    assert_one_line_error(run_cli(*_args(tokens, tmp_path / "o"), "--data", "sklearn:digits"), "--task and --data")


@pytest.mark.heavy
def test_a_killed_task_search_resumes_to_the_same_count_of_trials(tokens: Path, tmp_path: Path):
    from cluster_utils import kill_after_completed

    out = tmp_path / "out"
    args = _args(tokens, out, "--space", "layers", trials=5)
    kill_after_completed(args, out)
    assert not (out / "result.json").exists()
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["trials"]["complete"] == 5 and result["trials"]["failed"] == 0
    assert result["metric"] == "balanced_acc"


def test_default_loss_distils_logits_with_labels_and_features_without():
    from autocompress.evaluators.task_finetune import default_loss

    torch.manual_seed(0)
    t = torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    same = default_loss({"logits": t.clone()}, {"logits": t}, labels)
    other = default_loss({"logits": -t}, {"logits": t}, labels)
    assert float(other) > float(same) > 0  # KD + cross-entropy: never zero with hard labels
    feats = torch.randn(4, 8, 5)
    assert float(default_loss(feats, feats.clone(), torch.randn(4, 8, 5))) == pytest.approx(0.0, abs=1e-7)
    assert float(default_loss(feats * 0, feats, None)) == pytest.approx(1.0, rel=1e-5)  # relative: all energy lost


def test_a_ray_worker_rebuilds_the_task_from_its_file(tokens: Path, tmp_path: Path, monkeypatch):
    """What each Ray worker does with a job: re-import the task by its absolute path, score with its metric."""
    from autocompress.search.core import SearchConfig
    from autocompress.search.ray_backend import JobSpec, _absolute, build_context

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(tokens, tmp_path)
    assert _absolute(f"{relative}:task") == f"{tokens}:task"
    assert _absolute("imagefolder:val") == f"imagefolder:{tmp_path / 'val'}"
    assert _absolute("torchvision:resnet18") == "torchvision:resnet18"
    job = JobSpec(model=f"{tokens}:model", data=None, task=f"{tokens}:task",
                  config=SearchConfig(budget="0.6x", trials=2, space="layers"))
    ctx = build_context(job)
    assert ctx.evaluator.metric == "balanced_acc"
    assert ctx.evaluator.baseline()["accuracy"] > 0.9
    assert [s.dtype for s in ctx.screen.space.graph.inputs.specs] == ["int64", "int64"]


def test_an_onnx_file_scores_like_the_model_it_was_exported_from(tokens: Path, tmp_path: Path):
    from autocompress.deploy import deployed_accuracy, deployed_gaps
    from autocompress.export.onnx import export_onnx
    from autocompress.userfile import import_function

    make_model, _ = import_function(str(tokens), "model", ValueError, "model")
    make_task, _ = import_function(str(tokens), "task", ValueError, "task")
    model, task = make_model(), make_task()
    export_onnx(model, task.example_input, tmp_path / "model.onnx")
    with torch.no_grad():
        scored = deployed_accuracy(tmp_path, task.evaluate, model, task.example_input)
        assert scored == {"model.onnx": pytest.approx(task.evaluate(model), abs=1e-9)}
    assert deployed_gaps(scored["model.onnx"] + 0.02, scored)  # more than a point below: flagged
    assert not deployed_gaps(scored["model.onnx"] + 0.005, scored)


@pytest.mark.heavy
def test_max_drop_returns_the_cheapest_model_within_the_drop(tokens: Path, tmp_path: Path):
    out = tmp_path / "bounded"
    args = ["search", "--model", f"{tokens}:model", "--task", f"{tokens}:task", "--target", "mobile",
            "--max-drop", "5", "--minimise", "latency_ms", "--trials", "4", "--low-epochs", "0.5",
            "--full-epochs", "1", "--finalists", "2", "--no-measure", "--out", str(out)]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["max_drop"] == 5.0 and result["minimise"] == "latency_ms"
    drop = 100 * (result["baseline"]["balanced_acc"] - result["best"]["balanced_acc"])
    assert drop <= 5.0 + 1e-9  # a result that breaks the drop is never returned
    assert result["best"]["latency_ms"] < result["baseline"]["latency_ms"]
    assert "within 5 points" in (out / "report.md").read_text()
    # a metric every compressed model loses entirely: a one-line error naming the smallest drop reached
    fragile = [f"{tokens}:fragile" if a == f"{tokens}:task" else a for a in args[:-1]] + [str(tmp_path / "none")]
    refused = run_cli(*fragile)
    assert_one_line_error(refused, "no compressed model stays within 5 points", "smallest drop reached was 100.00 points")


def test_budget_and_max_drop_are_exclusive(tokens: Path, tmp_path: Path):
    res = run_cli("search", "--target", "mobile", "--budget", "5ms", "--max-drop", "1", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "either --budget", "--max-drop")
    res = run_cli("search", "--target", "mobile", "--out", str(tmp_path / "o"))
    assert_one_line_error(res, "either --budget")


def test_chunked_fine_tunes_stop_weak_candidates_early(tokens: Path, tmp_path: Path):
    out = tmp_path / "chunks"
    args = _args(tokens, out, "--space", "layers", "--chunks", "3", "--sampler", "random", trials=8)
    args[args.index("--task") + 1] = f"{tokens}:sized"
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    import optuna

    from autocompress.search.optuna_driver import make_storage

    storage = make_storage(None, out)
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(len(t.intermediate_values) == 3 for t in finished)  # every finished one reported each chunk
    stopped = [t for t in study.trials if "stopped_at_chunk" in t.user_attrs]
    result = json.loads((out / "result.json").read_text())
    assert stopped and result["trials"]["early_stopped"] == len(stopped)
    assert result["trials"]["complete"] + result["trials"]["failed"] + len(stopped) == 8  # they count as trials
    for t in stopped:  # stopped before its last chunk, behind what the others had at that point
        assert t.user_attrs["stopped_at_chunk"] < 3 and len(t.intermediate_values) == t.user_attrs["stopped_at_chunk"]
