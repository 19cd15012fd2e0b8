"""llave-ds: hardness-weighted contrastive training of multimodal embedding models
with gradient caching inside DeepSpeed ZeRO."""
from setuptools import find_packages, setup

setup(
    name="llave-ds",
    version="0.1.0",
    description="LLaVE-style universal multimodal embedding training with gradient caching under DeepSpeed ZeRO-3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ and ds_configs/ stay at the top of the checkout (the README's paths) and are
    # installed inside the package, so a wheel finds them too (llave_ds.config.shipped_file).
    packages=find_packages(include=["llave_ds", "llave_ds.*"]) + ["llave_ds.configs", "llave_ds.ds_configs"],
    package_dir={"llave_ds.configs": "configs", "llave_ds.ds_configs": "ds_configs"},
    include_package_data=True,
    package_data={"llave_ds.data": ["*.json"], "llave_ds.eval": ["*.json"], "llave_ds.configs": ["*.yaml"],
                  "llave_ds.ds_configs": ["*.json"]},
    # Wide ranges on purpose: users on GPU clusters bring their own CUDA torch build.
    # CI and the README commands pin exact versions through constraints.txt.
    install_requires=[
        "torch>=2.3",
        "deepspeed>=0.15",
        "transformers>=4.46",
        "accelerate>=0.34",
        "datasets>=2.20",
        "fsspec>=2023.1",  # shards at s3:// gs:// hf:// URLs (llave_ds/data/shards/streams.py); datasets needs it too
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10",
        "pyyaml>=6",
        "omegaconf>=2.4",  # the config loader (llave_ds/config.py)
        "tqdm>=4.66",
        "pyarrow>=15",
        "av>=12",  # PyAV (its wheels bundle FFmpeg): video decoding, llave_ds.media.video
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        # model.fused_kernels: liger (Triton kernels: GPU only). llave_ds/model/fused_kernels.py
        # uses Liger's instance-patch helpers as of 0.8.5 (it needs transformers >= 5).
        "liger": ["liger-kernel>=0.8.5"],
        "lora": ["peft>=0.12"],
        "analysis": ["matplotlib>=3.7"],
        # SentenceTransformer(export_dir) (docs/EXPORT.md); images also need a torchvision
        # matching the user's torch build, which is not pulled in here.
        "st": ["sentence-transformers>=6"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "peft>=0.12", "matplotlib>=3.7", "sentence-transformers>=6"],
    },
    entry_points={"console_scripts": ["llave-ds=llave_ds.cli:main"]},
)
