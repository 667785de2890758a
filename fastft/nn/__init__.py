"""Drop-in nn.Modules built on fastft's ops."""

from fastft.nn.nf4_linear import NF4Linear

__all__ = ["NF4Linear"]
