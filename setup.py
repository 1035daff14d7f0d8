"""Build script.

The pure-Python package needs nothing beyond pyproject.toml; this file is where the native
extension (csrc/: global top-k, C++ on CPU and CUDA when torch has CUDA and nvcc is present)
is wired in. Until that op lands, it only forwards to setuptools.
"""
from setuptools import setup

setup()
