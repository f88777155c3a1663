"""The searched network's own latency scale, measured when a search starts on a target timed here.

A fit of the designed set alone leaves each 224x224 network a bias of its own (MobileNetV2 12-14 % under on
two machine states, BENCHMARKS.md "Runs Z5 and Z6"); ``calibrate --model`` measures it from the network's
own variants. A search on ``local`` (or on a device target through its measure command) does the same with
a few variants when the target has no scale for the network yet, and saves it with the target, so the next
search of that network reads it back.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autocompress.hwmodels.calibrate._designed import model_variants, time_built
from autocompress.hwmodels.calibrate._fit import NETWORK_SCALE_MIN_SAMPLES, network_scales
from autocompress.hwmodels.targets import get_target, target_path

SCALE_VARIANTS = max(4, NETWORK_SCALE_MIN_SAMPLES)  # offline on seven timings: 4 variants 82-92 %, 16 85-93 %
SKIPPED_KINDS = ("rank",)  # a low-rank variant costs seconds of SVD to build (the first-use plan skips them too)


def scale_kinds(space: Any) -> list[str]:
    """The decision kinds the scale's variants draw from: all of the space's but ``SKIPPED_KINDS``."""
    return sorted({d.kind for d in space.decisions} - set(SKIPPED_KINDS))


@dataclass(frozen=True)
class NetworkScale:
    """A network's latency scale on a target: measured now, or read from the target file."""

    network: str  # the uncompressed architecture's fingerprint (``CostTable.network``)
    scale: float  # measured / predicted latency, median over its variants
    measured_now: bool


def ensure_network_scale(name: str, model: Any, space: Any, label: str, *, variants: int = SCALE_VARIANTS,
                         measure: Callable[[Path], float] | None = None,
                         progress: Callable[[str], None] | None = None) -> NetworkScale | None:
    """The scale of ``space``'s network on target ``name``, timing ``variants`` random variants of ``model``
    where the target has none yet (then saved with it); None where they could not be measured."""
    target = get_target(name)
    network = space.graph.fingerprint
    if network in target.network_scale:
        return NetworkScale(network, float(target.network_scale[network]), False)
    say = progress or (lambda text: None)
    say(f"timing {variants} variants of {label} on `{name}` (once per network): its own latency scale")
    with tempfile.TemporaryDirectory(prefix="autocompress-scale-") as tmp:
        built = model_variants(model, space, label, variants, Path(tmp), seed=1, kinds=scale_kinds(space))
        samples = time_built(built, threads=target.threads, rounds=2, profile=False, measure=measure)
    scale = network_scales(target, samples).get(network)
    if scale is None:
        return None
    by_model = {**target.fit.get("network_scale_by_model", {}), label: scale}
    target.with_(network_scale={**target.network_scale, network: scale},
                 fit={**target.fit, "network_scale_by_model": by_model},
                 sources={**target.sources, "network_scale": "measured / predicted latency, median over each "
                                                             "network's own variants"}).save(target_path(name))
    say(f"`{name}` predictions for {label} scaled by {scale:.3f} (saved with the target)")
    return NetworkScale(network, scale, True)
