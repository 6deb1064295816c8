"""A subject is a residual: a (k, D) tensor added to its word's text embeddings (SPEC sections 1, 2).

Loads the project's safetensors format and the reference implementation's `.pt` files (plain tensors,
read with `torch.load(weights_only=True)` only), validates shape, dtype and finiteness, and saves
the safetensors form atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import Cones2Error, quote

TENSOR_KEY = "residual"
FORMAT = "cones2-residual/1"
MAX_ROWS = 75  # a word can occupy at most the 75 non-special positions of a 77-token prompt
MAX_FILE_BYTES = 16 * 1024 * 1024
FINGERPRINT_KEY = "base_fingerprint"


@dataclass(frozen=True)
class Residual:
    """A subject residual.

    embedding: (k, D) float32, added to the text-encoder output at the subject word's k token
    positions. word / token_ids: the base word and its token ids (None for legacy `.pt` files).
    base_model: what it was trained on (a name, informational); the weights it was trained on are
    identified by `base_fingerprint` (`cones2.loading.model_fingerprint`, recorded by cones2-train).
    metadata: any further string metadata. file_name / file_sha256: the file it was loaded from
    (None when built in memory), recorded in each image's metadata so the image can be re-run.
    """

    embedding: torch.Tensor
    word: str | None = None
    token_ids: tuple[int, ...] | None = None
    base_model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    file_name: str | None = field(default=None, compare=False)
    file_sha256: str | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "embedding", _validated_tensor(self.embedding, "embedding"))
        if self.token_ids is not None:
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))

    @property
    def rows(self) -> int:
        return self.embedding.shape[0]

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    @property
    def base_fingerprint(self) -> str | None:
        """The fingerprint of the model it was trained on, when recorded (metadata `base_fingerprint`)."""
        return self.metadata.get(FINGERPRINT_KEY) or None

    @property
    def sha256(self) -> str:
        """sha256 of the file it came from, or of its safetensors form when built in memory."""
        return self.file_sha256 or hashlib.sha256(self.to_safetensors_bytes()).hexdigest()

    def check_dim(self, dim: int, name: str = "residual") -> None:
        """Raise a Cones2Error unless this residual fits a text encoder of width `dim`."""
        if self.dim != dim:
            raise Cones2Error(
                f"has width D={self.dim} but the model's text encoder has D={dim} "
                "(residuals only work with the base model family they were trained on)",
                name,
            )

    @classmethod
    def load(cls, path: str | os.PathLike, name: str = "residual") -> "Residual":
        """Load a `.safetensors` residual (project format) or a legacy reference `.pt` tensor."""
        path = Path(path)
        if not path.is_file():
            raise Cones2Error(f"file not found: {path}", name)
        if path.stat().st_size > MAX_FILE_BYTES:
            raise Cones2Error(f"file is too large for a residual ({path.stat().st_size} bytes): {path}", name)
        if path.suffix == ".safetensors":
            data = path.read_bytes()
            residual = cls.from_safetensors_bytes(data, name)
        elif path.suffix in (".pt", ".pth", ".bin"):
            data = path.read_bytes()
            residual = cls(_load_legacy(path, name), metadata={"source": path.name})
        else:
            raise Cones2Error(f"unsupported file type {path.suffix!r} (use .safetensors or .pt): {path}", name)
        object.__setattr__(residual, "file_name", path.name)
        object.__setattr__(residual, "file_sha256", hashlib.sha256(data).hexdigest())
        return residual

    @classmethod
    def from_safetensors_bytes(cls, data: bytes, name: str = "residual") -> "Residual":
        """Parse the project's safetensors form from bytes (files and gRPC uploads)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            tensors = st_load(data)
            meta = _safetensors_metadata(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise Cones2Error(f"not a readable safetensors file ({quote(str(exc))})", name) from None
        if TENSOR_KEY not in tensors:
            raise Cones2Error(f"safetensors file has no {TENSOR_KEY!r} tensor (has {quote(sorted(tensors))})", name)
        token_ids = meta.pop("token_ids", None)
        try:
            token_ids = tuple(json.loads(token_ids)) if token_ids else None
        except (json.JSONDecodeError, TypeError):
            raise Cones2Error("metadata token_ids is not a JSON list", name) from None
        meta.pop("format", None)
        meta.pop("dim", None)
        try:
            return cls(tensors[TENSOR_KEY], word=meta.pop("word", None), token_ids=token_ids,
                       base_model=meta.pop("base_model", None), metadata=meta)
        except Cones2Error as exc:
            raise Cones2Error(str(exc), name) from None

    def to_safetensors_bytes(self) -> bytes:
        """The safetensors form, byte for byte the same for equal residuals (so its sha256 names the
        content): safetensors writes the header's keys in a random order, so the header is re-sorted."""
        from safetensors.torch import save

        return _sorted_header(save({TENSOR_KEY: self.embedding.contiguous()}, metadata=self._metadata()))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the safetensors form atomically (`cones2.atomic`): a crash never leaves half a file,
        and the file gets the mode a plain write would give it."""
        return atomic_write(path, self.to_safetensors_bytes())

    def _metadata(self) -> dict[str, str]:
        meta = {k: str(v) for k, v in self.metadata.items()}
        meta.update(format=FORMAT, dim=str(self.dim))
        if self.word is not None:
            meta["word"] = self.word
        if self.token_ids is not None:
            meta["token_ids"] = json.dumps(list(self.token_ids))
        if self.base_model is not None:
            meta["base_model"] = self.base_model
        return meta


def _validated_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise Cones2Error(f"must be a tensor, got {type(t).__name__}", name)
    if not t.is_floating_point():
        raise Cones2Error(f"must be a floating-point tensor, got {t.dtype}", name)
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise Cones2Error(f"must have shape (k, D) or (D,), got {tuple(t.shape)}", name)
    if t.shape[0] > MAX_ROWS:
        raise Cones2Error(f"has {t.shape[0]} rows; a word has at most {MAX_ROWS} tokens", name)
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise Cones2Error("contains NaN or infinite values", name)
    return t


def _load_legacy(path: Path, name: str) -> torch.Tensor:
    try:
        with warnings.catch_warnings():      # e.g. "pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickle errors of many kinds; weights_only refuses code objects. torch's own
        # message is many lines and suggests weights_only=False, which runs the file's code: not repeated.
        raise Cones2Error(f"cannot read {path.name}: not a plain tensor file (read with weights_only=True, which "
                          "never runs code); to convert it, load it yourself where you trust its source and save "
                          "cones2.Residual(tensor).save('x.safetensors')", name) from None
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise Cones2Error(f"{path.name} holds a dict with {len(tensors)} tensors; expected exactly one", name)
        obj = tensors[0]
    try:
        return _validated_tensor(obj, name)
    except Cones2Error as exc:
        raise Cones2Error(f"{path.name}: {exc}") from None


def _sorted_header(data: bytes) -> bytes:
    """`data` (a safetensors file) with its JSON header written with sorted keys, padded with spaces
    to the 8-byte alignment the format keeps; the tensor bytes are untouched."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + header_len]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + header_len :]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__") or {})
