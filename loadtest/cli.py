"""What ``loadtest.report`` and ``loadtest.sweep`` say when their user can fix what went wrong: one line on stderr,
as the ``pagedserve`` commands do, and exit status 2 for a usage mistake (argparse would print its usage block
first, and a bad value found later would end in a traceback)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        usage_error(f"{message} (`{self.prog} --help` lists the options)")


def usage_error(message: str) -> NoReturn:
    fail(message, 2)


def fail(message: str, code: int = 1) -> NoReturn:
    from pagedserve.service.redaction import redact  # a message may quote a Redis URL and its password

    print(f"error: {redact(message)}", file=sys.stderr)
    raise SystemExit(code)
