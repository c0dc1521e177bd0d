"""Kernels: plain-PyTorch references (the semantics) and the fast backends checked against them."""
