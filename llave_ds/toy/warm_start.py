"""A warm start for the tiny models: short generative pre-training on the synthetic captions, cached.

The paper fine-tunes LMMs that already read images and text (LLaVA-OneVision, Aquila-VL,
pre-trained to caption and answer about images). A randomly initialised tiny model is
far from that regime: contrastive training from it packs every similarity into 0.9-1.0
on the synthetic eval split, and arms started from there differ mostly in noise
(docs/RESULTS.md). `warm_start` mirrors the LLaVA recipe at toy scale: it trains the tiny
model (vision tower, projector, language model, LM head) by next-token prediction of a
scene's caption given its image ("<image> Describe the image." -> "two red circles on the
left"), the same chat template the embedding model reads, then saves an ordinary model
directory (``save_pretrained`` weights + the processor) that ``model.path`` can point at.

It knows models and the synthetic scenes, nothing of contrastive training. The scenes are
drawn afresh with their own jitter (no file of the synthetic dataset is read), from the
same closed set of 144 scenes the synthetic train and eval splits use: the warm model
has seen every caption of the task, as a real LMM has seen the words of MMEB.

Deterministic: fixed seed, one intra-op thread while it trains, so the same inputs give
the same weights on one machine and build. The result is cached by a content hash of the
tiny model's config, the image processor, the synthetic scene spec, the pre-training
hyper-parameters and seed, and the versions of torch / transformers / pillow / llave_ds:
``get_warm_start`` trains once and then returns the cached directory
(``$LLAVE_DS_CACHE/warm_start/<backbone>-s<seed>-<hash>``, default ``~/.cache/llave_ds``).

    python -m llave_ds.toy.warm_start [--steps 300] [--seed 0] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from llave_ds.formats import IMAGE_PLACEHOLDER
from llave_ds.model.backbones import QWEN_BACKBONES

WARM_START_VERSION = 1  # bump when the procedure changes in a way the hashed fields do not show
METADATA_FILE = "llave_ds_warm_start.json"
CAPTION_PROMPT = IMAGE_PLACEHOLDER + "\nDescribe the image."
IGNORE_INDEX = -100


@dataclass(frozen=True)
class WarmStartConfig:
    """What the warm start is made from (every field is part of the cache key).

    seed: the tiny model's initialisation seed (``llave_ds.toy.tiny``) and the seed of the
        caption stream. steps x batch_size captions are seen; lr has a linear warm-up over
        warmup_steps, then a cosine decay to 0.
    """
    backbone: str = "llava_onevision"
    seed: int = 0
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 15
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    image_size: int = 28
    prompt: str = CAPTION_PROMPT
    system_prompt: str = "You are a helpful assistant."
    max_length: int = 128

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class WarmStart:
    """A warm-started model directory and how it was obtained."""
    path: Path
    key_hash: str
    cached: bool          # True: found in the cache, nothing trained
    seconds: float        # time of this call (training included when not cached)
    metadata: Dict[str, Any]


# ------------------------------------------------------------------------------- the cache key

def _package_versions() -> Dict[str, str]:
    import PIL
    import transformers

    from llave_ds import __version__ as llave_version
    return {"torch": torch.__version__, "transformers": transformers.__version__, "pillow": PIL.__version__,
            "llave_ds": str(llave_version), "warm_start": str(WARM_START_VERSION)}


def synthetic_spec(image_size: int) -> Dict[str, Any]:
    """What the captioned scenes are: attribute values, colours, every caption, and a
    fingerprint of the rendering (pixels of a few scenes, no jitter)."""
    from llave_ds.toy.synthetic import ALL_SCENES, ATTRIBUTE_VALUES, BACKGROUND, COLOURS, render_scene

    pixels = hashlib.sha256()
    for scene in ALL_SCENES[::13]:
        pixels.update(render_scene(scene, image_size).tobytes())
    return {"attributes": {k: list(v) for k, v in ATTRIBUTE_VALUES.items()},
            "colours": {k: list(v) for k, v in COLOURS.items()}, "background": list(BACKGROUND),
            "captions": [s.caption() for s in ALL_SCENES], "image_size": image_size,
            "render_sha256": pixels.hexdigest()}


def cache_key(cfg: WarmStartConfig) -> Dict[str, Any]:
    """Everything the warm start's weights depend on, as JSON-able data."""
    from llave_ds.toy.tiny import build_tiny_processor, tiny_config

    model_config = tiny_config(cfg.backbone).to_dict()
    model_config.pop("transformers_version", None)  # in the versions
    image_processor = build_tiny_processor(cfg.backbone).image_processor.to_dict()
    return {"warm_start": dataclasses.asdict(cfg), "model_config": model_config,
            "image_processor": image_processor, "synthetic": synthetic_spec(cfg.image_size),
            "versions": _package_versions()}


