"""Custom kernels (`cones2.kernels`): the fused Triton rectified cross-attention and its CUDA twin."""
