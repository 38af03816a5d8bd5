"""Block-diffusion attention (SPEC §3): reference, Triton kernels, public op."""
