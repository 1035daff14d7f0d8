"""Low-level ops on flat buffers of masked entries: PyTorch reference paths and Triton kernels.

The Triton kernel modules (``*_triton.py``) import triton and are loaded lazily by the optimizers,
so ``import fishkern`` never imports triton or touches CUDA.
"""
