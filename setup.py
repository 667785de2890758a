"""Builds fastft with its C++ CPU extension fastft._C; the Triton kernels in kernels/ install as fastft.kernels."""

import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

csrc = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
sources = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith(".cpp"))

extension = CppExtension(
    name="fastft._C",
    sources=sources,
    extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"],
    extra_link_args=["-fopenmp"],
)

setup(
    packages=find_packages(include=["fastft", "fastft.*"]) + ["fastft.kernels"],
    package_dir={"fastft.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
