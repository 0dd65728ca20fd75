from setuptools import setup

setup(
    name="fastlora",
    version="0.1.0",
    description="Fused-kernel LoRA for PyTorch: Triton kernels on GPU, the same math in pure PyTorch elsewhere",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ installs as fastlora.kernels: a top-level `kernels` would collide with the PyPI package of that
    # name, which transformers imports when present.
    packages=["fastlora", "fastlora.kernels"],
    package_dir={"fastlora": "fastlora", "fastlora.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    entry_points={"console_scripts": ["fastlora=fastlora.__main__:main"]},
    extras_require={
        "peft": ["peft>=0.13", "transformers>=4.45", "safetensors>=0.4"],
        "plot": ["matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "numpy",
            "peft>=0.13",
            "transformers>=4.45",
            "safetensors>=0.4",
        ],
    },
)
