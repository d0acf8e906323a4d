"""One error type for everything a user can fix: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (recipe, plan, images, checkpoint, profile).

    The message names the problem and what to do; the CLI shows it without a traceback.
    """


EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a check the command makes failed: parity, lint findings, no tune plan, the eval gate, held-out
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130  # 130: a shell's code for a process ended by Ctrl-C (128 + SIGINT)


def exit_code(run: Callable[[], int | None], prog: str) -> int:
    """`run()`'s exit code, the two endings a user causes told in one line on stderr instead of a traceback:
    a UserError (exit 2) and Ctrl-C (exit 130). What was written stays whole: files are written atomically
    and staging folders are removed on the way out."""
    try:
        return run() or 0
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED

