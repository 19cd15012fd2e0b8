"""llave_ds.toy.warm_start: the cache (hit, miss, what the key covers), determinism, the
caption loss going down, and the result being a model directory training can start from."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llave_ds.toy import tiny
from llave_ds.toy import warm_start as ws
from llave_ds.toy.warm_start import METADATA_FILE, WarmStartConfig, cache_hash, get_warm_start

SMALL = dict(steps=3, batch_size=4, warmup_steps=1)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """One small warm start trained into a fresh cache."""
    root = tmp_path_factory.mktemp("warm_cache")
    return root, get_warm_start(WarmStartConfig(**SMALL), root)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_cache_hit_on_same_config_miss_on_changed_one(cached, tmp_path):
    root, first = cached
    assert not first.cached and first.path.parent == root
    meta = json.loads((first.path / METADATA_FILE).read_text())
    assert meta["key_hash"] == first.key_hash == cache_hash(WarmStartConfig(**SMALL))
    assert len(meta["losses"]) == SMALL["steps"]
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns

    again = get_warm_start(WarmStartConfig(**SMALL), root)
    assert again.cached and again.path == first.path and again.key_hash == first.key_hash
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp   # nothing rewritten

    changed = get_warm_start(WarmStartConfig(**{**SMALL, "lr": 1e-3}), root)
    assert not changed.cached and changed.path != first.path and changed.key_hash != first.key_hash
    assert sorted(p.name for p in root.iterdir()) == sorted([first.path.name, changed.path.name])  # no temp left


def test_cache_key_covers_model_config_scenes_seed_and_versions(monkeypatch):
    base = cache_hash(WarmStartConfig(**SMALL))
    assert cache_hash(WarmStartConfig(**SMALL)) == base
    assert cache_hash(WarmStartConfig(**{**SMALL, "seed": 1})) != base
    assert cache_hash(WarmStartConfig(**{**SMALL, "batch_size": 5})) != base
    with monkeypatch.context() as m:  # the tiny model's config
        m.setattr(tiny, "TINY_INITIALIZER_RANGE", 0.05)
        assert cache_hash(WarmStartConfig(**SMALL)) != base
    with monkeypatch.context() as m:  # the synthetic scenes (their captions)
        from llave_ds.toy import synthetic
        m.setattr(synthetic, "_PLACE_PHRASES", {**synthetic._PLACE_PHRASES, "left": "at the left"})
        assert cache_hash(WarmStartConfig(**SMALL)) != base
    with monkeypatch.context() as m:  # package versions
        m.setattr(ws, "_package_versions", lambda: {"torch": "0.0", "transformers": "0.0"})
        assert cache_hash(WarmStartConfig(**SMALL)) != base
    assert cache_hash(WarmStartConfig(**SMALL)) == base


def test_incomplete_entry_is_rebuilt(cached, tmp_path):
    _, first = cached
    root = tmp_path / "cache"
    half = root / first.path.name
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")          # an interrupted copy: no metadata
    made = get_warm_start(WarmStartConfig(**SMALL), root)
    assert not made.cached and made.path == half and (half / METADATA_FILE).is_file()
    # Deterministic: the rebuilt entry has exactly the weights of the first one.
    a, b = weights(first.path), weights(made.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((half / METADATA_FILE).read_text())["losses"] == first.metadata["losses"]


def test_caption_loss_decreases_and_rng_is_left_alone(tmp_path):
    state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    out = ws.pretrain(WarmStartConfig(steps=24, batch_size=8, warmup_steps=2), tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_num_threads() == threads
    losses = out["losses"]
    assert len(losses) == 24 and all(l == l for l in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, losses


def test_warm_start_is_a_model_directory_training_reads(cached):
    from llave_ds.model.backbones import detect_backbone
    from llave_ds.model.embedding import ModelConfig, load_embedding_model

    _, first = cached
    assert detect_backbone(first.path) == "llava_onevision"
    model, processor = load_embedding_model(ModelConfig(path=str(first.path), dtype="float32"))
    assert processor is not None and model.backbone == "llava_onevision"
    # The saved weights are the pre-trained ones, not the initialisation.
    init = tiny.build_tiny_model("llava_onevision", seed=0).lm_head.weight
    assert not torch.equal(model.hf_model.lm_head.weight, init)


def test_caption_batch_labels_only_the_caption():
    from llave_ds.model.formatter import InputFormatter
    from llave_ds.toy.synthetic import ALL_SCENES, render_scene

    processor = tiny.build_tiny_processor("llava_onevision")
    fmt = InputFormatter(processor, "llava_onevision", max_length=128)
    scenes = [ALL_SCENES[0], ALL_SCENES[77]]
    batch = ws.caption_batch(fmt, scenes, [render_scene(s) for s in scenes], ws.CAPTION_PROMPT)
    tok = processor.tokenizer
    for i, scene in enumerate(scenes):
        labelled = batch["labels"][i][batch["labels"][i] != ws.IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == scene.caption() + "<|im_end|>"
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(labelled):n].tolist() == labelled   # the caption ends the row
        assert tok.decode(batch["input_ids"][i, :n - len(labelled)]).endswith("<|im_start|>assistant\n")
    assert batch["pixel_values"].shape[0] == 2 and "image_sizes" in batch
