"""Latency measured on a device: a user's command that times an ONNX file, and repeated timings with their spread.

``--measure-cmd 'CMD {onnx}'`` puts a real device in the loop: ``{onnx}`` is replaced by the
shell-quoted path of an ONNX file, the command runs in a shell (so ``adb push {onnx} ... && adb shell
...`` or ``scp {onnx} pi: && ssh pi ...`` work) and its last non-empty line of output is the latency
in milliseconds. ``timer_for`` picks how a target is timed: its command, else ONNX Runtime here for
``local``, else not at all.
"""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from autocompress.errors import AutocompressError, UserInputError
from autocompress.hwmodels.target import Target

PLACEHOLDER = "{onnx}"
DEFAULT_TIMEOUT_S = 120.0
_NUMBER = re.compile(r"^\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*(?:ms)?\s*$", re.IGNORECASE)

Timer = Callable[[Path], float]


class MeasureCommandError(UserInputError):
    """A ``--measure-cmd`` that failed, hung or printed no latency (the message names the file and why)."""


@dataclass(frozen=True)
class MeasureCommand:
    """A shell command template that prints the latency (ms) of the ONNX file put at ``{onnx}``."""

    template: str
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if PLACEHOLDER not in self.template:
            raise UserInputError(f"--measure-cmd {self.template!r} has no {PLACEHOLDER}: write where the ONNX "
                                 f"file's path goes, e.g. 'python time_it.py {PLACEHOLDER}'")
        try:
            shlex.split(self.template)
        except ValueError as exc:  # an unclosed quote would otherwise fail on the first file, minutes later
            raise UserInputError(f"--measure-cmd {self.template!r} is not a valid shell command: {exc}") from None
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise UserInputError(f"--measure-timeout must be a positive number of seconds, got {self.timeout_s}")

    def command_line(self, path: str | os.PathLike) -> str:
        """The shell line for ``path``; the path is quoted here, so write ``{onnx}`` unquoted."""
        return self.template.replace(PLACEHOLDER, shlex.quote(str(path)))

    def __call__(self, path: str | os.PathLike) -> float:
        """Run the command for ``path`` and return the latency it printed (ms)."""
        name = Path(path).name
        # A session of its own, so a timeout kills the command's children too (an ssh or adb left behind
        # would keep the pipes open and the wait hanging).
        proc = subprocess.Popen(self.command_line(path), shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise MeasureCommandError(f"--measure-cmd did not finish within {self.timeout_s:g} s on {name} "
                                      "(raise --measure-timeout for a slow device)") from None
        if proc.returncode != 0:
            raise MeasureCommandError(f"--measure-cmd exited with status {proc.returncode} on {name}: "
                                      f"{_last_line(err) or _last_line(out) or 'no output'}")
        return parse_latency(out, name)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.communicate()


def _last_line(text: str | None) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1][:200] if lines else ""


def parse_latency(output: str, name: str = "the file") -> float:
    """The latency (ms) on the last non-empty line of a command's output: a positive number, "ms" optional."""
    last = _last_line(output)
    m = _NUMBER.match(last)
    value = float(m.group(1)) if m else math.nan
    if not (math.isfinite(value) and value > 0):
        shown = repr(last) if last else "nothing"
        raise MeasureCommandError(f"--measure-cmd printed {shown} for {name}; its last line must be the latency "
                                  "in ms, a positive number")
    return value


@dataclass(frozen=True)
class Timing:
    """Repeated timings of one file: the median and half their range (the measurement's own spread)."""

    latency_ms: float | None  # None: not measured (see ``error``)
    spread_ms: float = 0.0
    rounds: tuple[float, ...] = ()
    error: str = ""

    @classmethod
    def of(cls, values: Sequence[float]) -> "Timing":
        return cls(statistics.median(values), (max(values) - min(values)) / 2, tuple(values))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"latency_ms": self.latency_ms, "spread_ms": self.spread_ms, "rounds": list(self.rounds)}
        if self.error:
            out["error"] = self.error
        return out


def time_rounds(paths: Sequence[Path], timer: Timer, rounds: int = 3, seed: int = 0) -> list[Timing]:
    """Each file timed ``rounds`` times in interleaved passes (a new shuffled order each), so a slow
    stretch of the machine or device falls on all files alike. A file whose timing fails is not
    timed again; its Timing carries the reason."""
    values: list[list[float]] = [[] for _ in paths]
    errors = [""] * len(paths)
    rng = random.Random(seed)
    order = list(range(len(paths)))
    for _ in range(max(1, rounds)):
        rng.shuffle(order)
        for i in order:
            if errors[i]:
                continue
            try:
                values[i].append(float(timer(paths[i])))
            except AutocompressError as exc:
                errors[i] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return [Timing(None, error=e) if e else Timing.of(v) for v, e in zip(values, errors)]


def local_timer(threads: int = 1) -> Timer:
    """ONNX Runtime on this machine: the file's quiet latency as ``calibrate`` measures it (the lowest
    over 4 fresh sessions). One session alone is bimodal here: about 3 in 10 run 1.7x slower, which
    moved a median of 3 sessions, and a relative budget's limit with it, by up to 50 %."""
    from autocompress.hwmodels.measure import measure_files

    return lambda path: measure_files([Path(path)], threads=threads)[0]


@dataclass(frozen=True)
class DeviceTimer:
    """How a target's latency is measured, and how reports name it."""

    timer: Timer
    label: str


def timer_for(target: Target, measure_cmd: str = "", timeout_s: float | None = None) -> DeviceTimer | None:
    """``measure_cmd`` if given, else the target's own ``measure_cmd``, else ONNX Runtime here for
    ``local``; None for a target nothing here can time."""
    cmd = measure_cmd or target.measure_cmd
    if cmd:
        timeout = timeout_s if timeout_s is not None else (target.measure_timeout_s if not measure_cmd
                                                           else DEFAULT_TIMEOUT_S)
        return DeviceTimer(MeasureCommand(cmd, timeout), f"--measure-cmd {cmd!r}")
    if target.name == "local":
        return DeviceTimer(local_timer(target.threads), f"ONNX Runtime on this machine, {target.threads} thread(s)")
    return None
