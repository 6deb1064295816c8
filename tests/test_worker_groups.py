"""`make test`'s worker groups (conftest.WORKER_GROUPS) name modules that exist, and every module that
uses the session's shared CLI export is in its group, so it is built once per run, not once per worker."""
from __future__ import annotations

from pathlib import Path

from conftest import WORKER_GROUPS

TESTS = Path(__file__).resolve().parent


def test_every_grouped_module_exists_and_every_export_user_is_grouped():
    grouped = [m for modules in WORKER_GROUPS.values() for m in modules]
    assert len(grouped) == len(set(grouped)), "a module may sit in one group only"
    assert [m for m in grouped if not (TESTS / m).is_file()] == []
    users = sorted(p.name for p in TESTS.glob("test_*.py")
                   if p.name != Path(__file__).name and "exported_onnx_dir(" in p.read_text())
    assert users and set(users) <= set(WORKER_GROUPS["onnx-export"]), users
