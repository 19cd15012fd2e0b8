"""llave_ds.training.memory_plan: checkpointing and ZeRO-3 persistence chosen from the memory
model (issue 25, levers 2 and 3), on the real 2B and Qwen3-VL-2B shapes (meta-device models for
the parameter sizes), and selective checkpointing in the activation formula."""
import logging

import pytest
import torch
from transformers import AutoModelForImageTextToText

from llave_ds.bench import shapes
from llave_ds.training import cost
from llave_ds.training import memory_plan as mp
from llave_ds.training.cost import GIB

ZERO3 = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 2e8, "stage3_prefetch_bucket_size": 2e8,
                               "stage3_max_live_parameters": 1e9, "stage3_param_persistence_threshold": 100000}}


def sizes_of(config):
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return [p.numel() for p in model.parameters()]


@pytest.fixture(scope="module")
def two_b():
    cfg = shapes.shape_config("2b")
    return cfg, cost.param_counts(cfg), sizes_of(cfg)


def plan(two_b, budget_gib, **kw):
    cfg, counts, sizes = two_b
    settings = dict(stage=3, world=8, param_bytes=2, reduction="coalesced", ds_config=ZERO3, padding_mask=False,
                    checkpointing="auto", persistence="auto")
    settings.update(kw)
    chunk = mp.worst_chunk(cfg, chunk_rows=16, max_length=2048, step_rows=64)
    return mp.plan_memory(cfg, counts, sizes, chunk, budget_bytes=None if budget_gib is None else budget_gib * GIB,
                          **settings)


def test_selective_checkpointing_in_the_activation_formula_by_hand():
    cfg = shapes.shape_config("2b")
    L, d = cfg.text_config.num_hidden_layers, cfg.text_config.hidden_size
    off = cost.activation_bytes_per_token(cfg, False, 1600)
    for every in (1, 2, 3, 28):
        n = len(range(0, L, every))
        got = cost.activation_bytes_per_token(cfg, True, 1600, checkpoint_every=every)
        assert got["kept"] == n * 2 * d + (L - n) * off["per_layer"] + off["once"]
        assert got["transient"] == off["per_layer"] and got["checkpointed_layers"] == n
    assert cost.checkpointed_share(cfg, 3) == 10 / 28
    fwd = {"vision": 0.0, "proj1": 0.0, "proj2": 0.0, "llm": 280.0, "llm_pad": 28.0, "vision_dummy": 0.0,
           "proj_dummy": 0.0}
    assert cost.step_flops(fwd, cached=True, checkpointing=10 / 28)["checkpoint_recompute"] == pytest.approx(110.0)
    assert cost.step_flops(fwd, cached=True, checkpointing=True)["checkpoint_recompute"] == 308.0


def test_checkpointing_options_go_from_least_to_most_recompute():
    options = mp.checkpointing_options(28)
    assert options[0] == ("off", 1) and options[-1] == ("non_reentrant", 1)
    counts = [len(range(0, 28, k)) for _, k in options[1:]]
    assert counts == sorted(set(counts)) and counts[0] == 1 and counts[-1] == 28


def test_persistence_threshold_by_hand():
    sizes = [10, 10, 20, 30]
    # world 2, 2 bytes: keeping an element whole costs 2 * (1 - 1/2) = 1 byte more
    assert mp.persistence_threshold(sizes, 19, 2, 2) == 0      # both 10s together cost 20
    assert mp.persistence_threshold(sizes, 20, 2, 2) == 10
    assert mp.persistence_threshold(sizes, 45, 2, 2) == 20     # 20 + 20 = 40; the 30 would make 70
    assert mp.persistence_threshold(sizes, 70, 2, 2) == 30
    assert mp.persistence_threshold(sizes, 0, 2, 1) == 30      # one rank: whole costs nothing more


def test_the_plan_takes_the_least_recompute_that_fits(two_b):
    ample = plan(two_b, 1000)
    assert ample.checkpointing == "off" and ample.fits and ample.options[0]["policy"] == "off"
    off_gib = ample.options[0]["predicted_gib"]
    every_layer = plan(two_b, 1000, checkpointing="non_reentrant", persistence="config").predicted["total"] / GIB
    for budget in (off_gib - 1, (off_gib + every_layer) / 2, every_layer + 0.5):
        p = plan(two_b, budget, persistence="config")
        assert p.checkpointing == "non_reentrant" and p.fits
        assert p.predicted["total"] <= budget * GIB
        # every option tried before the chosen one (less recompute) was over the budget
        assert all(o["predicted_gib"] > budget for o in p.options[:-1])
        assert p.options[-1]["predicted_gib"] == pytest.approx(p.predicted["total"] / GIB)
    every_2nd = plan(two_b, 1000, checkpointing="non_reentrant", checkpoint_every=2,
                     persistence="config").predicted["total"] / GIB
    assert plan(two_b, every_2nd + 0.5, persistence="config").checkpoint_every == 2
    assert plan(two_b, every_2nd - 0.5, persistence="config").checkpoint_every == 1


def test_nothing_fits_means_every_layer_and_a_warning(two_b, caplog):
    with caplog.at_level(logging.WARNING, logger="llave_ds.training.memory_plan"):
        p = plan(two_b, 5)
    assert (p.checkpointing, p.checkpoint_every, p.fits) == ("non_reentrant", 1, False)
    assert p.persistence_threshold == 0
    assert "above the budget" in caplog.text and "query_chunk_size" in caplog.text


