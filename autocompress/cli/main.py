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
    _register()
    app(prog_name="autocompress")


if __name__ == "__main__":
    sys.exit(main())
