"""Packaging for clarity_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository
and are installed as the subpackage ``clarity_fast.kernels``; no top-level
``kernels`` module is ever installed.
"""
from setuptools import setup

setup(
    name="clarity_fast",
    version="0.1.0",
    description="Fast CLARiTy: multi-class-token ViT for chest X-ray classification and weakly supervised localization",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["clarity_fast", "clarity_fast.kernels"],
    package_dir={"clarity_fast": "clarity_fast", "clarity_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "timm>=1.0.9",
        "torchxrayvision>=1.2",
        "numpy",
        "scipy",
        "safetensors",
        "tqdm",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "setuptools>=70", "wheel", "scikit-learn", "grad-cam>=1.5"],
        "bench": ["pytest-benchmark>=4"],
        "gradcam": ["grad-cam>=1.5"],
    },
    entry_points={"console_scripts": ["clarity-fast=clarity_fast.cli:main"]},
)
