"""Triton kernels. ``lif``: the fused multi-step LIF forward / backward."""