def test_persistence_spends_the_headroom_left_by_checkpointing(two_b):
    _, _, sizes = two_b
    budget = 1000
    p = plan(two_b, budget)
    assert p.checkpointing == "off" and p.persistence_threshold == max(sizes)   # everything whole
    assert p.persistent_params == sum(sizes)
    tight = plan(two_b, 1000, checkpointing="non_reentrant")                  # every layer: ~16 GiB
    no_persist = plan(two_b, 1000, checkpointing="non_reentrant", persistence="config")
    headroom_gib = 1.0
    limited = plan(two_b, no_persist.predicted["total"] / GIB + headroom_gib, checkpointing="non_reentrant")
    assert 0 < limited.persistence_threshold < max(sizes)
    assert limited.predicted["total"] <= (no_persist.predicted["total"] / GIB + headroom_gib) * GIB
    whole = [s for s in sizes if s <= limited.persistence_threshold]
    assert limited.persistent_params == sum(whole)
    assert tight.predicted["params"] > no_persist.predicted["params"]
    # the DeepSpeed config gets the threshold only when it was planned
    assert limited.apply_to(ZERO3)["zero_optimization"]["stage3_param_persistence_threshold"] == \
        limited.persistence_threshold
    assert no_persist.apply_to(ZERO3) == ZERO3 and no_persist.persistence_threshold is None


def test_no_budget_no_plan_and_zero2_keeps_no_persistence(two_b):
    p = plan(two_b, None)
    assert (p.checkpointing, p.persistence_threshold, p.options) == ("off", None, [])
    z2 = plan(two_b, 1000, stage=2, ds_config={"zero_optimization": {"stage": 2}})
    assert z2.persistence_threshold is None and z2.persistent_params == 0


def test_explicit_checkpointing_is_kept_and_unknown_architectures_are_refused(two_b):
    p = plan(two_b, 10, checkpointing="non_reentrant", checkpoint_every=4, persistence="config")
    assert (p.checkpointing, p.checkpoint_every, p.options) == ("non_reentrant", 4, [])
    cfg = shapes.shape_config("2b")
    qwen2 = type("Cfg", (), {"model_type": "qwen2_vl"})()
    with pytest.raises(ValueError, match="gradient_checkpointing.*auto.*qwen2_vl"):
        mp.plan_memory(qwen2, {}, [], mp.WorstChunk(1, 8), budget_bytes=GIB, stage=3, world=1, param_bytes=2,
                       reduction="coalesced", ds_config={}, padding_mask=False, checkpointing="auto")
    assert cfg.model_type == "llava_onevision"


def test_worst_chunk_bounds_rows_tokens_and_images():
    llava = shapes.shape_config("2b")
    c = mp.worst_chunk(llava, chunk_rows=16, max_length=2048, step_rows=64)
    assert (c.rows, c.width, c.tiles) == (16, 2048, 16 * 3)             # 729-token tiles: 3 cover 2048
    assert mp.worst_chunk(llava, chunk_rows=16, max_length=2048, step_rows=64, chunk_tokens=5000).rows == 2
    assert mp.worst_chunk(llava, chunk_rows=16, max_length=2048, step_rows=64, chunk_tokens=100).rows == 1
    q3 = shapes.shape_config("qwen3-vl-2b")
    c = mp.worst_chunk(q3, chunk_rows=8, max_length=1024, step_rows=64)
    assert (c.patches, c.held_patches) == (8 * 1024 * 4, 56 * 1024 * 4)  # 2x2 merge: 4 patches a token


def test_qwen3_vl_plan():
    cfg = shapes.shape_config("qwen3-vl-2b")
    chunk = mp.worst_chunk(cfg, chunk_rows=32, max_length=2048, step_rows=64)
    kw = dict(stage=3, world=8, param_bytes=2, reduction="coalesced", ds_config=ZERO3, padding_mask=False,
              persistence="config")
    counts, sizes = cost.param_counts(cfg), sizes_of(cfg)
    ample = mp.plan_memory(cfg, counts, sizes, chunk, budget_bytes=1000 * GIB, checkpointing="auto", **kw)
    assert ample.checkpointing == "off"
    half = mp.plan_memory(cfg, counts, sizes, chunk, budget_bytes=1000 * GIB, checkpointing="non_reentrant",
                          checkpoint_every=2, **kw)
    middle = (ample.predicted["total"] + half.predicted["total"]) / 2
    p = mp.plan_memory(cfg, counts, sizes, chunk, budget_bytes=middle, checkpointing="auto", **kw)
    assert p.checkpointing == "non_reentrant" and p.checkpoint_every > 1 and p.predicted["total"] <= middle


def test_memory_config_budget():
    assert mp.MemoryConfig(budget_gib=10).budget_bytes(80 * GIB) == 10 * GIB
    assert mp.MemoryConfig(budget_fraction=0.5).budget_bytes(80 * GIB) == 40 * GIB
    assert mp.MemoryConfig().budget_bytes(None) is None
    with pytest.raises(ValueError, match="memory.budget_fraction"):
        mp.MemoryConfig(budget_fraction=1.5).validate()
    with pytest.raises(ValueError, match="memory.budget_gib"):
        mp.MemoryConfig(budget_gib=0).validate()


def test_build_time_config_starts_with_nothing_persistent():
    built = mp.build_time_ds_config(ZERO3, "auto")
    assert built["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ZERO3["zero_optimization"]["stage3_param_persistence_threshold"] == 100000   # not mutated
    assert mp.build_time_ds_config(ZERO3, "config") is ZERO3
