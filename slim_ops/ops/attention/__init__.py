"""Block-diffusion attention (docs/attention.md): reference, Triton kernels, public op."""
