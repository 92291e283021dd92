"""The ``pagedserve`` command (also ``python -m pagedserve``).

The CLI's own imports (typer, rich) take a few tenths of a second; a Ctrl-C in that window would otherwise print a
KeyboardInterrupt traceback before click, which handles Ctrl-C for every command, is even loaded.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    # A standard stream closed by the caller (`<&-`, `>&-`, a daemon manager) is None in Python: read as empty, and
    # written to nowhere, as the caller asked, rather than failing on None in the middle of a command.
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 - open for the process's life
    try:
        from pagedserve.service.cli import app
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's status for "ended by SIGINT"
    app()


if __name__ == "__main__":
    main()
