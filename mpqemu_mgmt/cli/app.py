"""The ``mpqemu-mgmt`` command: argument parsing, streams, exit codes (Contracts 2-4).

Data goes to stdout, diagnostics to stderr; an :class:`~mpqemu_mgmt.errors.MpqemuError` becomes
one clear line and its exit code; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mpqemu_mgmt import __version__
from mpqemu_mgmt.errors import EXIT_INTERRUPTED, EXIT_USAGE, MpqemuError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpqemu-mgmt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mpqemu-mgmt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--state-dir", default=None)
    parser.add_subparsers(dest="command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MpqemuError as exc:
        if args.debug:
            raise
        print(f"mpqemu-mgmt: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
