"""Which layers are fragile: the sensitivity table as a report section and a heatmap picture."""

from __future__ import annotations

import math
from pathlib import Path

from autocompress.search.sensitivity import SensitivityTable
from autocompress.space.space import SearchSpace

KIND_ORDER = ("prune", "heads", "rank", "wbits", "abits", "merge", "branch", "drop")
TOP_LAYERS = 30  # the report lists the most sensitive layers; the picture shows them all


def _rows(table: SensitivityTable, space: SearchSpace) -> tuple[list[str], list[str], dict[str, dict[str, float]]]:
    by_layer = table.by_layer(space)
    kinds = [k for k in KIND_ORDER if any(k in v for v in by_layer.values())]
    layers = sorted(by_layer, key=lambda l: -max(by_layer[l].values()))
    return layers, kinds, by_layer


def sensitivity_lines(table: SensitivityTable, space: SearchSpace) -> list[str]:
    """A markdown section: per layer and kind, the divergence its most compressing choice causes alone."""
    layers, kinds, by_layer = _rows(table, space)
    measure = "KL divergence to the original's outputs" if table.measure == "kl" else "relative squared error"
    lines = ["## Sensitivity per layer", "",
             f"Each choice applied alone to the original model, before fine-tuning ({measure} on {table.samples} "
             f"calibration samples, {table.seconds:.0f} s). Shown: the most compressing choice of each kind; "
             "higher is more fragile. The allocation spends the budget where this is lowest. "
             "See sensitivity.png for every layer.", "",
             "| layer | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for layer in layers[:TOP_LAYERS]:
        cells = [f"{by_layer[layer][k]:.4f}" if k in by_layer[layer] else "" for k in kinds]
        lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
    if len(layers) > TOP_LAYERS:
        lines.append(f"| ({len(layers) - TOP_LAYERS} more, less sensitive) |" + " |" * len(kinds))
    return lines


def plot_sensitivity(table: SensitivityTable, space: SearchSpace, path: Path) -> None:
    """A heatmap, layers (in model order) by kind, log-scaled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    _, kinds, by_layer = _rows(table, space)
    order = [d.layers[0] for d in space.decisions]
    layers = [l for l in dict.fromkeys(order) if l in by_layer]
    grid = np.full((len(layers), len(kinds)), np.nan)
    for i, layer in enumerate(layers):
        for j, k in enumerate(kinds):
            if k in by_layer[layer]:
                grid[i, j] = math.log10(max(by_layer[layer][k], 1e-6))
    fig, ax = plt.subplots(figsize=(1.2 * len(kinds) + 3, 0.22 * len(layers) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=-6, vmax=max(0.0, float(np.nanmax(grid)) if grid.size else 0))
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), layers, fontsize=7)
    fig.colorbar(im, ax=ax, label="log10 divergence (most compressing choice, alone)")
    ax.set_title("Sensitivity per layer (higher is more fragile)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
