"""The one exception type for user mistakes, and a bounded way to quote what the user sent.

Raised at the edges (API, CLI, gRPC) with a message that names the offending field; the CLI maps it
to exit code 2 and the gRPC service to INVALID_ARGUMENT. Inner code trusts validated inputs.
"""
from __future__ import annotations

QUOTE_LIMIT = 60


class Cones2Error(ValueError):
    """A user input is wrong. `field` names it (e.g. ``"layout.boxes.dog"``) when known."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class GenerationCancelled(RuntimeError):
    """The caller's `should_stop` hook asked to stop between two UNet steps."""


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to `limit` characters: error messages stay one short line (and fit in gRPC
    trailers) whatever the client sent."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"
