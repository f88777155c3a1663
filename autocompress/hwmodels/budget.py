"""Budget strings: ``5ms``, ``800us``, ``0.005s``, ``2mJ``, ``4MB``, ``4MiB``, ``0.5x`` and comma-separated mixes."""

from __future__ import annotations

import math

import re
from dataclasses import dataclass, replace
from typing import Any

from autocompress.errors import BudgetError

ACCEPTED = "latency 5ms / 5 ms / 800us / 0.005s, energy 2mJ, size 4MB / 4MiB / 512KB, relative 0.5x"

_UNITS: dict[str, tuple[str, float]] = {
    "s": ("latency_ms", 1e3), "ms": ("latency_ms", 1.0), "us": ("latency_ms", 1e-3), "µs": ("latency_ms", 1e-3),
    "j": ("energy_mj", 1e3), "mj": ("energy_mj", 1.0), "uj": ("energy_mj", 1e-3), "µj": ("energy_mj", 1e-3),
    "b": ("size_bytes", 1), "kb": ("size_bytes", 1e3), "mb": ("size_bytes", 1e6), "gb": ("size_bytes", 1e9),
    "kib": ("size_bytes", 1 << 10), "mib": ("size_bytes", 1 << 20), "gib": ("size_bytes", 1 << 30),
    "x": ("relative", 1.0),
}
_PART = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]+)\s*$")


@dataclass(frozen=True)
class Budget:
    """Limits a model must meet; a limit left ``None`` is not constrained."""

    latency_ms: float | None = None
    energy_mj: float | None = None
    size_bytes: int | None = None
    relative: float | None = None  # fraction of the baseline's latency on the target

    def resolved(self, baseline_latency_ms: float) -> "Budget":
        """Turn ``relative`` into a latency limit (the tighter one wins if both are set)."""
        if self.relative is None:
            return self
        rel = self.relative * baseline_latency_ms
        lat = rel if self.latency_ms is None else min(self.latency_ms, rel)
        return replace(self, latency_ms=lat, relative=None)

    def with_latency_scale(self, scale: float) -> "Budget":
        """The budget with its latency limit times ``scale`` (below 1: tighter, as a measured repair asks)."""
        if self.relative is not None:
            raise BudgetError(f"budget {self} is relative; call resolved(baseline_latency_ms) first")
        if scale == 1.0 or self.latency_ms is None:
            return self
        return replace(self, latency_ms=self.latency_ms * scale)

    def violations(self, latency_ms: float | None = None, energy_mj: float | None = None,
                   size_bytes: float | None = None) -> dict[str, float]:
        """Relative excess per violated limit (0.2 = 20 % over); empty when every limit is met."""
        if self.relative is not None:
            raise BudgetError(f"budget {self} is relative; call resolved(baseline_latency_ms) first")
        out: dict[str, float] = {}
        for key, limit, value in (("latency_ms", self.latency_ms, latency_ms),
                                  ("energy_mj", self.energy_mj, energy_mj),
                                  ("size_bytes", self.size_bytes, size_bytes)):
            if limit is not None and value is not None and value > limit:
                out[key] = (value - limit) / limit
        return out

    def is_met(self, latency_ms: float | None = None, energy_mj: float | None = None,
               size_bytes: float | None = None) -> bool:
        return not self.violations(latency_ms, energy_mj, size_bytes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.latency_ms is not None:
            out["latency_ms"] = self.latency_ms
        if self.energy_mj is not None:
            out["energy_mj"] = self.energy_mj
        if self.size_bytes is not None:
            out["size_bytes"] = self.size_bytes
        return out

    def __str__(self) -> str:
        parts = []
        if self.latency_ms is not None:
            parts.append(f"{self.latency_ms:g}ms")
        if self.energy_mj is not None:
            parts.append(f"{self.energy_mj:g}mJ")
        if self.size_bytes is not None:
            parts.append(f"{self.size_bytes}B")
        if self.relative is not None:
            parts.append(f"{self.relative:g}x")
        return ",".join(parts)


def _bad(text: str, part: str, why: str) -> BudgetError:
    return BudgetError(f"bad budget {text!r}: {part.strip()!r} {why}; accepted: {ACCEPTED}, comma-separated")


def parse_budget(text: str) -> Budget:
    """Parse a budget string; raise BudgetError (one line) naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise BudgetError(f"empty budget; accepted: {ACCEPTED}, comma-separated")
    values: dict[str, float] = {}
    for part in text.split(","):
        m = _PART.match(part)
        if not m:
            raise _bad(text, part, "is not a number followed by a unit")
        number, unit = float(m.group(1)), m.group(2)
        entry = _UNITS.get(unit.lower())
        if entry is None:
            raise _bad(text, part, f"has unknown unit {unit!r}")
        field_name, scale = entry
        if number <= 0:
            raise _bad(text, part, "must be positive")
        if not math.isfinite(number * scale):  # 1e400ms parses as inf
            raise _bad(text, part, "is too large to be a limit")
        if field_name in values:
            raise _bad(text, part, "repeats a limit already given")
        values[field_name] = number * scale
    size = values.get("size_bytes")
    return Budget(latency_ms=values.get("latency_ms"), energy_mj=values.get("energy_mj"),
                  size_bytes=int(round(size)) if size is not None else None, relative=values.get("relative"))
