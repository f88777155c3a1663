"""Per-decision sensitivity: what each choice, applied alone to the original model, costs in output fidelity.

Before any fine-tuning, every non-identity choice of every decision is applied on its own and the
model's outputs on a few calibration batches are compared with the original model's (KL divergence
of the class distributions for logits, relative squared error for any other output). Allocation
(``allocate``) then spends the budget where this costs the least, as AIMET's per-layer compression
ratio selection and HAWQ's bit allocation do.

It is cheap because only what a choice changes is recomputed: the original model runs once and
every node's output is kept; a candidate then recomputes only the nodes downstream of the modules
it replaced (quantisation and factorisation swap one module, pruning reshapes one coupled group),
with BatchNorm layers downstream of a pruned group using the batch's own statistics (their running
statistics describe inputs that lost channels). Merging and branch fusion rewrite the graph,
so those few candidates run whole.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from autocompress.compress import apply
from autocompress.compress.quant import FLOAT, quantise_module
from autocompress.space.graph import symbolic_trace
from autocompress.space.inputs import as_tuple
from autocompress.space.policy import Policy
from autocompress.space.space import Decision, SearchSpace

FORMAT = "autocompress.sensitivity/1"
LOCAL_KINDS = ("wbits", "abits", "rank", "prune")  # recomputed downstream of the changed modules only
FAILED = 1e6  # the score of a choice that cannot be applied or run, or whose outputs are not finite
STRUCTURAL = ("prune",)  # BN statistics downstream of a pruned group are re-estimated on the batch


def choice_key(choice: Any) -> str:
    """A choice as a JSON object key (choices are numbers: 8 and 8.0 are one key)."""
    value = float(choice)
    return str(int(value)) if value.is_integer() else repr(value)


@dataclass(frozen=True)
class SensitivityTable:
    """``scores[decision id][choice_key(choice)]``: the divergence from the original model's outputs."""

    scores: Mapping[str, Mapping[str, float]]
    measure: str  # "kl" (logits) or "relative_mse"
    samples: int
    seconds: float
    fingerprint: str = ""

    def of(self, decision_id: str, choice: Any) -> float:
        """The score of one choice; 0 for a decision's identity or a decision that was not measured."""
        return float(self.scores.get(decision_id, {}).get(choice_key(choice), 0.0))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "measure": self.measure, "samples": self.samples, "seconds": self.seconds,
                "fingerprint": self.fingerprint, "scores": {k: dict(v) for k, v in self.scores.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SensitivityTable":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a sensitivity table: format {data.get('format')!r}")
        return cls({k: {c: float(s) for c, s in v.items()} for k, v in data["scores"].items()}, str(data["measure"]),
                   int(data["samples"]), float(data["seconds"]), str(data.get("fingerprint", "")))

    def by_layer(self, space: SearchSpace) -> dict[str, dict[str, float]]:
        """Layer path -> kind -> the score of the kind's most compressing measured choice (for the report)."""
        out: dict[str, dict[str, float]] = {}
        for d in space.decisions:
            scores = self.scores.get(d.id)
            if scores:
                out.setdefault(d.layers[0], {})[d.kind] = max(scores.values())
        return out


def divergence(student: Any, teacher: Any) -> float:
    """KL(teacher || student) of softmax outputs for logits (2-D float), else relative squared error;
    summed over the tensors of tuple, list or dict outputs."""
    if isinstance(teacher, Mapping):
        return sum(divergence(student[k], teacher[k]) for k in teacher)
    if isinstance(teacher, (tuple, list)):
        return sum(divergence(s, t) for s, t in zip(student, teacher))
    if not isinstance(teacher, torch.Tensor) or not teacher.is_floating_point():
        return 0.0
    s, t = student.float(), teacher.float()
    if t.dim() == 2 and t.shape[1] > 1:
        return float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean"))
    return float(((s - t) ** 2).sum() / (t ** 2).sum().clamp_min(1e-12))


def measure_name(output: Any) -> str:
    first = output
    while isinstance(first, (tuple, list, Mapping)):
        first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
    return "kl" if isinstance(first, torch.Tensor) and first.dim() == 2 and first.shape[1] > 1 else "relative_mse"


