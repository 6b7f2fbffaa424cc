"""Fused Triton kernels of the quantized linear: the forward quantizer and the GEMMs on its codes."""
