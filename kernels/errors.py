"""The kernels' own exceptions: `kernels/` is a leaf (torch, triton and the standard library only),
so it cannot raise the engine's `Cones2Error`; the engine's attention seam translates these."""
from __future__ import annotations


class KernelArgumentError(ValueError):
    """Bad arguments to a kernel launcher: shapes, dtypes, devices. `field` names the argument."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class KernelUnavailableError(RuntimeError):
    """A kernel cannot run here: its library is missing, of another ABI, or failed on launch."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
