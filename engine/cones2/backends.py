"""The one registry of `backend` names, and the one place that picks a backend for a device.

Two kinds of backend answer to `--backend`:
  attention backend  the math inside every attention layer of the PyTorch UNet (reference, sdpa,
                     triton, ...); the UNet itself stays diffusers' module.
  UNet runner        replaces the whole PyTorch UNet call with a compiled graph (onnxruntime,
                     tensorrt); it may also carry its own text encoder and VAE decoder.
Each backend registers a `BackendSpec` when its module is imported. Registering is cheap: heavy
packages (triton, onnxruntime, tensorrt) are imported only when the backend is built. Backends that
live outside the engine core (`cones2.export`) are found through the `cones2.backends` entry-point
group of the installed distribution, so the core never names them.

The spec is the one place that says what a backend can do: its kind, whether torch.compile traces
it, the options (and CLI flags) it takes, and what the engine falls back to when it cannot start.
The engine, the compiled runner, the CLI (flags, pairing, help texts) and the Ray options ask it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable

import torch

from .errors import Cones2Error

ATTENTION = "attention backend"
RUNNER = "UNet runner"
ENTRY_POINT_GROUP = "cones2.backends"
DEFAULT_ENV = "CONES2_BACKEND"   # pins the default for every engine of the process (docs/speed.md)

# The attention backend every fallback ends in, and the one a UNet called without an attention
# context (a diffusers pipeline sharing the engine's modules) runs: torch SDPA, exact and everywhere.
BASE_ATTENTION = "sdpa"

log = logging.getLogger("cones2.backends")


@dataclass(frozen=True)
class BackendOption:
    """One keyword option a UNet runner takes, and the command-line flag that gives it.

    name: the factory keyword (`backend_options` key), e.g. "onnx_dir". flag: the flag without its
    dashes, e.g. "onnx". selects: giving the flag alone picks this backend (--onnx DIR means
    onnxruntime). made_by: the command that makes the value, named in errors."""

    name: str
    flag: str
    help: str
    metavar: str = "DIR"
    selects: bool = False
    made_by: str = ""


@dataclass(frozen=True)
class BackendSpec:
    """One `backend` name.

    factory: attention backend: `factory() -> backend` (with `plain` and `cross`); UNet runner:
    `factory(engine, **options) -> runner`. unavailable(device): None when it can run on `device`,
    else a short reason. default_on: device types where it may be picked by default; among those
    that can run, the highest `priority` wins. options: the `BackendOption`s a UNet runner takes;
    needs: the names of those it cannot do without (e.g. `engine_dir`), so it is never a default.
    exact: computes SPEC 3 exactly (within float rounding). traceable: written in plain PyTorch ops
    that torch.compile traces (any other attention backend runs as one opaque op in a compiled UNet).
    fallback: the backend the engine takes when this one, picked as a default, cannot start.
    """

    name: str
    kind: str
    factory: Callable[..., object]
    summary: str
    unavailable: Callable[[torch.device], str | None] = field(default=lambda device: None)
    default_on: tuple[str, ...] = ()
    priority: int = 0
    needs: tuple[str, ...] = ()
    exact: bool = True
    options: tuple[BackendOption, ...] = ()
    traceable: bool = False
    fallback: str | None = None

    @property
    def compilable(self) -> bool:
        """torch.compile (`--compile`) applies: the PyTorch UNet runs with this attention backend.
        A UNet runner runs its own compiled graphs instead."""
        return self.kind == ATTENTION


_SPECS: dict[str, BackendSpec] = {}
_ATTENTION_INSTANCES: dict[str, object] = {}
_discovered = False


def register(spec: BackendSpec) -> None:
    """Make `spec.name` a valid backend (a later registration of the same name replaces it)."""
    if spec.kind not in (ATTENTION, RUNNER):
        raise ValueError(f"backend {spec.name!r}: kind must be ATTENTION or RUNNER, got {spec.kind!r}")
    if spec.kind == ATTENTION and spec.options:
        raise ValueError(f"backend {spec.name!r}: attention backends take no options")
    unknown = set(spec.needs) - {o.name for o in spec.options} if spec.options else set()
    if unknown:
        raise ValueError(f"backend {spec.name!r}: needs {sorted(unknown)} are not among its options")
    if spec.traceable and spec.kind != ATTENTION:
        raise ValueError(f"backend {spec.name!r}: only attention backends are traced by torch.compile")
    _SPECS[spec.name] = spec
    _ATTENTION_INSTANCES.pop(spec.name, None)


def _discover() -> None:
    """Import the built-in backends and every `cones2.backends` entry point, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    importlib.import_module("cones2.attention")          # reference, sdpa, triton register themselves
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not take the engine down; say so once
            log.warning("backend plugin %s (%s) failed to load: %s", ep.name, ep.value, exc)


