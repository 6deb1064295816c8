"""One exit-code wrapper for every cones2 command line (`cones2-engine`, `cones2-train`, the demo trainer).

A user mistake (`Cones2Error`) or an OS error about a user's file prints one line and exits 2;
Ctrl-C exits 130 (with the interrupt's own message, e.g. where the checkpoint went); anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable

from ..errors import Cones2Error

# OS errors that describe the user's disk or paths, not a bug: one line and exit 2
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENOENT,
               errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


def run_cli(prog: str, run: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Call `run()` and turn what it raises into an exit code (0 or its return value on success).

    prog: the name printed before each message. interrupted: the message for a bare Ctrl-C."""
    try:
        return int(run() or 0)
    except Cones2Error as exc:
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"{prog}: {_one_line(str(exc)) or interrupted}", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in USER_ERRNOS and exc.filename is None:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


def _one_line(text: str) -> str:
    """A message that carries line breaks (a library's) still prints as one line."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
