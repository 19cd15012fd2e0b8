"""EmbeddingModel: last-token pooling, normalisation, freezing, LoRA, dummy image, ZeRO-3."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llave_ds.toy import tiny  # noqa: E402
from llave_ds.model.backbones import QWEN_BACKBONES  # noqa: E402
from llave_ds.model.embedding import (EmbeddingModel, ModelConfig, build_embedding_model_from_config,  # noqa: E402
                                      last_token_index, load_embedding_model, trainable_parameters)
from llave_ds.model.checkpointing import decoder_layers  # noqa: E402
from llave_ds.model.formatter import InputFormatter  # noqa: E402
from tests.multimodal import ALL_BACKBONES, Side, check_cached_second_pass, noise_image  # noqa: E402



def image_sides():
    return [Side("<|image_1|>\nwhat is shown here, in detail?", noise_image(40, 50, 1)),
            Side("a text-only row of medium length"),
            Side("x", noise_image(56, 28, 2)),
            Side("<|image_1|> short", noise_image(30, 30, 3))]


def text_sides():
    return [Side("first text-only side"), Side("second, a bit longer, text-only side"), Side("3")]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_model")
    return {bb: str(tiny.build_tiny_model_dir(root / bb, bb)) for bb in ALL_BACKBONES}


def load(tiny_dirs, backbone, **overrides):
    cfg = ModelConfig(path=tiny_dirs[backbone], dtype="float32", **overrides)
    return load_embedding_model(cfg)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def assert_same_grads(reference, model):
    """Every parameter's gradient of ``model`` equals ``reference``'s (None where it is None; fp32)."""
    ref, got = grads(reference), grads(model)
    for name, g in ref.items():
        if g is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5)


# Qwen3-VL's DeepStack mergers project intermediate tower features into the LM like the
# main merger: projectors, trained with it.
QWEN_PROJECTORS = (".visual.merger.", ".visual.deepstack_merger_list.")


def is_vision_tower(name, backbone):
    if backbone == "llava_onevision":
        return ".vision_tower." in name
    return ".visual." in name and not any(p in name for p in QWEN_PROJECTORS)


def is_projector(name, backbone):
    if backbone == "llava_onevision":
        return ".multi_modal_projector." in name or name.endswith("image_newline")
    return any(p in name for p in QWEN_PROJECTORS)


def is_language_model(name):
    return ".language_model." in name


def test_last_token_index_for_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 4, 0]


def stock_last_hidden_state(model, batch):
    """The backbone's own forward (default positions), independent of EmbeddingModel."""
    inner = model.base_hf_model.model
    kwargs = {k: v for k, v in batch.items() if k != "dummy_image"}
    if model.backbone in QWEN_BACKBONES:  # the stock forward's M-RoPE needs these
        kwargs["mm_token_type_ids"] = (batch["input_ids"] == inner.config.image_token_id).int()
    return inner(**kwargs, use_cache=False).last_hidden_state


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_pooling_takes_last_non_pad_token_under_left_and_right_padding(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone)
    model.eval()
    embeddings = {}
    for side in ("right", "left"):
        batch = InputFormatter(processor, backbone, max_length=256, padding_side=side)(image_sides(), "query")
        lengths = batch["attention_mask"].sum(1)
        width = batch["input_ids"].shape[1]
        assert len(set(lengths.tolist())) > 1  # rows really differ in length
        hand_index = lengths - 1 if side == "right" else torch.full_like(lengths, width - 1)
        with torch.no_grad():
            emb = model(**batch)
            hidden = stock_last_hidden_state(model, batch)
        rows = torch.arange(len(lengths))
        expected = F.normalize(hidden[rows, hand_index].float(), dim=-1)
        assert emb.dtype == torch.float32 and emb.shape == (4, model.hidden_size)
        torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4), atol=1e-6, rtol=0)
        if side == "left":  # the classic bug: counting tokens under left padding picks pad positions
            wrong = F.normalize(hidden[rows, lengths - 1].float(), dim=-1)
            assert (emb - wrong).abs().max() > 1e-3
        embeddings[side] = emb
    torch.testing.assert_close(embeddings["right"], embeddings["left"], atol=1e-5, rtol=1e-5)


