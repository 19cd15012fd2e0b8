"""The offline assets most end-to-end tests share: synthetic MMEB data and a tiny model."""
from __future__ import annotations

from pathlib import Path


def build_demo_assets(root: Path, *, train_per_subset: int = 12, eval_per_subset: int = 4,
                      data_seed: int = 3, model_seed: int = 1, backbone: str = "llava_onevision") -> dict:
    """Synthetic data under ``root/data`` and a tiny model under ``root/tiny``; the paths
    the demo config's ``data.source`` / ``data.image_root`` / ``model.path`` take."""
    from llave_ds.toy.synthetic import prepare_synthetic_mmeb
    from llave_ds.toy.tiny import build_tiny_model_dir
    train_dir, image_root = prepare_synthetic_mmeb(Path(root) / "data", num_train_per_subset=train_per_subset,
                                                   num_eval_per_subset=eval_per_subset, seed=data_seed)
    model_dir = build_tiny_model_dir(Path(root) / "tiny", backbone, seed=model_seed)
    return {"train": str(train_dir), "images": str(image_root), "model": str(model_dir),
            "eval": str(Path(root) / "data" / "eval"), "root": Path(root)}


# The synthetic subsets re-laid as a hub download of MMEB-train would be (directories named
# after official training subsets, "original" shards), plus two of the evaluation
# directories the hub repository also holds: one without an "original" split.
OFFICIAL_LAYOUT = {"Synth_CLS": "ImageNet_1K", "Synth_I2T": "CIRR", "Synth_VQA": "FashionIQ", "Synth_T2I": "ImageNet-A"}


def official_train_layout(assets: dict, root: Path) -> Path:
    """``root`` holding the synthetic training rows in MMEB-train's hub layout
    (``<Subset>/<split>-00000-of-00001.parquet``); images stay under ``assets["images"]``.
    ImageNet_1K and CIRR are official training subsets; FashionIQ (with an original split)
    and ImageNet-A (test split only) are evaluation directories the hub repo also holds."""
    import shutil
    root = Path(root)
    for synth, name in OFFICIAL_LAYOUT.items():
        split = "test" if name == "ImageNet-A" else "original"
        (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(assets["train"]) / f"{synth}.parquet", root / name / f"{split}-00000-of-00001.parquet")
    return root
