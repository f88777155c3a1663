"""``local`` is ready on first use: a command that will predict on an uncalibrated ``local`` calibrates it
first (the ``first-use`` plan, under a minute on two cores) or refuses; it never predicts silently
with the generic defaults, which are several times off on most machines.

``get_target`` stays a plain lookup (the defaults are data the tests and pinned numbers read);
commands resolve a user's target through :func:`ready_target`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

from autocompress.errors import EnvironmentProblem, UserInputError
from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import get_target, target_dir, target_path

# "calibrate" (default): calibrate on first use; "refuse": stop with how to calibrate (CI, shared caches).
FIRST_USE_ENV = "AUTOCOMPRESS_LOCAL_FIRST_USE"
FIRST_USE_PLAN = "first-use"
HOW = ("run `autocompress calibrate --target local` once (--quick: about a minute; the full fit takes "
       "several minutes and is more accurate)")


class LocalNotCalibrated(EnvironmentProblem):
    """``local`` has no calibration on this machine and one cannot be made now (exit 3)."""


def needs_calibration(name: str | Target) -> bool:
    """Whether ``name`` is ``local`` without a calibrated file in the cache."""
    return isinstance(name, str) and name == "local" and not target_path("local").is_file()


def first_use_mode() -> str:
    mode = os.environ.get(FIRST_USE_ENV, "calibrate").strip().lower() or "calibrate"
    if mode not in ("calibrate", "refuse"):
        raise UserInputError(f"{FIRST_USE_ENV}={mode!r}: use 'calibrate' or 'refuse'")
    return mode


def ready_target(name: str | Target, progress: Callable[[str], None] | None = None) -> Target:
    """The target ``name`` as a command should use it: an uncalibrated ``local`` is calibrated first
    (``progress`` hears each stage) or refused with :class:`LocalNotCalibrated`."""
    if not needs_calibration(name):
        return get_target(name)
    if first_use_mode() == "refuse":
        raise LocalNotCalibrated(f"target 'local' is not calibrated on this machine ({FIRST_USE_ENV}=refuse "
                                 f"turns off calibrating on first use); {HOW}")
    if importlib.util.find_spec("onnxruntime") is None:
        raise LocalNotCalibrated(f"target 'local' is not calibrated and onnxruntime is not installed to measure "
                                 f"it: pip install onnxruntime, then {HOW}")
    folder = target_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        writable = False
    if not writable:
        raise LocalNotCalibrated(f"target 'local' is not calibrated and its calibration cannot be saved in "
                                 f"{str(folder)!r}: set AUTOCOMPRESS_CACHE to a writable folder, then {HOW}")
    from autocompress.hwmodels.calibrate import calibrate_local

    say = progress or (lambda text: None)
    say("calibrating `local` on first use: timing layers and small networks in ONNX Runtime (under a minute; "
        "`autocompress calibrate --target local` runs the full fit)")
    try:
        fitted, path = calibrate_local(plan=FIRST_USE_PLAN, progress=lambda text: say(f"calibrating `local`: {text}"))
    except UserInputError:
        raise
    except Exception as exc:  # the machine could not measure: say so and how to do it by hand
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LocalNotCalibrated(f"calibrating 'local' on first use failed ({reason}); {HOW}") from exc
    say(f"`local` calibrated: {held_out_line(fitted)}; saved {path}")
    return fitted


def held_out_line(t: Target) -> str:
    """How well a calibrated target predicted its held-out variants, in words."""
    held = t.fit.get("held_out") or {}
    n = int(held.get("samples", 0) or 0)
    if not n:
        return "no held-out check"
    within = round(float(held.get("within_10", 0.0)) * n)
    return (f"{within} of {n} held-out variants within ±10 % (median |error| "
            f"{100 * float(held.get('median_abs_err', 0.0)):.1f} %)")


__all__ = ["FIRST_USE_ENV", "FIRST_USE_PLAN", "HOW", "LocalNotCalibrated", "held_out_line", "needs_calibration",
           "ready_target"]
