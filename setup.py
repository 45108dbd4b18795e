# Placeholder until the CUDA build logic lands: pure-Python install.
from setuptools import setup

setup(
    packages=["tsv_fast", "tsv_fast.backends", "tsv_fast.kernels"],
    package_dir={"tsv_fast.kernels": "kernels"},
)
