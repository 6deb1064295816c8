"""Atomic writes: one helper for files, one for folders.

A crash, an error or Ctrl-C never leaves a half-written PNG, residual, checkpoint or model, and a
file written here gets the permissions a plain `open(path, "w")` would give it (the umask's mode for
a new file, the existing file's mode when it replaces one), not the 0600 of a temp file.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _current_umask() -> int:
    """The process umask, read without changing it where Linux allows (setting it, even briefly,
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(target: Path, default: int) -> int:
    """The mode `target` keeps if it exists, else `default` less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return default & ~_current_umask()


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], *, durable: bool = False) -> Path:
    """Write `data` (bytes, or a function that writes to a binary file) to `path` via a temp file in
    the same folder and one rename. `durable` also fsyncs the file and its folder (stores that must
    survive power loss). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _target_mode(path, 0o666)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)
    return path


def fsync_directory(folder: Path) -> None:
    """Make a folder's entry list durable (a rename or a deletion in it reaches the disk)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a scratch folder beside `target`; when the block succeeds it replaces `target` (an old
    `target` is renamed aside, ours renamed in right after, then the old one removed; a failed
    rename puts the old one back), when it raises the scratch folder is removed and `target` is left as it was.

    keep_existing: if `target` appeared meanwhile (another process built the same cache entry),
    keep that one and drop ours. The folder gets the umask's mode, not mkdtemp's 0700."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, _target_mode(target, 0o777))
        if target.exists() and keep_existing:
            shutil.rmtree(tmp)
            return
        old = None
        if target.exists() or target.is_symlink():   # moved aside, not deleted, until ours is in place
            old = tmp.with_name(tmp.name + ".old")
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