def backward_on(model, batch):
    model.zero_grad(set_to_none=True)
    emb = model(**batch)
    weights = torch.linspace(-1.0, 1.0, emb.numel()).view_as(emb)  # a non-degenerate loss
    (emb * weights).sum().backward()


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_default_freezing_vision_tower_frozen_projector_and_llm_train(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone)
    backward_on(model, InputFormatter(processor, backbone)(image_sides(), "query"))
    g = grads(model)
    tower = [n for n in g if is_vision_tower(n, backbone)]
    projector = [n for n in g if is_projector(n, backbone)]
    llm = [n for n in g if is_language_model(n)]
    assert tower and projector and llm
    assert all(g[n] is None for n in tower)
    assert all(g[n] is not None for n in projector) and any(g[n].abs().sum() > 0 for n in projector)
    assert all(g[n] is not None for n in llm) and any(g[n].abs().sum() > 0 for n in llm)
    head = model.base_hf_model.lm_head.weight
    if backbone == "llava_onevision":  # untied head: never run, so frozen
        assert not head.requires_grad and head.grad is None
    else:  # tied head = the input embedding, which trains
        assert head.requires_grad and head.grad is not None
    assert all(p.requires_grad for p in trainable_parameters(model))


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_freeze_projector(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone, freeze_projector=True)
    backward_on(model, InputFormatter(processor, backbone)(image_sides(), "query"))
    g = grads(model)
    assert all(g[n] is None for n in g if is_projector(n, backbone) or is_vision_tower(n, backbone))
    assert any(g[n] is not None for n in g if is_language_model(n))


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_lora_trains_only_language_model_adapters(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone, lora_r=4, lora_alpha=8)
    backward_on(model, InputFormatter(processor, backbone)(image_sides(), "query"))
    g = grads(model)
    lora = [n for n in g if "lora_" in n]
    assert lora and all(is_language_model(n) for n in lora)
    assert any(n.endswith("q_proj.lora_A.default.weight") for n in lora)
    assert all(g[n] is not None for n in lora) and any(g[n].abs().sum() > 0 for n in lora)
    assert all(g[n] is None for n in g if "lora_" not in n)
    assert model.base_hf_model.__class__.__name__.endswith("ForConditionalGeneration")


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_text_only_chunk_runs_vision_tower_on_dummy_with_zero_gradient(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone, freeze_vision_tower=False)
    fmt = InputFormatter(processor, backbone)
    backward_on(model, fmt(image_sides(), "query"))
    vision_used = [n for n, g in grads(model).items()
                   if g is not None and (is_vision_tower(n, backbone) or is_projector(n, backbone))]
    assert any(is_vision_tower(n, backbone) for n in vision_used)

    batch = fmt(text_sides(), "query")
    assert bool(batch["dummy_image"])
    backward_on(model, batch)
    g = grads(model)
    for name in vision_used:  # in the graph, with an exactly zero gradient
        assert g[name] is not None, name
        assert torch.count_nonzero(g[name]) == 0, name
    assert any(g[n] is not None and g[n].abs().sum() > 0 for n in g if is_language_model(n))

    # the dummy changes nothing in the output
    model.eval()
    text_only = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), model(**text_only), atol=0, rtol=0)


