"""Build script: plain Python package; the optional C++/CUDA extension lives in csrc/."""

from setuptools import setup

setup()
