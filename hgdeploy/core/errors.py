"""One error type for everything a user can fix: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any, Callable


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


# How long an interrupted child gets to end on the Ctrl-C the terminal sent it too, before it is sent one itself.
CHILD_GRACE_S = 60


def run_child(cmd: list[str], **popen: Any) -> subprocess.CompletedProcess:
    """subprocess.run for a script's hgdeploy command, except on Ctrl-C. A terminal's Ctrl-C reaches the child
    too, and it needs time to remove its staging folders; subprocess.run kills it 0.25 s later, leaving them
    behind. Here the child gets CHILD_GRACE_S to end (then a SIGINT of its own, in case only this process was
    interrupted), and the KeyboardInterrupt goes on once it has."""
    with subprocess.Popen(cmd, **popen) as child:
        try:
            out, err = child.communicate()
        except KeyboardInterrupt:
            try:
                child.communicate(timeout=CHILD_GRACE_S)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
                child.communicate()
            raise
    return subprocess.CompletedProcess(cmd, child.returncode, out, err)
