"""`cones2.atomic`: files and folders appear whole or not at all, with the mode a plain write gives
(the umask's for a new file, the old file's when replacing one), never the temp file's 0600."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import cones2
from cones2.atomic import atomic_directory, atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _plain_write_mode(folder: Path) -> int:
    """The mode `open(path, "wb")` gives a new file here: the independent expectation."""
    probe = folder / "plain.bin"
    probe.write_bytes(b"")
    mode = _mode(probe)
    probe.unlink()
    return mode


def test_new_file_gets_the_umask_mode(tmp_path, umask):
    expected = 0o666 & ~umask
    assert _plain_write_mode(tmp_path) == expected
    atomic_write(tmp_path / "a.bin", b"abc")
    assert _mode(tmp_path / "a.bin") == expected and (tmp_path / "a.bin").read_bytes() == b"abc"
    cones2.Residual(torch.ones(1, 8)).save(tmp_path / "r.safetensors")
    assert _mode(tmp_path / "r.safetensors") == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "r.safetensors"]   # no temp files left


@pytest.mark.parametrize("old_mode", [0o644, 0o600, 0o640])
def test_replacing_keeps_the_old_files_mode(tmp_path, old_mode):
    path = tmp_path / "keep.png"
    path.write_bytes(b"old")
    path.chmod(old_mode)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and _mode(path) == old_mode


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "keep.png"
    path.write_bytes(b"precious")

    def half_then_fail(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_folder_gets_the_umask_mode_and_replaces_whole(tmp_path, umask):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert _mode(target) == 0o777 & ~umask and (target / "a.txt").read_text() == "one"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_failed_folder_leaves_the_old_one(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "state.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "state.json").write_text("{half")
            raise KeyboardInterrupt
    assert (target / "state.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_keep_existing_keeps_the_first_folder(tmp_path):
    target = tmp_path / "cache-entry"
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "who").write_text("first")
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "who").write_text("second")
    assert (target / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache-entry"]


def test_only_one_file_helper_and_one_folder_helper_in_the_tree():
    """Every temp-file + rename outside the service goes through cones2.atomic (issue 10)."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for folder in ("engine", "export", "cones2_train"):
        for path in (root / folder).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            if rel == "engine/cones2/atomic.py" or rel.startswith("engine/cones2/serve/"):
                continue
            text = path.read_text()
            offenders += [rel for word in ("os.replace", "mkstemp", "mkdtemp") if word in text]
    assert offenders == []
