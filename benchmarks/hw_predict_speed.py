"""How long one ``hwmodels.predict`` takes on a resnet50-sized cost table (the search calls it thousands of times).

    .venv/bin/python benchmarks/hw_predict_speed.py
"""

from __future__ import annotations

import time

from autocompress.hwmodels import TARGETS, predict
from autocompress.models import load_model
from autocompress.space.costs import CostTable
from autocompress.space.graph import trace


def main() -> None:
    for spec in ("torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:googlenet"):
        lm = load_model(spec)
        table = CostTable.from_graph(trace(lm.model, lm.input_shape))
        for name in TARGETS.names():
            predict(table, name)
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                predict(table, name)
            ms = (time.perf_counter() - t0) / n * 1e3
            print(f"{spec:28s} {len(table):4d} rows  {name:10s} {ms:6.3f} ms/predict")


if __name__ == "__main__":
    main()
