"""Numbers the cost model and the search produce on fixed inputs, pinned in tests/data/pinned.json.

``python -m tests.pinned`` rewrites the file from the current code; do that only for a change that is
meant to change predictions (and say so in its commit), never to make a refactor pass.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

PINNED = Path(__file__).parent / "data" / "pinned.json"
TARGETS = ("mobile", "rpi4", "x86-server", "gpu", "local")
POLICIES_PER_MODEL = 5


def random_choices(space: Any, rng: random.Random) -> dict[str, Any]:
    """Each decision takes a random non-identity choice with a probability drawn per policy (0.1-0.6).

    The same rule as ``calibrate.random_policy``, restated on purpose: the pinned policies must not move
    when the product's variant generator changes."""
    p = rng.uniform(0.1, 0.6)
    chosen = {}
    for d in space.decisions:
        others = [c for c in d.choices if c != d.identity]
        if others and rng.random() < p:
            chosen[d.id] = rng.choice(others)
    return chosen


def policy_numbers(space: Any, chosen: dict[str, Any]) -> dict[str, Any]:
    """Estimate totals and, per target, predicted latency, energy and parts (batch 1, and batch 4 on mobile)."""
    from autocompress.compress import estimate
    from autocompress.hwmodels import get_target, predict
    from autocompress.space.policy import Policy

    table = estimate(space, Policy(space.model, space.fingerprint, chosen))
    out: dict[str, Any] = {"policy": chosen, "totals": {k: float(v) for k, v in table.totals().items()}}
    for name in TARGETS:
        pred = predict(table, get_target(name))
        out[name] = {"latency_ms": pred.latency_ms, "energy_mj": pred.energy_mj, "parts": pred.parts,
                     "layers_ms": sum(l.latency_ms for l in pred.layers),
                     "fused": hashlib.sha1(repr(sorted((l.name, l.fused_into) for l in pred.layers
                                                       if l.fused_into)).encode()).hexdigest()[:16]}
    pred4 = predict(table, get_target("mobile"), batch=4)
    out["mobile_b4"] = {"latency_ms": pred4.latency_ms, "energy_mj": pred4.energy_mj}
    return out


def model_numbers(spec: str, shape: tuple[int, ...] | None) -> list[dict[str, Any]]:
    from tests.conftest import workspace

    space = workspace(spec, shape).space
    rng = random.Random(f"pinned-{spec}")
    policies = [{}] + [random_choices(space, rng) for _ in range(POLICIES_PER_MODEL)]
    return [policy_numbers(space, p) for p in policies]


def fit_numbers() -> dict[str, Any]:
    """A fit of ``mobile`` to synthetic measurements (each prediction times a fixed factor per sample)."""
    from autocompress.hwmodels import get_target, predict
    from autocompress.hwmodels.calibrate import Sample, fit_target
    from autocompress.compress import estimate
    from autocompress.space.policy import Policy
    from tests.conftest import workspace

    base = get_target("mobile")
    samples = []
    rng = random.Random("pinned-fit")
    for spec, shape in (("builtin:digits-net", None), ("torchvision:mobilenet_v2", (1, 3, 64, 64))):
        space = workspace(spec, shape).space
        for i in range(6):
            table = estimate(space, Policy(space.model, space.fingerprint, random_choices(space, rng)))
            ms = predict(table, base).latency_ms * rng.uniform(0.6, 1.6)
            samples.append(Sample(f"{spec} {i}", table, ms))
    fitted = fit_target(base, samples, "pinned-fit")
    data = fitted.to_json()
    return {k: data[k] for k in ("efficiency", "int8_class_efficiency", "dram_gbs", "cache_gbs", "kernel_overhead_us",
                                 "elementwise_overhead_us", "call_overhead_us", "gemm_k0", "gemm_s0", "out_ns")
            if k in data}


def search_numbers(folder: Path, space: str = "tradeoff") -> dict[str, Any]:
    """A seeded 6-trial search of the tiny model in tests/test_search.py: every trial's state and policy, and the pick."""
    from autocompress.search.core import SearchConfig
    from autocompress.search.run import run_search
    from tests.test_search import TINY

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.py").write_text(TINY)
    config = SearchConfig(target="mobile", budget="0.8x", trials=6, seed=3, low_epochs=0.5, full_epochs=0.5,
                          finalists=2, space=space)
    result = run_search(config, model=f"{folder}/tiny.py:model", data=f"{folder}/tiny.py:data", out=folder / "out",
                        measure=False)
    rows = (folder / "out" / "trials.csv").read_text().splitlines()
    import csv

    trials = [{"state": r["state"], "policy": json.loads(r["policy"])} for r in csv.DictReader(rows)]
    policy = json.loads((folder / "out" / "policy.json").read_text())["decisions"]
    return {"trials": trials, "best_policy": policy, "best_trial": result["best_trial"],
            "best_latency_ms": result["best"]["latency_ms"]}


def compute(folder: Path) -> dict[str, Any]:
    from tests.conftest import ZOO, small_shape

    return {"models": {spec: model_numbers(spec, small_shape(spec)) for spec in ZOO}, "fit": fit_numbers(),
            "search": search_numbers(folder / "tradeoff"), "search_layers": search_numbers(folder / "layers", "layers")}


if __name__ == "__main__":
    import os
    import tempfile

    import torch

    from tests.conftest import seed_pretrained_digits

    cache = Path(tempfile.mkdtemp(prefix="pinned-cache-"))
    os.environ["AUTOCOMPRESS_CACHE"] = str(cache)  # uncalibrated `local`, the tests' digits-net
    seed_pretrained_digits(cache)
    torch.set_num_threads(1)
    PINNED.write_text(json.dumps(compute(cache / "search"), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINNED}")
