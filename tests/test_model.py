"""EmbeddingModel: last-token pooling, normalisation, freezing, LoRA, dummy image, ZeRO-3."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llave_ds import tiny  # noqa: E402
from llave_ds.model import (  # noqa: E402
    EmbeddingModel, ModelConfig, build_embedding_model_from_config, last_token_index,
    load_embedding_model, trainable_parameters,
)
from llave_ds.processing import InputFormatter  # noqa: E402
from tests.multimodal import BACKBONES, Side, noise_image  # noqa: E402



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
    return {bb: str(tiny.build_tiny_model_dir(root / bb, bb)) for bb in BACKBONES}


def load(tiny_dirs, backbone, **overrides):
    cfg = ModelConfig(path=tiny_dirs[backbone], dtype="float32", **overrides)
    return load_embedding_model(cfg)


def grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def is_vision_tower(name, backbone):
    if backbone == "llava_onevision":
        return ".vision_tower." in name
    return ".visual." in name and ".merger." not in name


def is_projector(name, backbone):
    if backbone == "llava_onevision":
        return ".multi_modal_projector." in name or name.endswith("image_newline")
    return ".visual.merger." in name


def is_language_model(name):
    return ".language_model." in name


def test_last_token_index_for_both_padding_sides():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 4, 4, 0]


def stock_last_hidden_state(model, batch):
    """The backbone's own forward (default positions), independent of EmbeddingModel."""
    inner = model.base_hf_model.model
    kwargs = {k: v for k, v in batch.items() if k != "dummy_image"}
    if model.backbone == "qwen2_vl":
        kwargs["mm_token_type_ids"] = (batch["input_ids"] == inner.config.image_token_id).int()
    return inner(**kwargs, use_cache=False).last_hidden_state


@pytest.mark.parametrize("backbone", BACKBONES)
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


@pytest.mark.parametrize("backbone", BACKBONES)
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


@pytest.mark.parametrize("backbone", BACKBONES)
def test_freeze_projector(tiny_dirs, backbone):
    model, processor = load(tiny_dirs, backbone, freeze_projector=True)
    backward_on(model, InputFormatter(processor, backbone)(image_sides(), "query"))
    g = grads(model)
    assert all(g[n] is None for n in g if is_projector(n, backbone) or is_vision_tower(n, backbone))
    assert any(g[n] is not None for n in g if is_language_model(n))


@pytest.mark.parametrize("backbone", BACKBONES)
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


@pytest.mark.parametrize("backbone", BACKBONES)
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
    ref, got = grads(reference), grads(checkpointed)
    for name, g in ref.items():
        if g is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5)


def test_model_config_validation_and_auto_attention(tiny_dirs, caplog):
    with pytest.raises(ValueError, match="llava_onevision, qwen2_vl"):
        ModelConfig(backbone="clip")
    with pytest.raises(ValueError, match="non_reentrant"):
        ModelConfig(gradient_checkpointing="yes")
    with pytest.raises(ValueError, match="bfloat16"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ValueError, match="qwen2_vl"):
        load_embedding_model(ModelConfig(path=tiny_dirs["llava_onevision"], backbone="qwen2_vl"))
    with caplog.at_level(logging.INFO, logger="llave_ds.model"):
        model, _ = load(tiny_dirs, "qwen2_vl")
    assert "attention implementation: sdpa (requested auto)" in caplog.text  # no CUDA here
    assert model.base_hf_model.config._attn_implementation == "sdpa"
    assert model.backbone == "qwen2_vl"


@pytest.mark.parametrize("backbone", BACKBONES)
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
    for backbone in BACKBONES:
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