class _Replay(fx.Interpreter):
    """Runs a traced model with some modules replaced, recomputing only what they change.

    Nodes that no replaced module reaches take their value from the original run; BatchNorm
    modules downstream of a structural change (not those pruned with it, whose kept channels keep
    their statistics) normalise with the batch's statistics.
    """

    def __init__(self, gm: fx.GraphModule, cached: Mapping[str, Any], replaced: Mapping[str, nn.Module],
                 batch_stats: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.cached, self.replaced, self.batch_stats = cached, replaced, batch_stats
        self.dirty: set[str] = set()

    def run_node(self, n: fx.Node) -> Any:
        touched = (n.op == "call_module" and n.target in self.replaced) or any(
            a.name in self.dirty for a in n.all_input_nodes)
        if not touched and n.op != "output":
            return self.cached[n.name]
        self.dirty.add(n.name)
        return super().run_node(n)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = self.replaced.get(target) or self.fetch_attr(target)
        if self.batch_stats and target not in self.replaced and isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            x = args[0]
            return F.batch_norm(x, None, None, module.weight, module.bias, training=True, eps=module.eps)
        return module(*args, **kwargs)


class _Original:
    """The original model traced once, with every node's output on the calibration batch.

    A model only torch.export could capture (``space.graph.fx_traced`` False) has no fx graph to
    replay: every candidate then runs whole, with the changed modules swapped in for the run and put back.
    """

    def __init__(self, teacher: nn.Module, space: SearchSpace, batch: Any) -> None:
        self.teacher, self.batch = teacher.eval(), as_tuple(batch)
        if not space.graph.fx_traced:
            self.gm = teacher
            inputs: dict[str, Any] = {}
            def keep(name: str, args: tuple, kwargs: dict) -> None:  # modules may be called by keyword only
                first = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(first, torch.Tensor):
                    inputs.setdefault(name, first)

            hooks = [m.register_forward_pre_hook(lambda mod, args, kwargs, name=name: keep(name, args, kwargs),
                                                 with_kwargs=True)
                     for name, m in teacher.named_modules() if name]
            try:
                with torch.no_grad():
                    self.output = teacher(*self.batch)
            finally:
                for h in hooks:
                    h.remove()
            self.cached, self.module_input, self.replayable = {}, inputs, False
            return
        self.gm = symbolic_trace(teacher, space.graph.leaf_paths).eval()
        recorder = fx.Interpreter(self.gm, garbage_collect_values=False)
        with torch.no_grad():
            self.output = recorder.run(*self.batch)
        self.cached = {node.name: value for node, value in recorder.env.items()}
        self.module_input = {n.target: self.cached[n.args[0].name] for n in self.gm.graph.nodes
                             if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node)}
        self.replayable = True

    def replay(self, replaced: Mapping[str, nn.Module], batch_stats: bool) -> Any:
        if not self.replayable:
            with torch.no_grad(), _swapped_in(self.teacher, replaced):
                return self.teacher(*self.batch)
        with torch.no_grad():
            return _Replay(self.gm, self.cached, replaced, batch_stats).run(*self.batch)


@contextlib.contextmanager
def _swapped_in(model: nn.Module, replaced: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """``model`` with ``replaced`` swapped in at their paths for the block, the originals put back after
    (no copy of the whole model per choice)."""
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for path, module in replaced.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            originals.append((parent, name, getattr(parent, name)))
            setattr(parent, name, module)
        yield model
    finally:
        for parent, name, module in reversed(originals):
            setattr(parent, name, module)


def _changed_modules(original: nn.Module, changed: nn.Module, paths: Iterable[str]) -> dict[str, nn.Module] | None:
    """The modules of ``changed`` that differ in type or tensor shapes from ``original``'s at ``paths``;
    None where a path no longer resolves (the graph itself changed)."""
    out: dict[str, nn.Module] = {}
    for path in paths:
        try:
            new = changed.get_submodule(path)
        except AttributeError:
            return None
        old = original.get_submodule(path)
        shapes = lambda m: [tuple(t.shape) for t in [*m.parameters(recurse=True), *m.buffers(recurse=True)]]
        if type(new) is not type(old) or shapes(new) != shapes(old):
            out[path] = new
    return out


def _quantised(original: _Original, d: Decision, choice: Any) -> dict[str, nn.Module]:
    path = str(d.info.get("path", d.layers[0])) if d.info else d.layers[0]
    bits = {"wbits": FLOAT, "abits": FLOAT, d.kind: int(choice)}
    q = quantise_module(copy.deepcopy(original.gm.get_submodule(path)), bits["wbits"], bits["abits"]).eval()
    if bits["abits"] < FLOAT:
        q.reset_range()
        q.observe(original.module_input[path])
    return {path: q}


def _run_one(original: _Original, space: SearchSpace, d: Decision, choice: Any, module_paths: list[str]) -> Any:
    """The model's outputs on the batch with ``d`` at ``choice`` and everything else original."""
    if d.kind in ("wbits", "abits"):
        return original.replay(_quantised(original, d, choice), batch_stats=False)
    policy = Policy(space.model, space.fingerprint, {d.id: choice}, space.options)
    model = apply(original.teacher, policy, space, calibration=original.batch)
    replaced = _changed_modules(original.gm, model, module_paths) if d.kind in LOCAL_KINDS else None
    if replaced is not None and original.replayable:
        return original.replay(replaced, batch_stats=d.kind in STRUCTURAL)
    with torch.no_grad():
        return model.eval()(*original.batch)


def measure_sensitivity(space: SearchSpace, teacher: nn.Module, batch: Any, *,
                        decisions: Iterable[Decision] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> SensitivityTable:
    """Score every non-identity choice of ``decisions`` (default: all of ``space``'s) on ``batch``."""
    started = time.monotonic()
    original = _Original(teacher, space, batch)
    module_paths = [n.target for n in original.gm.graph.nodes if n.op == "call_module"] if original.replayable \
        else [name for name, _ in teacher.named_modules() if name]
    todo = [(d, c) for d in (decisions if decisions is not None else space.decisions) for c in d.choices
            if c != d.identity]
    scores: dict[str, dict[str, float]] = {}
    for i, (d, choice) in enumerate(todo):
        try:
            score = divergence(_run_one(original, space, d, choice, module_paths), original.output)
        except Exception:  # a choice the model cannot run with is as bad as it gets; the search avoids it
            score = FAILED
        scores.setdefault(d.id, {})[choice_key(choice)] = score if math.isfinite(score) else FAILED
        if progress is not None:
            progress(i + 1, len(todo))
    return SensitivityTable(scores, measure_name(original.output), int(original.batch[0].shape[0]),
                            round(time.monotonic() - started, 3), space.fingerprint)
