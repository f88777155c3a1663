"""Latencies measured elsewhere (on the device), read from a CSV: one layer configuration per row."""

from __future__ import annotations

import csv
from pathlib import Path

from autocompress.errors import UserInputError
from autocompress.hwmodels.calibrate._fit import Sample
from autocompress.space.costs import CostTable, LayerCost

CSV_COLUMNS = ("op", "in_ch", "out_ch", "kernel", "stride", "groups", "hw", "latency_ms")


def layer_table(row: dict[str, str], where: str) -> tuple[CostTable, int]:
    """A one-kernel cost table for a CSV row: conv(+BN+ReLU), dwconv, linear, add or pool."""
    def num(key: str, default: int | None = None) -> int:
        v = (row.get(key) or "").strip()
        if not v:
            if default is None:
                raise UserInputError(f"{where}: column {key!r} is empty")
            return default
        try:
            return int(float(v))
        except ValueError:
            raise UserInputError(f"{where}: {key}={v!r} is not a number") from None

    op = (row.get("op") or "").strip()
    cin, cout = num("in_ch"), num("out_ch", num("in_ch"))
    k, s, g, hw = num("kernel", 1), num("stride", 1), num("groups", 1), num("hw", 1)
    wb, ab, batch = num("wbits", 32), num("abits", 32), num("batch", 1)
    ohw = -(-hw // s)
    inp = LayerCost("x", "input", out_numel=cin * hw * hw)
    if op in ("conv", "dwconv"):
        g = cin if op == "dwconv" else g
        conv = LayerCost("conv", "conv", inputs=["x"], out_numel=cout * ohw * ohw, in_ch=cin, out_ch=cout,
                         kernel=(k, k), stride=(s, s), groups=g, spatial=ohw * ohw, wbits=wb, abits=ab)
        bn = LayerCost("bn", "bn", inputs=["conv"], out_numel=conv.out_numel, in_ch=cout, out_ch=cout)
        act = LayerCost("act", "act", inputs=["bn"], out_numel=conv.out_numel)
        return CostTable([inp, conv, bn, act], inp.out_numel), batch
    if op == "linear":
        lin = LayerCost("fc", "linear", inputs=["x"], out_numel=cout, in_ch=cin, out_ch=cout, bias=True,
                        wbits=wb, abits=ab)
        return CostTable([LayerCost("x", "input", out_numel=cin), lin], cin), batch
    if op in ("add", "pool", "concat"):
        other = LayerCost("y", "input", out_numel=cin * hw * hw)
        out_numel = cin * ohw * ohw if op == "pool" else cin * hw * hw * (2 if op == "concat" else 1)
        ins = ["x"] if op == "pool" else ["x", "y"]
        return CostTable([inp, other, LayerCost("op", op, inputs=ins, out_numel=out_numel)], inp.out_numel), batch
    raise UserInputError(f"{where}: op {op!r} is not one of conv, dwconv, linear, add, pool, concat")


def read_csv_samples(path: str | Path) -> list[Sample]:
    """One sample per row of a CSV with ``CSV_COLUMNS`` (optional: wbits, abits, batch)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserInputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in ("op", "in_ch", "latency_ms") if c not in (reader.fieldnames or [])]
    if missing:
        raise UserInputError(f"{str(path)!r}: missing columns {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)} "
                             "(optional: wbits, abits, batch)")
    samples = []
    for i, row in enumerate(reader, start=2):
        where = f"{path}:{i}"
        table, batch = layer_table(row, where)
        try:
            ms = float(row["latency_ms"])
        except (TypeError, ValueError):
            raise UserInputError(f"{where}: latency_ms={row.get('latency_ms')!r} is not a number") from None
        if ms <= 0:
            raise UserInputError(f"{where}: latency_ms must be positive")
        samples.append(Sample(f"row {i}", table, ms, batch))
    return samples
