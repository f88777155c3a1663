"""Policies: frozen, versioned, JSON-serialisable maps from decision ids to choices."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from autocompress.errors import PolicyError
from autocompress.space.space import SearchSpace

FORMAT = "autocompress.policy/1"
MAX_BYTES = 1 << 20  # a policy names at most a few thousand decisions; anything larger is not one
CHOICE_TOLERANCE = 1e-6  # a value this close to a choice is that choice (hand-edited or printed floats)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=CHOICE_TOLERANCE)
    return a == b


@dataclass(frozen=True)
class Policy:
    """Decision id -> choice. Decisions not listed keep their identity."""

    model: str
    fingerprint: str
    decisions: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decisions", MappingProxyType(dict(self.decisions)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def choice(self, decision_id: str, default: Any) -> Any:
        return self.decisions.get(decision_id, default)

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "model": self.model, "fingerprint": self.fingerprint,
               "decisions": dict(self.decisions)}
        if self.options:
            out["options"] = dict(self.options)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash never leaves a half-written policy behind."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, data: Any, source: str = "policy") -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise PolicyError(f"{source}: format {fmt!r} is not {FORMAT!r}; is this an autocompress policy file?")
        decisions = data.get("decisions", {})
        if not isinstance(decisions, dict):
            raise PolicyError(f"{source}: 'decisions' must be an object of decision id -> choice")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise PolicyError(f"{source}: 'options' must be an object")
        return cls(str(data.get("model", "")), str(data.get("fingerprint", "")), decisions, options)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        try:
            size = Path(path).stat().st_size
            if size > MAX_BYTES:
                raise PolicyError(f"policy file {str(path)!r} is {size:,} bytes; a policy is at most {MAX_BYTES:,} "
                                  "bytes: is this the right file?")
            text = Path(path).read_text()
        except FileNotFoundError:
            raise PolicyError(f"policy file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read policy file {str(path)!r}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy file {str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except RecursionError:
            raise PolicyError(f"policy file {str(path)!r} is nested too deeply to be a policy") from None
        return cls.from_json(data, source=f"policy file {str(path)!r}")

    @classmethod
    def identity(cls, space: SearchSpace) -> "Policy":
        return cls(space.model, space.fingerprint, {}, space.options)

    def validate(self, space: SearchSpace, check_fingerprint: bool = True) -> "Policy":
        """Raise PolicyError naming every unknown id, out-of-domain value or fingerprint mismatch; else the
        policy with each value replaced by the space's choice it stands for (within ``CHOICE_TOLERANCE``)."""
        problems = []
        if check_fingerprint and self.fingerprint and self.fingerprint != space.fingerprint:
            problems.append(
                f"fingerprint {self.fingerprint} (model {self.model or '?'}) does not match "
                f"{space.fingerprint} (model {space.model}); the policy was made for another architecture"
            )
        if dict(self.options) != dict(space.options):
            problems.append(f"options {dict(self.options)} differ from the space's {dict(space.options)}; "
                            "build the space with the policy's options")
        unknown = [k for k in self.decisions if k not in space]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            problems.append(f"unknown decision ids {', '.join(map(repr, unknown[:3]))}{more}")
        for k, v in self.decisions.items():
            if k in space and (isinstance(v, bool) or not any(_same(v, c) for c in space[k].choices)):
                problems.append(f"{k}={v!r} is not one of {list(space[k].choices)}")
        if problems:
            raise PolicyError("policy does not fit the model: " + "; ".join(problems[:4]))
        exact = {k: next(c for c in space[k].choices if _same(v, c)) for k, v in self.decisions.items()}
        if all(type(exact[k]) is type(v) and exact[k] == v for k, v in self.decisions.items()):
            return self
        return Policy(self.model, self.fingerprint, exact, self.options)

    def resolved(self, space: SearchSpace) -> dict[str, Any]:
        """Every decision of ``space`` with this policy's choice or the identity."""
        out = {}
        for d in space.decisions:
            v = self.decisions.get(d.id, d.identity)
            out[d.id] = next((c for c in d.choices if _same(c, v)), v)
        return out

    def non_identity(self, space: SearchSpace) -> dict[str, Any]:
        return {k: v for k, v in self.resolved(space).items() if not _same(v, space[k].identity)}
