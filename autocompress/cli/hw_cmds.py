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
        cal = _calibrated(r)
        cells.append((r["name"], f"{r['peak_gmacs']['fp32']:g}/{r['peak_gmacs']['int8']:g}", f"{r['dram_gbs']:g}",
                      f"{r['kernel_overhead_us']:g}", str(r["threads"]), cal, r["description"]))
    headers = ("name", "fp32/int8 GMAC/s", "DRAM GB/s", "kernel us", "threads", "calibrated")
    for i, col in enumerate(headers):
        table.add_column(col, no_wrap=True, min_width=max([len(col)] + [len(c[i]) for c in cells]))
    table.add_column("description", no_wrap=True, overflow="ellipsis", max_width=60)
    for c in cells:
        table.add_row(*c)
    console.print(table)


def _calibrated(row: dict) -> str:
    """When and how well a target was fitted, for the table's ``calibrated`` column."""
    if row["calibrated"] is None:
        return "published"
    if not row["calibrated"]:
        from autocompress.hwmodels.first_use import first_use_mode

        return "no: calibrated on first use" if first_use_mode() == "calibrate" else "no: refused until calibrated"
    when = (row.get("fitted_at") or "yes").split(" ")[0]
    held = row.get("held_out") or {}
    if held.get("samples"):
        n = int(held["samples"])
        return f"{when}, held-out {round(float(held['within_10']) * n)}/{n} ±10%"
    return f"{when}, no held-out check"


@app.command()
@guard
def calibrate(
    target: str = typer.Option("local", "--target", help="target to calibrate: local, or a new name with --from-csv "
                                                          "or --measure-cmd"),
    threads: int = typer.Option(1, "--threads", help="ONNX Runtime intra-op threads (local only)"),
    quick: bool = typer.Option(False, "--quick", help="fewer configurations, variants and runs (about a minute)"),
    from_csv: Optional[str] = typer.Option(None, "--from-csv", help="fit from measured latencies in a CSV file instead of measuring here"),
    base: str = typer.Option("mobile", "--base", help="with --from-csv or --measure-cmd: the target whose peaks and "
                                                        "energies are the starting point"),
    measure_cmd: Optional[str] = typer.Option(None, "--measure-cmd", metavar="'CMD {onnx}'",
                                              help="time each designed file on a device: a shell command that prints "
                                                   "the latency in ms of the ONNX file put at {onnx}; the target keeps "
                                                   "it, so a search on it times its finalists there too"),
    measure_timeout: float = typer.Option(120.0, "--measure-timeout", metavar="SECONDS",
                                          help="with --measure-cmd: give up on a command that runs longer"),
    model: list[str] = typer.Option([], "--model", metavar="SPEC", help="also measure random compressed variants of this model (repeatable), "
                                    "so the fit sees the networks you will search; not with --from-csv"),
    variants: int = typer.Option(12, "--variants", metavar="N", help="with --model: random variants per model"),
    as_json: bool = typer.Option(False, "--json", help="print the fitted target as JSON"),
) -> None:
    """Measure layer configurations (here, or on a device with --measure-cmd; or read them from CSV) and
    fit a target's coefficients; a measured fit is checked on held-out variants."""
    from autocompress.errors import UserInputError
    from autocompress.hwmodels.calibrate import calibrate_device, calibrate_from_csv, calibrate_local
    from autocompress.hwmodels.device import MeasureCommand
    from autocompress.hwmodels.first_use import held_out_line

    if from_csv is not None:
        if model or measure_cmd:
            raise UserInputError("--from-csv reads latencies measured elsewhere; it takes neither --model nor "
                                 "--measure-cmd (add your model's measured variants to the CSV instead)")
        fitted, path = calibrate_from_csv(from_csv, name=target, base=base)
    else:
        command = MeasureCommand(measure_cmd, measure_timeout) if measure_cmd is not None else None
        if command is None and target != "local":
            raise UserInputError(f"only 'local' can be measured here; for {target!r} give --measure-cmd 'CMD {{onnx}}' "
                                 "that times a file on the device, or --from-csv FILE (see docs/hwmodels.md)")
        where = "through --measure-cmd" if command else "in ONNX Runtime"
        with console.status(f"measuring layer configurations, small networks and compressed variants {where}") as st:
            def progress(text: str) -> None:
                st.update(f"calibrating {target}: {text}")
            if command is not None:
                fitted, path = calibrate_device(target, command, base=base, quick=quick, models=model,
                                                per_model=variants, progress=progress)
            else:
                fitted, path = calibrate_local(threads=threads, quick=quick, models=model, per_model=variants,
                                               progress=progress)
    if as_json:
        typer.echo(json.dumps(fitted.to_json(), indent=2))
        return
    fit = fitted.fit
    console.print(f"calibrated [bold]{fitted.name}[/bold] from {fit.get('samples', 0)} measurements: "
                  f"median |error| {100 * fit.get('median_abs_err', 0):.1f} %, "
                  f"within ±10 %: {100 * fit.get('within_10', 0):.0f} %"
                  + (f"; last-level cache {fitted.llc_bytes / 2**20:g} MiB" if fitted.llc_bytes else "")
                  + (f"; {held_out_line(fitted)}" if "held_out" in fit else "")
                  + "".join(f"; {spec} predictions x {scale:.3f} (its own variants)"
                            for spec, scale in fit.get("network_scale_by_model", {}).items())
                  + f"; saved {path}")
