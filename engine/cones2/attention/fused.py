"""What the fused-kernel attention backends (`triton`, `cuda`) share: plain attention stays on torch
SDPA, guided cross-attention goes to one kernel with SPEC 3's contract, and the kernel's own argument
errors become the engine's `Cones2Error` at this seam."""
from __future__ import annotations

import torch.nn.functional as F

from ..errors import Cones2Error


class FusedKernelBackend:
    """Base of an attention backend whose `cross` is one fused kernel: subclasses set `name` and
    `kernel()` (imported on construction, so registering the backend imports nothing heavy)."""

    name = ""

    def __init__(self):
        from cones2.kernels.errors import KernelArgumentError

        self._kernel = self.kernel()
        self._argument_error = KernelArgumentError

    @staticmethod
    def kernel():
        """The kernel: (q, k, v, weight, coef, scale) -> rectified attention output."""
        raise NotImplementedError

    def plain(self, q, k, v, scale):
        """q: (B, H, N, d), k/v: (B, H, M, d) -> softmax(q k^T * scale) v via SDPA."""
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def cross(self, q, k, v, weight, coef, scale):
        """SPEC 3 rectified attention; weight (B, N, M) float32, coef (B,) float32."""
        try:
            return self._kernel(q, k, v, weight, coef, scale)
        except self._argument_error as exc:   # bad input; a failed launch stays a KernelUnavailableError
            raise Cones2Error(str(exc), f"backend.{self.name}") from None
