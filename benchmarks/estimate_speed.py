"""How long the analytic cost model takes per candidate policy.

Draws seeded random policies over every decision of a model's search space
(default: torchvision ResNet-50) and times, per policy, everything a search
trial needs before it builds anything: the cost table under the policy
(``estimate``), its totals (MACs, params, weight bytes, peak activation
memory) and the predicted latency and energy on a target (``hwmodels.predict``).

    python benchmarks/estimate_speed.py [--model torchvision:resnet50] [--policies 200] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import time

from autocompress.api import open_model
from autocompress.compress import estimate
from autocompress.hwmodels import predict
from autocompress.space.policy import Policy


def random_policies(space, count: int, seed: int = 0, p_change: float = 0.5) -> list[Policy]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        picks = {d.id: rng.choice(d.choices) for d in space.decisions if rng.random() < p_change}
        out.append(Policy(space.model, space.fingerprint, picks, space.options))
    return out


def all_costs(space, policy: Policy, target: str) -> dict:
    table = estimate(space, policy)
    totals = table.totals()
    pred = predict(table, target)
    return {**totals, "latency_ms": pred.latency_ms, "energy_mj": pred.energy_mj}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="torchvision:resnet50")
    ap.add_argument("--policies", type=int, default=200)
    ap.add_argument("--target", default="mobile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print the cProfile top functions")
    args = ap.parse_args()

    t0 = time.perf_counter()
    ws = open_model(args.model)
    ws.space.base_table()  # built once per search
    setup = time.perf_counter() - t0
    policies = random_policies(ws.space, args.policies, args.seed)
    for p in policies[:5]:  # warm-up
        all_costs(ws.space, p, args.target)
    times, cpu = [], []
    prof = cProfile.Profile() if args.profile else None
    for p in policies:
        if prof:
            prof.enable()
        t, c = time.perf_counter(), time.process_time()
        all_costs(ws.space, p, args.target)
        times.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
        if prof:
            prof.disable()
    kinds = {}
    for d in ws.space.decisions:
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    times.sort()
    cpu.sort()
    print(f"model {args.model}: {len(ws.space)} decisions ({', '.join(f'{k} {v}' for k, v in kinds.items())}), "
          f"{len(ws.space.base_table())} table rows; load+trace+space {setup:.1f} s")
    print(f"{len(times)} random policies, target {args.target}: median {statistics.median(times):.2f} ms, "
          f"p10 {times[len(times) // 10]:.2f} ms, p90 {times[9 * len(times) // 10]:.2f} ms per policy; "
          f"CPU time median {statistics.median(cpu):.2f} ms")
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