def specs(kind: str | None = None) -> list[BackendSpec]:
    """Every registered backend (of one kind), by name."""
    _discover()
    return [s for _, s in sorted(_SPECS.items()) if kind is None or s.kind == kind]


def backend_names(kind: str | None = None) -> list[str]:
    """Every name `--backend` accepts (of one kind)."""
    return [s.name for s in specs(kind)]


def get_spec(name: str) -> BackendSpec:
    """The spec of backend `name`; an unknown name is a Cones2Error listing the known ones."""
    _discover()
    if name not in _SPECS:
        raise Cones2Error(f"unknown backend {name!r}; choose from {', '.join(backend_names())}", "backend")
    return _SPECS[name]


def why_unavailable(name: str, device: str | torch.device) -> str | None:
    """None when backend `name` can run on `device`, else why not."""
    return get_spec(name).unavailable(torch.device(device))


def default_backends(device: str | torch.device, kinds: tuple[str, ...] = (ATTENTION, RUNNER)) -> list[tuple[str, str]]:
    """The defaults for `device`, best first, as (name, why): `$CONES2_BACKEND` alone when set, else
    every backend of `kinds` that may be a default here and can run, by priority. The engine builds
    the first and falls back to the next when building fails (e.g. an export that cannot be made)."""
    device = torch.device(device)
    pinned = os.environ.get(DEFAULT_ENV, "").strip()
    if pinned:
        try:
            name = select_backend(device, pinned, log_choice=False)[0]
        except Cones2Error as exc:
            raise Cones2Error(f"${DEFAULT_ENV}={pinned!r}: {str(exc).removeprefix('backend: ')}", "backend") from None
        if get_spec(name).kind not in kinds:   # e.g. a pinned UNet runner where compile needs an attention backend
            raise Cones2Error(f"${DEFAULT_ENV}={pinned!r} is a {get_spec(name).kind}; here only "
                              f"{' or '.join(kinds)}s apply", "backend")
        return [(name, f"${DEFAULT_ENV}")]
    candidates = sorted((s for s in specs() if device.type in s.default_on and not s.needs and s.kind in kinds),
                        key=lambda s: -s.priority)
    usable, passed_over = [], []
    for spec in candidates:
        why = spec.unavailable(device)
        if why is None:
            over = f" (passed over {'; '.join(passed_over)})" if passed_over else ""
            usable.append((spec.name, f"default on {device.type}{over}"))
        else:
            passed_over.append(f"{spec.name}: {why}")
    if not usable:
        raise Cones2Error(f"no backend can run on {device.type} ({'; '.join(passed_over) or 'none registered'})",
                          "backend")
    return usable


def select_backend(device: str | torch.device, requested: str | None = None, *,
                   log_choice: bool = True) -> tuple[str, str]:
    """(backend name, why it was chosen) for `device`; logs the choice and the backends passed over.

    requested: a name the user asked for (checked: it must exist and be able to run here), or None
    for the best default backend that can run on this device (`default_backends`)."""
    device = torch.device(device)
    if requested is not None:
        spec = get_spec(requested)
        why = spec.unavailable(device)
        if why is not None:
            usable = [s.name for s in specs() if not s.needs and s.unavailable(device) is None]
            raise Cones2Error(f"{requested!r} cannot run on {device.type}: {why}; usable here: {', '.join(usable)}",
                              "backend")
        name, reason = requested, "requested"
    else:
        name, reason = default_backends(device)[0]
    if log_choice:
        log.info("backend %s: %s", name, reason)
    return name, reason


def fallback(name: str, device: str | torch.device, kinds: tuple[str, ...] = (ATTENTION, RUNNER)) -> str | None:
    """What the engine takes when default backend `name` cannot start on `device`: its spec's
    `fallback` when that is one of `kinds` and can run here, else None (then the failure stands)."""
    nxt = get_spec(name).fallback
    if nxt is None or nxt == name:
        return None
    spec = get_spec(nxt)
    return nxt if spec.kind in kinds and spec.unavailable(torch.device(device)) is None else None


def option_flags() -> list[tuple[BackendSpec, BackendOption]]:
    """Every (runner, option) pair that has a command-line flag, by backend name."""
    return [(s, o) for s in specs(RUNNER) for o in s.options]


def attention_backend(name: str) -> object:
    """The (shared, stateless) attention backend object called `name`."""
    spec = get_spec(name)
    if spec.kind != ATTENTION:
        raise Cones2Error(f"{name!r} is a {spec.kind}, not an attention backend", "backend")
    if name not in _ATTENTION_INSTANCES:
        _ATTENTION_INSTANCES[name] = spec.factory()
    return _ATTENTION_INSTANCES[name]


def missing_package(module: str, hint: str) -> str | None:
    """A reason string when `module` is not importable here (for `unavailable` checks), else None."""
    return None if importlib.util.find_spec(module) is not None else f"the {module} package is not installed ({hint})"
