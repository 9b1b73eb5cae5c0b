"""Can this output be written? Asked before any model loads, so a bad --out costs a second, not a run.

`check_writable` refuses, with `OutputError` (one line, exit status 2): a missing folder, a
directory, a device or FIFO (/dev/full, a pipe), a path the system will not let us create (/proc/…,
a read-only mount, no permission). It creates the file to find out and removes it again, so an
error later in the run (no speech in the input) leaves nothing behind. A failure while writing
(a disk that fills up meanwhile) is an `OutputError` too: see `streaming.audio.write_wav` and
`write_text` here.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from rejoinder.errors import OutputError

__all__ = ["check_writable", "write_text"]


def check_writable(path: Path, flag: str) -> None:
    """Refuse an output that cannot be written (`flag` names it in the message: --out, --metrics-json)."""
    where = f"{flag} {path}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputError(f"{where}: cannot write ({exc.strerror or exc})") from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise OutputError(f"{where}: is a directory; give a file name")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{where}: is not a regular file (a device or pipe); give a file name")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # opens for writing, changes nothing
        except OSError as exc:
            raise OutputError(f"{where}: cannot write ({exc.strerror or exc})") from None
        os.close(fd)
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{where}: the folder {parent} does not exist")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return  # created meanwhile by someone else: it exists, so the folder takes files
    except OSError as exc:
        raise OutputError(f"{where}: cannot create it ({exc.strerror or exc})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_text(path: Path, text: str, flag: str) -> None:
    """Write `text` to `path`; a failure (a full disk) is one OutputError line, not a traceback."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
