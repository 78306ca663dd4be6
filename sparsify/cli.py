"""The `sparsify` command. Today: `sparsify inspect PATH` prints a routed checkpoint's plan.

Exit codes: 0 ok, 2 bad input (one line on stderr saying what and how to fix).
"""
from __future__ import annotations

import argparse
import sys

from sparsify.errors import SparsifyError


def inspect_checkpoint(path: str) -> str:
    from sparsify.checkpoint import read_metadata
    from sparsify.plan import RoutingPlan

    metadata = read_metadata(path)
    plan = RoutingPlan.from_dict(metadata["plan"])
    header = (f"{path}: routed {metadata['model'].get('class', '?')}, written with "
              + ", ".join(f"{k} {v}" for k, v in sorted(metadata.get("versions", {}).items())))
    return header + "\n" + plan.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsify", description="modality-routed models from dense ones")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print what a routed checkpoint routes, params before/after")
    inspect.add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_checkpoint(args.path))
    except SparsifyError as e:
        print(f"sparsify: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