def cache_hash(cfg: WarmStartConfig) -> str:
    """SHA-256 of `cache_key` (canonical JSON)."""
    blob = json.dumps(cache_key(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """``$LLAVE_DS_CACHE/warm_start``, default ``~/.cache/llave_ds/warm_start``."""
    root = os.environ.get("LLAVE_DS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llave_ds")
    return Path(root) / "warm_start"


def entry_name(cfg: WarmStartConfig, key_hash: str) -> str:
    return f"{cfg.backbone}-s{cfg.seed}-{key_hash[:16]}"


def read_entry(path: Path, key_hash: str) -> Optional[Dict[str, Any]]:
    """The metadata of a complete cache entry with this hash, or None."""
    try:
        meta = json.loads((Path(path) / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("key_hash") != key_hash or not (Path(path) / "config.json").is_file():
        return None
    return meta


# ------------------------------------------------------------------------------- pre-training

def caption_batch(formatter, scenes: Sequence[Any], images: Sequence[Any], prompt: str) -> Dict[str, torch.Tensor]:
    """Model inputs and labels for "image + prompt -> caption": the formatter's prompt (the
    chat template up to ``<|im_start|>assistant\\n``, as the embedding model reads it), then
    the caption and ``<|im_end|>``; labels are -100 on the prompt and on padding."""
    from llave_ds.media.side import Side

    prompt_inputs = formatter([Side(prompt, img) for img in images], "query")
    tokenizer = formatter.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    lengths = prompt_inputs["attention_mask"].sum(dim=1).tolist()
    rows, labels = [], []
    for i, scene in enumerate(scenes):
        prompt_ids = prompt_inputs["input_ids"][i, :lengths[i]].tolist()  # right padding
        answer = list(tokenizer(scene.caption(), add_special_tokens=False)["input_ids"]) + [end_id]
        rows.append(prompt_ids + answer)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + answer)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), formatter.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_ids = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, labels)):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        label_ids[i, :len(lab)] = torch.tensor(lab)
    out = {k: v for k, v in prompt_inputs.items() if k not in ("input_ids", "attention_mask", "dummy_image")}
    out.update(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids)
    if formatter.backbone in QWEN_BACKBONES:  # the stock forward's M-RoPE positions need them
        out["mm_token_type_ids"] = (input_ids == formatter.image_token_id).to(torch.int32)
    return out


