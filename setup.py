from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="lumina-ds",
    version="0.1.0",
    description="Train decoder-only Mixture-of-Experts chat models with DeepSpeed, from a laptop to 300B",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["lumina_ds", "lumina_ds.*"]),
    package_data={"lumina_ds.planning": ["layouts/*.json"]},  # every run with --preset reads its planned layout
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8",
        "tokenizers>=0.19",
        "jinja2>=3.1.6",  # chat templates: the sandbox fixes transformers also requires
        "numpy",
        "pyyaml",
        "tensorboard",
        "tqdm",
        "matplotlib>=3.7",  # the run report every run writes (report.png)
        "safetensors",
        "psutil",
        "xxhash",
        "pyarrow>=15",  # Parquet sources (data/tables.py)
        "datasets>=2.19",  # save_to_disk directories and hf:// sources, imported only for those
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "hf": ["transformers>=4.46"],
        "mpi": ["mpi4py>=4.0"],
        "wandb": ["wandb>=0.17"],  # --wandb
    },
    entry_points={"console_scripts": ["lumina-ds=lumina_ds.cli:entry"]},
)
