from setuptools import find_packages, setup

setup(
    # "fastlora" on PyPI is an unrelated project: this one installs from source only (README) under a
    # distribution name of its own; the import name stays `fastlora`.
    name="fastlora-fused",
    version="0.1.0",
    description="Fused-kernel LoRA for PyTorch: Triton kernels on GPU, the same math in pure PyTorch elsewhere",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ installs as fastlora.kernels: a top-level `kernels` would collide with the PyPI package of that
    # name, which transformers imports when present.
    packages=find_packages(include=["fastlora", "fastlora.*"]) + ["fastlora.kernels"],
    package_dir={"fastlora": "fastlora", "fastlora.kernels": "kernels"},
    # triton is not required: CUDA builds of torch bring their own, and the CPU path never imports it. The test
    # extra adds it so that the kernels run on the CPU through Triton's interpreter.
    install_requires=["torch>=2.4"],
    entry_points={"console_scripts": ["fastlora=fastlora.__main__:main"]},
    extras_require={
        "peft": ["peft>=0.18", "transformers>=5.13", "safetensors>=0.4"],
        "plot": ["matplotlib>=3.7"],
        "qlora": ["bitsandbytes>=0.50"],
        # everything the README's examples and the bench use: the quick start installs this one
        "all": ["peft>=0.18", "transformers>=5.13", "safetensors>=0.4", "bitsandbytes>=0.50", "matplotlib>=3.7"],
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "matplotlib>=3.7",  # the bench plot is tested too
            "triton>=3.0; platform_system == 'Linux'",
            "hypothesis>=6",
            "numpy",
            "peft>=0.18",
            "transformers>=5.13",
            "safetensors>=0.4",
            "bitsandbytes>=0.50",
        ],
    },
)
