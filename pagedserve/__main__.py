"""The ``pagedserve`` command (also ``python -m pagedserve``).

The CLI's own imports (typer, rich) take a few tenths of a second; a Ctrl-C in that window would otherwise print a
KeyboardInterrupt traceback before click, which handles Ctrl-C for every command, is even loaded.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from pagedserve.service.cli import app
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's status for "ended by SIGINT"
    app()


if __name__ == "__main__":
    main()
