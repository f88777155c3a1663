"""The typer app and the one table that maps library errors to exit codes.

Commands live in sibling modules (one typed function each) and only call the
library; ``guard`` turns a library exception into a one-line message.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from autocompress.errors import AutocompressError, UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="AutoML model compression: pruning, quantisation, low-rank and layer merging under a hardware budget.")
# Piped or redirected output (CI logs, cluster jobs, nohup) keeps full-width tables.
console = Console() if sys.stdout.isatty() else Console(width=200, soft_wrap=True)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


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


def guard(fn: F) -> F:
    """Run a command; map library errors to (one-line message, exit code)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _debug_log()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UserInputError as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, exc.exit_code)
        except AutocompressError as exc:
            fail(str(exc).splitlines()[0], exc.exit_code)
        except PermissionError as exc:  # the environment, not the input
            fail(f"permission denied: {exc.filename or exc}; check the folder's permissions", 3)
        except BrokenPipeError:  # output piped into e.g. `head`
            sys.stderr.close()
            raise typer.Exit(0)
        except KeyboardInterrupt:
            fail("interrupted; completed work is kept in the output folder, rerun the same command to resume", 130)
        except Exception as exc:  # an internal failure: still one line unless debugging
            if debugging():
                raise
            fail(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                 "(set AUTOCOMPRESS_DEBUG=1 for the traceback)", 1)

    return wrapper  # type: ignore[return-value]
