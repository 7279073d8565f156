"""Triton gather-GEMM, gathered weight-gradient GEMM and row scatter-add kernels."""
