"""``python -m pagedserve.service.schemas [DIR]``: write the wire protocol's JSON Schemas (default docs/schemas).

A module of its own, not ``-m pagedserve.service.protocol``: the package imports protocol first, so runpy would
run a second copy of it and warn."""

import sys

from .protocol import write_schemas

if __name__ == "__main__":
    for path in write_schemas(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas"):
        print(path)
