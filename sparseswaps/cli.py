"""The `sparseswaps` console script (argparse). Every command writes its resolved configuration into its output."""
from __future__ import annotations

import argparse
import os
import sys


def _solvers(args) -> int:
    from .registry import solver_status

    rows = solver_status()
    print(f"{'solver':<16} {'available':<9} {'exact':<5} {'bound':<5} {'warm':<5} {'weights':<7} {'gpu':<4} "
          "patterns  note")
    for row in rows:
        flags = [("yes" if row[key] else "-")
                 for key in ("available", "exact", "bound", "warm_start", "weights", "gpu")]
        print(f"{row['name']:<16} {flags[0]:<9} {flags[1]:<5} {flags[2]:<5} {flags[3]:<5} {flags[4]:<7} {flags[5]:<4} "
              f"{','.join(row['patterns']):<9} {row['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseswaps", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("solvers", help="list every backend, whether it runs here, its capabilities")
    listing.set_defaults(run=_solvers)
    from .commands import REGISTRARS
    for add_command in REGISTRARS:
        add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("RANK", "0") != "0":
        _hide_progress()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])   # recorded in outputs
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as error:
        print(f"sparseswaps {args.command}: error: {error}", file=sys.stderr)
        return 2


def _hide_progress() -> None:
    """Under torchrun one progress display (rank 0's) is enough. tqdm is already imported (torch imports it),
    so its TQDM_DISABLE variable comes too late: the default is changed instead."""
    from functools import partialmethod

    from tqdm import tqdm

    tqdm.__init__ = partialmethod(tqdm.__init__, disable=True)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .problem import ProblemError
    from .registry import SolverError
    from .errors import UserError
    return (ProblemError, SolverError, UserError, FileNotFoundError)


if __name__ == "__main__":
    sys.exit(main())
