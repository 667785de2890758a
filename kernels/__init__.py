"""Triton kernels and their launchers (installed as `fastft.kernels`). No autograd here: see fastft.ops."""
