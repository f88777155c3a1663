"""The typer app and the one table that maps library errors to exit codes.

Commands live in sibling modules (one typed function each) and only call the
library; ``guard`` turns a library exception into a one-line message.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from autocompress.errors import AutocompressError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="AutoML model compression: pruning, quantisation, low-rank and layer merging under a hardware budget.")


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own exits 1 (a defect, in our codes); ``guard`` ends a command whose reader has gone with 0
        self.quiet = True
        raise BrokenPipeError


# Piped or redirected output (CI logs, cluster jobs, nohup) keeps full-width tables.
console = _Console() if sys.stdout.isatty() else _Console(width=200, soft_wrap=True)
err_console = Console(stderr=True)
_SIGINT = threading.Event()  # set by Ctrl-C: whatever exception follows was caused by it

F = TypeVar("F", bound=Callable[..., Any])
INTERRUPTED = "interrupted; completed work is kept in the output folder, rerun the same command to resume"


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def debugging() -> bool:
    return "--debug" in sys.argv or bool(os.environ.get("AUTOCOMPRESS_DEBUG"))


def _debug_log() -> None:
    """When debugging, the library's debug log goes to stderr (with AUTOCOMPRESS_DEBUG set, what tracers and
    exporters print also passes through as they run, instead of into that log)."""
    if not debugging():
        return
    log = logging.getLogger("autocompress")
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.DEBUG)


def stdout_gone() -> None:
    """The reader of a piped stdout has gone (``| head``): what is left goes to /dev/null, so no later flush
    fails (Python's own at exit would print 'Exception ignored ... BrokenPipeError' and exit 120)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test runner's buffer): nothing will flush it
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _on_sigint(signum: int, frame: Any) -> None:
    _SIGINT.set()
    signal.default_int_handler(signum, frame)


def _watch_sigint() -> Callable[[], None]:
    """Remember a Ctrl-C for the command's duration: a KeyboardInterrupt raised inside an import or a C
    extension can surface as another exception (an ImportError 'initialization failed'), still an interruption.
    Returns what puts the previous handler back."""
    _SIGINT.clear()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:  # someone else's handler stays
        return lambda: None
    signal.signal(signal.SIGINT, _on_sigint)
    return lambda: signal.signal(signal.SIGINT, previous)


def guard(fn: F) -> F:
    """Run a command; map library errors to (one-line message, exit code)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _debug_log()
        restore = _watch_sigint()
        try:
            return _mapped(fn, args, kwargs)
        finally:
            restore()

    return wrapper  # type: ignore[return-value]


def _mapped(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        return fn(*args, **kwargs)
    except typer.Exit:
        raise
    except BaseException as exc:
        if _SIGINT.is_set() or isinstance(exc, KeyboardInterrupt):
            fail(INTERRUPTED, 130)
        if isinstance(exc, UserInputError):
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        if isinstance(exc, AutocompressError):
            fail(str(exc).splitlines()[0], exc.exit_code)
        if isinstance(exc, PermissionError):  # the environment, not the input
            fail(f"permission denied: {exc.filename or exc}; check the folder's permissions", 3)
        if isinstance(exc, BrokenPipeError):  # output piped into e.g. `head`
            stdout_gone()
            raise typer.Exit(0)
        if not isinstance(exc, Exception) or debugging():  # SystemExit and the like; a traceback when debugging
            raise
        # An internal failure: still one line.
        fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
             "(set AUTOCOMPRESS_DEBUG=1 for the traceback)", 1)
