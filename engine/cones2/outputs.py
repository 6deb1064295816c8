"""Output paths, checked before the work starts: a run that cannot write its result fails at once.

Every command checks each file or folder it will write (PNG, preview, latents, residual,
checkpoints, export folders) here first: the name's suffix, that the target is not a folder (or not
a file), and that a file can really be created where `cones2.atomic` will write (tried, not guessed
from permission bits: root, read-only mounts and /proc all answer honestly). Nothing is left behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import Cones2Error, quote

PATH_QUOTE_LIMIT = 500   # a path the user typed is shown whole (the OS bounds it); a runaway one is cut


def output_file(path: str | os.PathLike, field: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """`path` as a file this run can write (atomically, beside it); else a one-line Cones2Error.

    suffixes: accepted endings (case-insensitive), e.g. (".png",)."""
    out = Path(path).expanduser()
    if suffixes and out.suffix.lower() not in suffixes:
        raise Cones2Error(f"must end in {' or '.join(suffixes)}, got {_shown(out)}", field)
    if _is_dir(out, field):
        raise Cones2Error(f"is a folder, not a file: {_shown(out)}", field)
    _check_can_create_in(out.parent, field)
    return out


def output_folder(path: str | os.PathLike, field: str, *, replaced: bool = False) -> Path:
    """`path` as a folder this run can write; else a one-line Cones2Error.

    replaced: the folder is written whole beside itself and renamed into place (`atomic_directory`),
    so its parent must take new entries; otherwise files are created inside it."""
    out = Path(path).expanduser()
    if _exists(out, field) and not _is_dir(out, field):
        raise Cones2Error(f"is a file, not a folder: {_shown(out)}", field)
    _check_can_create_in(out.parent if replaced else out, field)
    return out


def _check_can_create_in(folder: Path, field: str) -> None:
    """The nearest existing folder at or above `folder` is a folder and takes a new file."""
    existing = folder
    while not _exists(existing, field) and existing.parent != existing:
        existing = existing.parent
    if not _is_dir(existing, field):
        raise Cones2Error(f"cannot write under {_shown(existing)}: it is a file, not a folder", field)
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise Cones2Error(f"cannot create files in {_shown(existing)} ({exc.strerror or exc})", field) from None


def _exists(path: Path, field: str) -> bool:
    try:
        return path.exists()
    except OSError as exc:
        raise Cones2Error(f"cannot look at {_shown(path)} ({exc.strerror or exc})", field) from None


def _is_dir(path: Path, field: str) -> bool:
    try:
        return path.is_dir()
    except OSError as exc:
        raise Cones2Error(f"cannot look at {_shown(path)} ({exc.strerror or exc})", field) from None


def _shown(path: Path) -> str:
    return quote(str(path), PATH_QUOTE_LIMIT)
