"""The server's residual store: content-addressed safetensors files in one folder.

A residual's id is the sha256 of its *canonical* safetensors bytes (header JSON with sorted keys,
then the float32 rows), so the same residual always gets the same id whatever key order the uploader's
writer used. Ids are the only names clients give; they are checked against a strict pattern, so no
client string ever becomes a path. Files are written by `cones2.atomic.atomic_write(durable=True)`
(temp file, fsync, rename, folder fsync) and re-hashed when read, so a crash or a corrupted file
never yields a wrong residual.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .. import Cones2Error, Residual
from ..atomic import atomic_write, fsync_directory
from ..errors import quote

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 1 << 20     # a (75, 1024) float32 residual is 300 KiB
DEFAULT_MAX_ENTRIES = 4096
STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class ResidualInfo:
    """What ListResiduals reports about one stored residual."""

    id: str
    rows: int
    dim: int
    size_bytes: int
    word: str = ""
    base_model: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


class StoreFull(Exception):
    """The store holds its maximum number of residuals."""


def canonical_bytes(residual: Residual) -> bytes:
    """The residual's safetensors bytes with a deterministic header (sorted keys, compact JSON)."""
    raw = residual.to_safetensors_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes with trailing spaces
    return struct.pack("<Q", len(text)) + text + data


def residual_id(residual: Residual) -> str:
    return hashlib.sha256(canonical_bytes(residual)).hexdigest()


def check_id(rid: str, field: str) -> str:
    """`rid` if it is a well-formed id (64 lowercase hex digits), else a Cones2Error naming `field`."""
    if not isinstance(rid, str) or not ID_PATTERN.match(rid):
        raise Cones2Error(f"must be a residual id (64 lowercase hex digits), got {quote(rid)}", field)
    return rid


class ResidualStore:
    """Residuals on disk under `root`, for a model whose text encoder has width `text_dim`.

    Thread-safe. `max_bytes` bounds one upload; `max_entries` bounds the store.
    """

    def __init__(self, root: str | os.PathLike, text_dim: int, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES, cache_size: int = 256):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.text_dim, self.max_bytes, self.max_entries = text_dim, max_bytes, max_entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Residual] = OrderedDict()
        self._cache_size = cache_size
        self._infos: dict[str, ResidualInfo] = {}
        self._remove_stale_temp_files()

    # ---- public API ---------------------------------------------------------------------------
    def parse_upload(self, data: bytes, field: str) -> Residual:
        """Validate uploaded bytes (size, safetensors form, finite values, D) into a Residual."""
        if len(data) > self.max_bytes:
            raise Cones2Error(f"{len(data)} bytes exceeds the residual size limit of {self.max_bytes} bytes", field)
        if not data:
            raise Cones2Error("is empty; send a residual in safetensors form", field)
        residual = Residual.from_safetensors_bytes(bytes(data), field)
        residual.check_dim(self.text_dim, field)
        return residual

    def register(self, data: bytes, field: str = "safetensors") -> tuple[ResidualInfo, bool]:
        """Store an uploaded residual; returns its info and whether it was new."""
        residual = self.parse_upload(data, field)
        blob = canonical_bytes(residual)
        rid = hashlib.sha256(blob).hexdigest()
        path = self._path(rid)
        with self._lock:
            if path.is_file():
                return self._info(rid, residual, len(blob)), False
            if self._count() >= self.max_entries:
                raise StoreFull(f"the residual store holds its maximum of {self.max_entries} residuals")
            atomic_write(path, blob, durable=True)
            self._remember(rid, residual)
        return self._info(rid, residual, len(blob)), True

    def get(self, rid: str, field: str = "residual_id") -> Residual:
        """The residual with id `rid`; a Cones2Error naming `field` if the id is malformed or unknown."""
        check_id(rid, field)
        with self._lock:
            if rid in self._cache:
                # Another process sharing the folder (a Ray Serve replica) may have deleted it.
                if self._path(rid).is_file():
                    self._cache.move_to_end(rid)
                    return self._cache[rid]
                del self._cache[rid]
                self._infos.pop(rid, None)
        try:
            blob = self._path(rid).read_bytes()
        except FileNotFoundError:
            raise Cones2Error(f"unknown residual id {rid} (register it first)", field) from None
        if hashlib.sha256(blob).hexdigest() != rid:
            log.error("residual file %s does not match its id; ignoring it", self._path(rid))
            raise Cones2Error(f"unknown residual id {rid} (the stored file is corrupted)", field)
        residual = Residual.from_safetensors_bytes(blob, field)
        with self._lock:
            self._remember(rid, residual)
        return residual

    def list(self) -> list[ResidualInfo]:
        """Every well-formed residual in the folder, sorted by id."""
        infos = []
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            rid = path.name[: -len(SUFFIX)]
            if not ID_PATTERN.match(rid):
                continue
            info = self._infos.get(rid)
            if info is None:
                try:
                    residual = self.get(rid)
                except (Cones2Error, OSError):
                    continue
                info = self._info(rid, residual, path.stat().st_size)
            infos.append(info)
        return infos

    def delete(self, rid: str, field: str = "id") -> bool:
        """Remove a residual; False if there was none with this id."""
        check_id(rid, field)
        with self._lock:
            self._cache.pop(rid, None)
            self._infos.pop(rid, None)
            try:
                self._path(rid).unlink()
            except FileNotFoundError:
                return False
            fsync_directory(self.root)
        return True

    # ---- internals ----------------------------------------------------------------------------
    def _path(self, rid: str) -> Path:
        return self.root / f"{rid}{SUFFIX}"  # rid matched ID_PATTERN: no separators, no dots

    def _count(self) -> int:
        return sum(1 for _ in self.root.glob(f"*{SUFFIX}"))

    def _remember(self, rid: str, residual: Residual) -> None:
        self._cache[rid] = residual
        self._cache.move_to_end(rid)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _info(self, rid: str, residual: Residual, size: int) -> ResidualInfo:
        info = ResidualInfo(rid, residual.rows, residual.dim, size, residual.word or "", residual.base_model or "",
                            dict(residual.metadata))
        self._infos[rid] = info
        return info

    def _remove_stale_temp_files(self) -> None:
        now = time.time()
        for tmp in self.root.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_SECONDS:
                    tmp.unlink()
            except OSError:
                pass
