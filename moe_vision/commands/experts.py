"""``moe-vision experts``: print the expert zoo as a table (see :func:`experts.zoo.zoo_table`).

::

    moe-vision experts                # every preset
    moe-vision experts '*-tiny'       # an fnmatch pattern
    moe-vision experts --csv zoo.csv  # also write it as CSV
"""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from experts.zoo import zoo_table

    try:
        table = zoo_table(args.pattern)
    except KeyError as err:
        print(f"moe-vision experts: {err.args[0]}", file=sys.stderr)
        return 2
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experts",
        help="list the expert zoo (name, library, checkpoint, input size, grid, channels, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pattern", nargs="?", default=None, help="fnmatch filter, e.g. '*-tiny'")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    p.set_defaults(func=_run)
