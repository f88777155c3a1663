"""``autocompress targets`` and ``autocompress calibrate``: thin adapters over ``autocompress.hwmodels``."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from autocompress.cli.app import app, console, guard


@app.command()
@guard
def targets(as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table")) -> None:
    """List hardware targets with their parameters."""
    from autocompress.hwmodels import get_target, target_names

    rows = [get_target(n).summary() for n in target_names()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="hardware targets")
    cells = []
    for r in rows:
        cal = {None: "published", False: "no (defaults)", True: "yes"}[r["calibrated"]]
        cells.append((r["name"], f"{r['peak_gmacs']['fp32']:g}/{r['peak_gmacs']['int8']:g}", f"{r['dram_gbs']:g}",
                      f"{r['kernel_overhead_us']:g}", str(r["threads"]), cal, r["description"]))
    headers = ("name", "fp32/int8 GMAC/s", "DRAM GB/s", "kernel us", "threads", "calibrated")
    for i, col in enumerate(headers):
        table.add_column(col, no_wrap=True, min_width=max([len(col)] + [len(c[i]) for c in cells]))
    table.add_column("description", no_wrap=True, overflow="ellipsis", max_width=60)
    for c in cells:
        table.add_row(*c)
    console.print(table)


@app.command()
@guard
def calibrate(
    target: str = typer.Option("local", "--target", help="target to calibrate: local, or a new name with --from-csv"),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime intra-op threads (local only)"),
    quick: bool = typer.Option(False, "--quick", help="fewer configurations, variants and runs (about 10 s)"),
    from_csv: Optional[str] = typer.Option(None, "--from-csv", help="fit from measured latencies in a CSV file instead of measuring here"),
    base: str = typer.Option("mobile", "--base", help="with --from-csv: the target whose peaks and energies are the starting point"),
    model: list[str] = typer.Option([], "--model", metavar="SPEC", help="also measure random compressed variants of this model (repeatable), "
                                    "so the fit sees the networks you will search; local only"),
    variants: int = typer.Option(12, "--variants", metavar="N", help="with --model: random variants per model"),
    as_json: bool = typer.Option(False, "--json", help="print the fitted target as JSON"),
) -> None:
    """Measure layer configurations (or read them from CSV) and fit a target's coefficients."""
    from autocompress.hwmodels.calibrate import calibrate_from_csv, calibrate_local

    if from_csv is not None:
        if model:
            from autocompress.errors import UserInputError

            raise UserInputError("--model measures variants here, on `local`; with --from-csv, add your model's "
                                 "measured variants to the CSV instead")
        fitted, path = calibrate_from_csv(from_csv, name=target, base=base)
    else:
        if target != "local":
            from autocompress.errors import UserInputError

            raise UserInputError(f"only 'local' can be measured here; for {target!r} measure on the device "
                                 "and pass --from-csv FILE (see docs/hwmodels.md)")
        with console.status("measuring layer configurations, small networks and compressed variants in ONNX Runtime"):
            fitted, path = calibrate_local(threads=threads, quick=quick, models=model, per_model=variants)
    if as_json:
        typer.echo(json.dumps(fitted.to_json(), indent=2))
        return
    fit = fitted.fit
    console.print(f"calibrated [bold]{fitted.name}[/bold] from {fit.get('samples', 0)} measurements: "
                  f"median |error| {100 * fit.get('median_abs_err', 0):.1f} %, "
                  f"within ±10 %: {100 * fit.get('within_10', 0):.0f} %"
                  + (f"; last-level cache {fitted.llc_bytes / 2**20:g} MiB" if fitted.llc_bytes else "")
                  + f"; saved {path}")