def test_dummy_image_runs_vision_between_embedding_and_language_model(tiny_dirs):
    """Same module order as a real image chunk: what keeps ZeRO-3 gathers in step."""
    model, processor = load(tiny_dirs, "llava_onevision")
    inner = model.base_hf_model.model
    watched = {"embed": inner.get_input_embeddings(), "vision": inner.vision_tower,
               "projector": inner.multi_modal_projector, "llm_layer0": inner.language_model.layers[0]}
    fmt = InputFormatter(processor, "llava_onevision")
    orders = []
    for sides in (image_sides(), text_sides()):
        order = []
        handles = [m.register_forward_pre_hook(lambda *_, k=k: order.append(k)) for k, m in watched.items()]
        with torch.no_grad():
            model(**fmt(sides, "query"))
        for h in handles:
            h.remove()
        orders.append(order)
    assert orders[0] == orders[1] == ["embed", "vision", "projector", "llm_layer0"]


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_dirs, mode):
    batch = InputFormatter(tiny.build_tiny_processor("qwen2_vl"), "qwen2_vl")(image_sides(), "query")
    reference, _ = load(tiny_dirs, "qwen2_vl")
    checkpointed, _ = load(tiny_dirs, "qwen2_vl", gradient_checkpointing=mode)
    assert checkpointed.base_hf_model.model.language_model.gradient_checkpointing
    reference.train()
    checkpointed.train()
    backward_on(reference, batch)
    backward_on(checkpointed, batch)
    assert_same_grads(reference, checkpointed)


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_selective_checkpointing_recomputes_every_kth_layer_with_the_same_gradients(tiny_dirs, backbone):
    """checkpoint_every=2: layers 0, 2, ... run their forward again in the backward, the others
    once; the gradients are those of the model without checkpointing (fp32)."""
    reference, processor = load(tiny_dirs, backbone)
    batch = InputFormatter(processor, backbone)(image_sides(), "query")
    checkpointed, _ = load(tiny_dirs, backbone, gradient_checkpointing="non_reentrant", checkpoint_every=2)
    layers = decoder_layers(checkpointed.base_hf_model)
    calls = [0] * len(layers)
    # transformers checkpoints a layer's forward, not its __call__: count a sub-module's calls
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    reference.train()
    checkpointed.train()
    backward_on(reference, batch)
    backward_on(checkpointed, batch)
    for h in handles:
        h.remove()
    assert [layer.gradient_checkpointing for layer in layers] == [i % 2 == 0 for i in range(len(layers))]
    assert calls == [2 if i % 2 == 0 else 1 for i in range(len(layers))]
    assert_same_grads(reference, checkpointed)


def test_model_config_validation_and_auto_attention(tiny_dirs, caplog):
    with pytest.raises(ValueError, match="llava_onevision, qwen2_vl"):
        ModelConfig(backbone="clip")
    with pytest.raises(ValueError, match="non_reentrant"):
        ModelConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="bfloat16"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ValueError, match="qwen2_vl"):
        load_embedding_model(ModelConfig(path=tiny_dirs["llava_onevision"], backbone="qwen2_vl"))
    with caplog.at_level(logging.INFO, logger="llave_ds.model.embedding"):
        model, _ = load(tiny_dirs, "qwen2_vl")
    assert "attention implementation: sdpa (requested auto)" in caplog.text  # no CUDA here
    assert model.base_hf_model.config._attn_implementation == "sdpa"
    assert model.backbone == "qwen2_vl"


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_build_from_config_and_metadata(backbone):
    model = build_embedding_model_from_config(tiny.tiny_config(backbone), ModelConfig(dtype="float32"))
    assert isinstance(model, EmbeddingModel) and model.backbone == backbone
    fmt = InputFormatter(tiny.build_tiny_processor(backbone), backbone, query_instruction="Q: ")
    with torch.no_grad():
        emb = model(**fmt(image_sides(), "query"))
    assert emb.shape == (4, 64)
    meta = model.embedding_metadata(fmt)
    assert meta["pooling"] == "last_token" and meta["normalized"] is True
    assert meta["backbone"] == backbone and meta["dim"] == 64
    assert meta["input_format"]["query_instruction"] == "Q: "


# ----------------------------------------------------------------------------------------
# ZeRO-3 on 2 CPU ranks
# ----------------------------------------------------------------------------------------

def zero3_sides(rank):
    """Rank 0 text-only (dummy image), rank 1 with an image: the modules must still match."""
    if rank == 0:
        return [Side("just text"), Side("more text on rank zero")]
    return [Side("<|image_1|>\nan image", noise_image(40, 50, 5)), Side("text row")]


ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 10 ** 9,
}


def zero3_worker(rank, world_size, dirs):
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30 s JIT build
    torch.set_num_threads(1)
    results = {}
    for backbone, path in dirs.items():
        cfg = ModelConfig(path=path, dtype="float32", freeze_vision_tower=False)
        model, processor = load_embedding_model(cfg, deepspeed_config=ZERO3_CONFIG)
        params = list(model.parameters())
        assert all(hasattr(p, "ds_tensor") for p in params), "not partitioned by zero.Init"
        local = sum(p.ds_tensor.numel() for p in params)
        total = sum(p.ds_numel for p in params)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(trainable_parameters(model), lr=1e-3),
            config=ZERO3_CONFIG)
        batch = InputFormatter(processor, backbone, max_length=128)(zero3_sides(rank), "query")
        emb = engine(**batch)
        engine.backward(emb.sum())
        engine.step()
        results[backbone] = {"local": local, "total": total, "n_params": len(params),
                             "embeddings": emb.detach().clone()}
    return results


