from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "video": ["av"],
    "eval": [],
    "deepspeed": ["deepspeed"],
    "docs": ["mkdocs-material", "mkdocstrings-python"],
    "dev": ["pytest", "pandas", "ruff"],
}
EXTRAS["all"] = sorted({package for packages in EXTRAS.values() for package in packages})

setup(
    name="lightning_pref",
    version="0.1.0",
    description="PyTorch Lightning modules for preference optimization of diffusion models",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lightning_pref", "lightning_pref.*"]),
    package_data={"lightning_pref": ["toy/base_model/**/*", "toy/base_model/*"]},
    install_requires=[
        "torch>=2.4",
        "lightning>=2.4",
        "diffusers>=0.32",
        "transformers>=4.46",
        "peft>=0.13",
        "accelerate",
        "webdataset>=0.2.90",
        "torchmetrics>=1.4",
        "jsonargparse[signatures]>=4.32",
        "safetensors",
        "pillow",
        "matplotlib",
        "numpy",
        "pyarrow",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lightning-pref = lightning_pref.cli:main"]},
)