def _lr_factor(step: int, cfg: WarmStartConfig) -> float:
    import math
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def pretrain(cfg: WarmStartConfig, out_dir: Union[str, Path],
             log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Train the tiny model of ``cfg`` on captions and write the model directory to ``out_dir``.

    Returns ``{"losses": [...per step], "seconds": ...}``. Leaves the caller's torch RNG
    state and thread count as they were.
    """
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from llave_ds.model.formatter import InputFormatter
    from llave_ds.model.processors import load_processor
    from llave_ds.toy.synthetic import ALL_SCENES, render_scene
    from llave_ds.toy.tiny import build_tiny_model_dir

    out = Path(out_dir)
    t0 = time.time()
    threads = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards"
    try:
        with tempfile.TemporaryDirectory(prefix="llave_ds_warm_") as tmp, torch.random.fork_rng(devices=[]):
            base = build_tiny_model_dir(Path(tmp) / "base", cfg.backbone, seed=cfg.seed)
            torch.set_num_threads(1)  # one thread: the same sums in the same order on every machine
            torch.manual_seed(cfg.seed)
            model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
            processor = load_processor(base, cfg.backbone)
            formatter = InputFormatter(processor, cfg.backbone, max_length=cfg.max_length,
                                       system_prompt=cfg.system_prompt)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            # The caption stream's seed string keeps its first spelling (the module was llave_ds.warm_start).
            rng = random.Random(f"llave_ds.warm_start/{cfg.seed}")
            losses: List[float] = []
            for step in range(cfg.steps):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, cfg)
                scenes = [rng.choice(ALL_SCENES) for _ in range(cfg.batch_size)]
                images = [render_scene(s, cfg.image_size, rng) for s in scenes]
                batch = caption_batch(formatter, scenes, images, cfg.prompt)
                loss = model(**batch, use_cache=False).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                losses.append(float(loss.detach()))
                if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
                    log(f"[warm start] step {step + 1}/{cfg.steps} caption loss {losses[-1]:.3f}")
            model.eval()
            # The base directory's processor, tokenizer and preprocessor files, then the trained weights.
            out.mkdir(parents=True, exist_ok=True)
            for f in base.iterdir():
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "llave_ds_tiny.json":
                    shutil.copy2(f, out / f.name)
            model.save_pretrained(out)
    finally:
        torch.set_num_threads(threads)
        if bars:
            hf_logging.enable_progress_bar()
    return {"losses": losses, "seconds": time.time() - t0}


def get_warm_start(cfg: Optional[WarmStartConfig] = None, cache_dir: Union[str, Path, None] = None,
                   log: Optional[Callable[[str], None]] = None) -> WarmStart:
    """The warm-started model directory of ``cfg``: from the cache, or trained and cached now.

    The entry is written under a temporary name and renamed into place, so an interrupted
    run leaves no half entry and two concurrent runs both end with one complete entry.
    """
    cfg = cfg or WarmStartConfig()
    t0 = time.time()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(cfg)
    key_hash = cache_hash(cfg)
    path = root / entry_name(cfg, key_hash)
    meta = read_entry(path, key_hash)
    if meta is not None:
        if log is not None:
            log(f"[warm start] cached: {path}")
        return WarmStart(path=path, key_hash=key_hash, cached=True, seconds=time.time() - t0, metadata=meta)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key_hash[:16]}-", dir=root))
    try:
        if log is not None:
            log(f"[warm start] not cached: {cfg.steps} caption steps of {cfg.batch_size} -> {path}")
        result = pretrain(cfg, tmp, log=log)
        losses = result["losses"]
        k = max(1, min(10, len(losses) // 4))
        meta = {"key_hash": key_hash, "key": key, "train_seconds": round(result["seconds"], 2),
                "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "losses": losses,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if path.exists():  # an incomplete leftover (a complete one was returned above)
            if read_entry(path, key_hash) is None:
                shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if read_entry(path, key_hash) is None:  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = read_entry(path, key_hash)
    return WarmStart(path=path, key_hash=key_hash, cached=False, seconds=time.time() - t0, metadata=meta or {})


def main(argv: Optional[Sequence[str]] = None) -> int:
    defaults = WarmStartConfig()
    p = argparse.ArgumentParser(prog="python -m llave_ds.toy.warm_start", description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default=defaults.backbone)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    args = p.parse_args(argv)
    cfg = WarmStartConfig(backbone=args.backbone, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr)
    ws = get_warm_start(cfg, args.cache_dir, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps({"path": str(ws.path), "cached": ws.cached, "seconds": round(ws.seconds, 1),
                      "key_hash": ws.key_hash, "loss_first": ws.metadata.get("loss_first"),
                      "loss_last": ws.metadata.get("loss_last")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
