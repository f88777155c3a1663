"""Console entry point: ``autocompress``."""

from __future__ import annotations

import sys

from autocompress.cli.app import app


def _register() -> None:
    # Importing a command module registers its commands on ``app``.
    import importlib

    for name in ("model_cmds", "hw_cmds", "search_cmds"):
        try:
            importlib.import_module(f"autocompress.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"autocompress.cli.{name}":
                raise


def main() -> None:
    from autocompress.cli.app import err_console

    _register()
    try:
        code = app(prog_name="autocompress", standalone_mode=False)
    except Exception as exc:  # click's own (typer vendors click, so match by shape, not by class)
        name = type(exc).__name__
        if name == "NoArgsIsHelpError":
            code = 0
        elif name == "Abort":
            code = 130
        elif hasattr(exc, "format_message") and getattr(exc, "exit_code", None) == 2:
            ctx = getattr(exc, "ctx", None)
            command = ctx.command_path if ctx is not None else "autocompress"
            message = " ".join(exc.format_message().split())
            err_console.print(f"error: {message} (see {command} --help)", markup=False, highlight=False,
                              soft_wrap=True)
            code = 2
        else:
            raise
    try:
        sys.stdout.flush()  # here, not at exit: a reader that has gone (`| head`) is not an error
    except BrokenPipeError:
        from autocompress.cli.app import stdout_gone

        stdout_gone()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
