"""The search space: decisions attached to the layer graph.

A :class:`Decision` has a stable id (``"<kind>:<first layer>"``), a kind, the
layers it touches, its choices and the identity choice that leaves the model
unchanged. Each compression primitive (``autocompress.compress``) offers the
decisions of its kinds; ``compress.build_space`` collects them in a fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from autocompress.errors import PolicyError
from autocompress.space.costs import CostTable, LayerCost
from autocompress.space.graph import ModelGraph

KINDS = ("prune", "wbits", "abits", "rank", "merge", "branch", "heads", "drop")
IMPORTANCE = ("l2", "l1", "bn", "random")  # channel importance criteria of ``prune_importance``


@dataclass(frozen=True)
class Decision:
    """One per-layer (or per-group) choice. ``info`` is primitive-private and not serialised."""

    id: str
    kind: str
    layers: tuple[str, ...]
    choices: tuple[Any, ...]
    identity: Any
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "layers": list(self.layers),
                "choices": list(self.choices), "identity": self.identity}


@dataclass
class SearchSpace:
    model: str
    graph: ModelGraph
    decisions: list[Decision]
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return self.graph.fingerprint

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.graph.input_shape

    # The unmodified model's cost table, built on first use: every estimate starts from a copy of it.
    _base: CostTable | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id = {d.id: d for d in self.decisions}
        if len(self._by_id) != len(self.decisions):
            raise ValueError("duplicate decision ids in the search space")

    def __getitem__(self, decision_id: str) -> Decision:
        return self._by_id[decision_id]

    def __contains__(self, decision_id: object) -> bool:
        return decision_id in self._by_id

    def __len__(self) -> int:
        return len(self.decisions)

    def base_table(self) -> CostTable:
        """The cost table of the uncompressed model (shared: copy it before editing)."""
        if self._base is None:
            self._base = CostTable.from_graph(self.graph)
        return self._base

    def of_kind(self, *kinds: str) -> list[Decision]:
        return [d for d in self.decisions if d.kind in kinds]

    def identity_choices(self) -> dict[str, Any]:
        return {d.id: d.identity for d in self.decisions}

    def not_compressible(self) -> list[dict[str, Any]]:
        """Layers that compute or hold weights but that no decision covers: each with its op, its base
        costs and why (``{"layer", "op", "macs", "params", "reason"}``), in execution order.

        A decision covers its layers and what lies under them or under the module its id names (a dropped
        block's norms); a function between activations (attention, a matmul) is covered when a covered
        layer produces one of its operands (head pruning re-costs the attention of the heads it cuts).
        """
        covered = {layer for d in self.decisions for layer in d.layers}
        modules = self.graph.modules()
        covered |= {d.id.split(":", 1)[1] for d in self.decisions if d.id.split(":", 1)[1] in modules}
        table = self.base_table()
        is_module = {r.name: bool(r.name in self.graph.graph and self.graph.node(r.name).get("module_type"))
                     for r in table}

        def under(path: str) -> bool:
            return path in covered or any(path.startswith(c + ".") for c in covered if c)

        def fed_by_covered(row: LayerCost, depth: int = 0) -> bool:
            for src in row.inputs:
                if src not in table or depth > 16:
                    continue
                producer = table[src]
                if is_module[src] and under(producer.target):
                    return True
                if producer.op in _THROUGH and fed_by_covered(producer, depth + 1):
                    return True
            return False

        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for row in table:
            layer = row.target if is_module[row.name] else row.name
            if (row.macs <= 0 and row.params <= 0) or layer in seen:
                continue
            if under(layer) if is_module[row.name] else fed_by_covered(row):
                continue
            seen.add(layer)
            a = self.graph.node(row.name) if row.name in self.graph.graph else {}
            why = _NOT_COMPRESSIBLE.get(row.op, _NOT_COMPRESSIBLE[""])
            out.append({"layer": layer, "op": row.op, "macs": row.macs, "params": row.params,
                        "reason": why.format(type=a.get("module_type") or row.target, gates=row.gates)})
        return out

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "fingerprint": self.fingerprint, "input_shape": list(self.input_shape),
               "decisions": [d.to_json() for d in self.decisions]}
        rest = self.not_compressible()
        if rest:  # like options, only where there are some (the CNN zoo has none)
            out["not_compressible"] = rest
        if self.options:
            out["options"] = dict(self.options)
        return out


# Ops an operand passes through on its way from a layer to attention or a matmul.
_THROUGH = ("reshape", "getitem", "split", "dropout", "mul", "add", "act", "softmax", "norm")
# Why a layer with MACs or weights has no decision, and how hwmodels costs it, per op kind ("": any other).
_NOT_COMPRESSIBLE = {
    "rnn": "no decisions for {type} layers; costed as GEMMs step by step: per layer and direction one over "
           "the input sequence, then one per step on the hidden state ({gates} gate blocks)",
    "attention": "no decisions for attention; costed as its Q.K^T and .V GEMMs and the scores' memory traffic",
    "mha": "no decisions for {type} layers; costed as its projection GEMMs and attention (Q.K^T, .V and the "
           "scores' memory traffic)",
    "matmul": "no decisions for a matmul between two activations; costed as a GEMM",
    "norm": "no decisions for {type} layers; costed as a memory-bound pass",
    "embedding": "no decisions for {type} layers; costed as a gather of the rows it reads",
    "bn": "no conv or linear layer that this {type} can be folded into; costed as a memory-bound pass",
    "act": "no decisions for activations with parameters ({type}); costed as an elementwise pass",
    "other": "{type} is not a layer type autocompress knows: its parameters are counted, its MACs are not "
             "(costed as memory traffic only)",
    "": "no decision covers this {type} layer; costed as it is",
}


def check_options(options: Mapping[str, Any]) -> None:
    """Raise PolicyError for an unknown space option or a bad value, naming the valid ones."""
    valid = {"prune_round_to": "a whole number >= 1", "prune_importance": " or ".join(IMPORTANCE)}
    for key, value in options.items():
        if key not in valid:
            raise PolicyError(f"unknown space option {key!r}; valid: {', '.join(valid)}")
        ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if key == "prune_round_to" \
            else value in IMPORTANCE
        if not ok:
            raise PolicyError(f"space option {key}={value!r} is not valid; expected {valid[key]}")
