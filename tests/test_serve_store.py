"""The residual store (engine/cones2/serve/residual_store.py): content ids, validation, atomic files, restart."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import load as st_load

import cones2
from cones2.serve.residual_store import ResidualStore, StoreFull, canonical_bytes
from serve_support import make_residual


def _safetensors(tensors: dict, metadata: dict, key_order=None) -> bytes:
    """A safetensors file written by hand (independent of the library), with a chosen key order."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    meta = {k: metadata[k] for k in (key_order or metadata)}
    text = json.dumps({"__metadata__": meta, **header}).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def test_id_is_sha256_of_canonical_bytes_and_ignores_key_order(tmp_path):
    emb = torch.randn(2, 32)
    meta = {"format": "cones2-residual/1", "dim": "32", "word": "dog", "base_model": "x", "note": "a"}
    a = _safetensors({"residual": emb}, meta)
    b = _safetensors({"residual": emb}, meta, key_order=list(reversed(list(meta))))
    assert a != b
    store = ResidualStore(tmp_path, text_dim=32)
    info_a, created_a = store.register(a)
    info_b, created_b = store.register(b)
    assert created_a and not created_b
    assert info_a.id == info_b.id
    canonical = (tmp_path / f"{info_a.id}.safetensors").read_bytes()
    assert hashlib.sha256(canonical).hexdigest() == info_a.id
    # the canonical form is valid safetensors holding the same tensor and metadata
    assert torch.equal(st_load(canonical)["residual"], emb)
    header = json.loads(canonical[8 : 8 + struct.unpack("<Q", canonical[:8])[0]])
    assert header["__metadata__"]["word"] == "dog" and header["__metadata__"]["note"] == "a"
    assert list(header) == sorted(header)
    assert (info_a.rows, info_a.dim, info_a.word) == (2, 32, "dog")


def test_canonical_bytes_are_stable_across_writes():
    r = cones2.Residual(torch.randn(1, 32), word="cat", metadata={"a": "1", "b": "2", "c": "3", "d": "4"})
    blobs = {canonical_bytes(cones2.Residual.from_safetensors_bytes(r.to_safetensors_bytes())) for _ in range(8)}
    assert len(blobs) == 1


def test_survives_restart_and_delete(tmp_path):
    store = ResidualStore(tmp_path, text_dim=32)
    r = make_residual(1)
    info, _ = store.register(r.to_safetensors_bytes())
    again = ResidualStore(tmp_path, text_dim=32)           # a new process would see the same
    assert [i.id for i in again.list()] == [info.id]
    assert torch.equal(again.get(info.id).embedding, r.embedding)
    assert again.delete(info.id)
    assert not again.delete(info.id)
    assert ResidualStore(tmp_path, text_dim=32).list() == []
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("make, message", [
    (lambda: b"", "is empty"),
    (lambda: b"not safetensors at all", "safetensors"),
    (lambda: make_residual(dim=48).to_safetensors_bytes(), "D=48"),
    (lambda: _safetensors({"residual": torch.tensor([[float("nan")] * 32])}, {}), "NaN"),
    (lambda: _safetensors({"other": torch.zeros(1, 32)}, {}), "no 'residual' tensor"),
    (lambda: b"\0" * 2_000_000, "exceeds the residual size limit"),
])
def test_bad_uploads_name_the_field(tmp_path, make, message):
    store = ResidualStore(tmp_path, text_dim=32)
    with pytest.raises(cones2.Cones2Error, match=message) as err:
        store.register(make(), "safetensors")
    assert err.value.field == "safetensors"
    assert store.list() == []


@pytest.mark.parametrize("rid", ["../../etc/passwd", "a" * 63, "A" * 64, "a" * 64 + "/x", "", "a" * 64 + ".safetensors"])
def test_ids_never_become_paths(tmp_path, rid):
    store = ResidualStore(tmp_path / "store", text_dim=32)
    with pytest.raises(cones2.Cones2Error, match="64 lowercase hex") as err:
        store.get(rid, "subjects[0].residual_id")
    assert err.value.field == "subjects[0].residual_id"
    with pytest.raises(cones2.Cones2Error):
        store.delete(rid)


def test_unknown_and_corrupted_ids(tmp_path):
    store = ResidualStore(tmp_path, text_dim=32)
    with pytest.raises(cones2.Cones2Error, match="unknown residual id"):
        store.get("0" * 64)
    info, _ = store.register(make_residual(2).to_safetensors_bytes())
    path = tmp_path / f"{info.id}.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")      # bit rot
    with pytest.raises(cones2.Cones2Error, match="corrupted"):
        ResidualStore(tmp_path, text_dim=32).get(info.id)


def test_entry_limit(tmp_path):
    store = ResidualStore(tmp_path, text_dim=32, max_entries=2)
    store.register(make_residual(1).to_safetensors_bytes())
    store.register(make_residual(2).to_safetensors_bytes())
    with pytest.raises(StoreFull):
        store.register(make_residual(3).to_safetensors_bytes())
    info, created = store.register(make_residual(1).to_safetensors_bytes())   # already there: not a new entry
    assert not created and len(store.list()) == 2 and info.id in {i.id for i in store.list()}


def test_stored_files_get_the_mode_a_plain_write_would(tmp_path):
    old = os.umask(0o027)
    try:
        store = ResidualStore(tmp_path, text_dim=32)
        info, _ = store.register(make_residual(1).to_safetensors_bytes())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / f"{info.id}.safetensors").stat().st_mode) == 0o640   # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == [f"{info.id}.safetensors"]             # no temp file left