@pytest.mark.timeout(240)
def test_zero3_loading_partitions_parameters_and_ranks_with_and_without_images_agree(tiny_dirs):
    from tests.distributed_harness import run_distributed, values

    outcomes = values(run_distributed(zero3_worker, 2, tiny_dirs, timeout_s=150, collective_timeout_s=60))
    for backbone in ALL_BACKBONES:
        model, processor = load(tiny_dirs, backbone, freeze_vision_tower=False)
        model.eval()
        total_plain = sum(p.numel() for p in model.parameters())
        for rank, result in enumerate(outcomes):
            r = result[backbone]
            assert r["total"] == total_plain
            # each rank holds its half (per-parameter padding to the world size aside)
            assert total_plain / 2 <= r["local"] <= total_plain / 2 + r["n_params"]
            # weights really came from the checkpoint: same embeddings as an unsharded model
            batch = InputFormatter(processor, backbone, max_length=128)(zero3_sides(rank), "query")
            with torch.no_grad():
                torch.testing.assert_close(r["embeddings"], model(**batch), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Qwen2.5-VL specifics: fetch units, M-RoPE positions, the frozen-vision cache's window order
# ----------------------------------------------------------------------------------------

def test_qwen2_5_vl_zero3_fetch_units_are_its_decoder_layer_and_vision_block():
    model = build_embedding_model_from_config(tiny.tiny_config("qwen2_5_vl"), ModelConfig(dtype="float32"))
    inner = model.base_hf_model.model
    units = model.zero3_fetch_units()
    assert units == ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    # ... which are the classes of the repeated blocks themselves, not just declared names.
    assert {type(layer).__name__ for layer in inner.language_model.layers} == {units[0]}
    assert {type(block).__name__ for block in inner.visual.blocks} == {units[1]}


def test_qwen2_5_vl_positions_are_mrope_not_sequential(tiny_dirs):
    """The embedding equals the stock forward with its own M-RoPE positions (the pooling test)
    and differs from one with plain 1-D positions: the image grid reaches the positions."""
    model, processor = load(tiny_dirs, "qwen2_5_vl")
    model.eval()
    batch = InputFormatter(processor, "qwen2_5_vl", max_length=256)(image_sides(), "query")
    inner = model.base_hf_model.model
    mask = batch["attention_mask"]
    sequential = ((mask.cumsum(-1) - 1).clamp(min=0))[None].expand(3, -1, -1)
    with torch.no_grad():
        emb = model(**batch)
        flat = inner(input_ids=batch["input_ids"], attention_mask=mask, position_ids=sequential,
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     use_cache=False).last_hidden_state
    flat = F.normalize(flat[torch.arange(4), last_token_index(mask)].float(), dim=-1)
    image_rows = [0, 2, 3]
    assert (emb[image_rows] - flat[image_rows]).abs().max() > 1e-4
    torch.testing.assert_close(emb[1], flat[1], atol=1e-5, rtol=1e-5)  # text only: same positions


def qwen2_5_vl_window_images():
    """Images whose merged grids span several 2x2 windows (window order != identity)."""
    return [Side("<|image_1|>\nwhat is it", noise_image(40, 50, 11)), Side("x", noise_image(56, 28, 12)),
            Side("y", noise_image(30, 30, 13)), Side("z", noise_image(70, 90, 14))]


def test_qwen2_5_vl_vision_cache_replays_the_window_order_exactly(tiny_dirs):
    from transformers.vision_utils import get_vision_window_index

    model, processor = load(tiny_dirs, "qwen2_5_vl")
    assert model.vision_cache is not None  # frozen tower (default): cache on
    batch = InputFormatter(processor, "qwen2_5_vl", max_length=256)(qwen2_5_vl_window_images(), "query")
    visual = model.base_hf_model.model.visual
    window_index, _ = get_vision_window_index(batch["image_grid_thw"], visual.spatial_merge_size,
                                              visual.window_size, visual.patch_size)
    assert not torch.equal(window_index, torch.arange(len(window_index)))
    model.eval()
    with torch.no_grad():
        model(**batch)  # pass 1: keeps the entry
        direct = model.vision_cache._original(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
    (entry,) = model.vision_cache._entries.values()
    replayed = model.vision_cache._replay(entry.features)
    assert torch.equal(replayed.last_hidden_state, direct.last_hidden_state)
    assert torch.equal(replayed.pooler_output, direct.pooler_output)
    # Without the reverse index the merged features would come out in window order: wrong.
    assert not torch.equal(visual.merger(entry.features[0]), direct.pooler_output)


def test_qwen2_5_vl_gradcache_second_pass_skips_tower_with_exact_gradients(tiny_dirs):
    model, processor = load(tiny_dirs, "qwen2_5_vl", attn_implementation="sdpa")
    ref, _ = load(tiny_dirs, "qwen2_5_vl", attn_implementation="sdpa", cache_frozen_vision=False)
    fmt = InputFormatter(processor, "qwen2_5_vl", max_length=128, system_prompt="E")
    trained = check_cached_second_pass(model, ref, fmt, qwen2_5_vl_window_images())
    assert any(".visual.merger." in n for n in trained)


def test_backbone_without_vision_cache_installer_runs_the_tower(tiny_dirs, monkeypatch):
    import llave_ds.model.embedding as model_module

    cached, processor = load(tiny_dirs, "qwen2_5_vl")
    monkeypatch.delitem(model_module.VISION_CACHE_INSTALLERS, "qwen2_5_vl")
    uncached, _ = load(tiny_dirs, "qwen2_5_vl")
    assert cached.vision_cache is not None and uncached.vision_cache is None
    fmt = InputFormatter(processor, "qwen2_5_vl")
    for sides in (image_sides(), text_sides()):
        batch = fmt(sides, "query")
        with torch.no_grad():
            torch.testing.assert_close(uncached(**batch), cached(**batch), atol=0, rtol=0)


# ------------------------------------------------------- the padding mask (padding_mask="auto")

def _mask_seen_by_language_model(model, batch):
    """Run a forward; return the attention_mask the language model received, after checking
    that its first attention layer got a mask exactly when the model did (transformers drops
    a redundant one itself, and builds a block mask from positions it reads as packed)."""
    seen, in_layer = [], []
    lm = model.base_hf_model.model.language_model
    attention = next(m for name, m in lm.named_modules() if name.endswith("self_attn"))
    handles = [lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True),
               attention.register_forward_pre_hook(lambda m, a, kw: in_layer.append(kw.get("attention_mask")),
                                                   with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    assert (in_layer[0] is None) == (seen[0] is None)
    return seen[0]


@pytest.mark.parametrize("backbone", ALL_BACKBONES)
def test_dropping_the_redundant_padding_mask_changes_no_embedding_or_gradient(tiny_dirs, backbone):
    """Right padding + causal attention: no real token sees the padding, so the language model
    runs without the mask ("auto") and every embedding and gradient equals the masked run's
    (fp32), for image rows, text rows with the dummy image, and M-RoPE positions."""
    model, processor = load(tiny_dirs, backbone)
    fmt = InputFormatter(processor, backbone, max_length=256)
    for sides in (image_sides(), text_sides()):
        batch = fmt(sides, "query")
        assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # rows really are padded
        results = {}
        for mode in ("always", "auto"):
            model.model_config.padding_mask = mode
            seen = _mask_seen_by_language_model(model, batch)
            assert (seen is None) == (mode == "auto")
            backward_on(model, batch)
            with torch.no_grad():
                emb = model(**batch)
            results[mode] = emb, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        (emb_masked, g_masked), (emb_free, g_free) = results["always"], results["auto"]
        torch.testing.assert_close(emb_free, emb_masked, atol=1e-6, rtol=0)
        assert g_free.keys() == g_masked.keys() and g_free
        for name in g_masked:
            scale = max(g_masked[name].abs().max().item(), 1e-12)
            assert (g_free[name] - g_masked[name]).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("backbone", ["llava_onevision", "qwen3_vl"])
def test_left_padding_keeps_the_mask(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone)
    batch = InputFormatter(processor, backbone, padding_side="left")(image_sides(), "query")
    seen = _mask_seen_by_language_model(model, batch)
    assert seen is not None and torch.equal(seen, batch["attention_mask"])
    # and one row of equal lengths (no padding at all) needs none
    full = InputFormatter(processor, backbone)([Side("same"), Side("same")], "query")
    assert _mask_seen_by_language_model(model, full) is None
