"""`hgdeploy` command line: parse, run one subcommand, end in one line on a user's mistake or Ctrl-C.

Results go to stdout (tables, or JSON with --json); progress and notes go to stderr.
Exit codes: 0 success; 1 a check failed (parity, lint findings, no tune plan within the budget and faster, the
eval gate, the held-out images); 2 bad input (one-line error, nothing written); 130 interrupted.
"""

from __future__ import annotations

from hgdeploy.cli.commands import COMMANDS
from hgdeploy.cli.parser import build_parser
from hgdeploy.core.errors import EXIT_USAGE, exit_code
from hgdeploy.core.progress import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    return exit_code(lambda: _command(argv), "hgdeploy")


def _command(argv: list[str] | None) -> int:
    parser = build_parser()
    quiet_libraries()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return COMMANDS[args.command](args)
