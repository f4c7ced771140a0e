"""`choreo schemas export [--check]`: the JSON Schema and AsyncAPI files in `schemas/`."""

from __future__ import annotations

import argparse
import sys

from services.common.contract_export import stale_files, write_contract_files
from services.common.settings import ChoreoSettings


def add_schemas_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("schemas", help="generate the published contract files")
    actions = parser.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="write JSON Schema and AsyncAPI into schemas/")
    export.add_argument("--check", action="store_true", help="fail if the files are not current; write nothing")
    export.set_defaults(handler=_export)


def _export(args: argparse.Namespace, settings: ChoreoSettings) -> int:
    if args.check:
        stale = stale_files()
        for path in stale:
            sys.stderr.write(f"stale: {path}\n")
        if stale:
            sys.stderr.write("run `choreo schemas export` and commit the result\n")
        return 1 if stale else 0
    for path in write_contract_files():
        sys.stdout.write(f"wrote {path}\n")
    return 0
