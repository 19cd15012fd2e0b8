"""The embedding model: an LMM that reads a formatted chunk and returns one unit vector per row.

``EmbeddingModel.forward(**chunk)`` runs the backbone's inner model (never the LM head),
takes the last layer's hidden state at the last attended token of each row (left or right
padding alike) and L2-normalises it in float32. It knows nothing of losses or optimizers.

``load_embedding_model`` builds it from a checkpoint directory (or hub id) through
``from_pretrained``; with a ZeRO-3 DeepSpeed config it first creates transformers'
``HfDeepSpeedConfig`` (kept alive on the returned module), so ``from_pretrained`` builds the
model inside ``deepspeed.zero.Init`` and no rank ever materialises all of it.
``build_embedding_model_from_config`` does the same from a config with random weights.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import nn

from llave_ds.config import check_choices
from llave_ds.core.distributed import is_distributed
from llave_ds.model.backbones import (SUPPORTED_BACKBONES, Backbone, backbone_from_model_type, check_backbone,
                                      detect_backbone, model_class)
from llave_ds.model.checkpointing import GradientCheckpointing, apply_gradient_checkpointing
from llave_ds.model.dtypes import DTYPES, Dtype
from llave_ds.model.fused_kernels import FusedKernels, apply_fused_kernels
from llave_ds.model.processors import load_processor
from llave_ds.model.vision_cache import INSTALLERS as VISION_CACHE_INSTALLERS
from llave_ds.model.vision_cache import FrozenVisionCache

logger = logging.getLogger(__name__)

PaddingMask = Literal["auto", "always"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
ATTN_IMPLEMENTATIONS = get_args(AttnImplementation)
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    """How to build the embedding model. Flat, simple types (maps 1:1 to a YAML section).

    path: local checkpoint directory or hub id (same ``from_pretrained`` code path).
    backbone: "auto" (from config.json ``model_type``), "llava_onevision", "qwen2_vl",
        "qwen2_5_vl" or "qwen3_vl".
    dtype: "bfloat16" (paper), "float32" or "float16".
    attn_implementation: "auto" = flash_attention_2 when flash_attn imports and CUDA is
        available, else sdpa; or an explicit "sdpa" / "eager" / "flash_attention_2".
    freeze_vision_tower / freeze_projector: paper: tower frozen, projector trained.
    lora_r: 0 = full fine-tuning; > 0 = LoRA on the language model only (peft), and then
        only the adapters train. lora_dropout defaults to 0 because GradCache re-runs every
        forward and dropout would need its RNG replayed exactly.
    gradient_checkpointing: "off" | "non_reentrant" | "reentrant" (HF activation
        checkpointing with ``use_reentrant`` accordingly) | "auto" (training only: the
        cheapest policy whose predicted peak fits the memory budget, off or every k-th
        layer non-reentrant; `llave_ds.training.memory_plan`, docs/PERFORMANCE.md).
    checkpoint_every: with checkpointing on, checkpoint the language model's layers 0, k,
        2k, ... only (k = this; 1 = every layer): the rest keep their activations and are not
        recomputed (`llave_ds.model.checkpointing`). "auto" sets it.
    cache_frozen_vision: with the tower frozen, the gradient cache's second pass reuses the
        tower features of its first pass instead of running the tower again
        (llave_ds/model/vision_cache.py; exact). Ignored when the tower trains.
    padding_mask: "auto" = the language model gets no padding mask when every row's real
        tokens come first (right padding): causal attention already keeps them from the
        padding after them, positions come from the mask and pooling reads the last real
        token, so embeddings and gradients are unchanged (tested), and attention takes its
        causal fast path (SDPA: no materialised mask, GQA without repeated k/v; flash-attn:
        no unpadding). "always" = pass the mask (left-padded chunks always get it).
    fused_kernels: "off" (default until measured on a GPU) | "liger" = Liger-Kernel's RMSNorm,
        RoPE and SwiGLU on the language model (GPU only; ``pip install llave-ds[liger]``;
        llave_ds/model/fused_kernels.py) | "auto" = liger where installed and CUDA is there.
    """

    path: str = ""
    backbone: Literal["auto", Backbone] = "auto"
    dtype: Dtype = "bfloat16"
    attn_implementation: AttnImplementation = "auto"
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    gradient_checkpointing: GradientCheckpointing = "off"
    checkpoint_every: int = 1
    cache_frozen_vision: bool = True
    padding_mask: PaddingMask = "auto"
    fused_kernels: FusedKernels = "off"

    def __post_init__(self):  # checked at construction: models are often configured in Python
        check_choices(self, "model.")
        if self.lora_r < 0:
            raise ValueError(f"model.lora_r must be >= 0, got {self.lora_r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"model.checkpoint_every must be >= 1, got {self.checkpoint_every}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def resolve_attn_implementation(requested: str) -> str:
    """'auto' -> flash_attention_2 if flash_attn imports and CUDA is there, else sdpa."""
    if requested != "auto":
        choice = requested
    elif importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available():
        choice = "flash_attention_2"
    else:
        choice = "sdpa"
    logger.info("attention implementation: %s (requested %s)", choice, requested)
    return choice


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``attention_mask`` (works for left and right padding)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(-1).to(torch.int64).argmax(-1)


def vision_modules(hf_model: nn.Module, backbone: str) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """(vision tower modules, projector modules + loose projector params) of a backbone.

    Qwen2-VL and Qwen2.5-VL keep their projector (the patch merger) inside ``visual``;
    Qwen3-VL has one more merger per DeepStack layer (``deepstack_merger_list``), projectors
    too; LLaVA-OV's projector is the MLP plus the ``image_newline`` vector that separates rows
    of tiles.
    """
    inner = hf_model.model
    if backbone == "llava_onevision":
        return [inner.vision_tower], [inner.multi_modal_projector, inner.image_newline]
    mergers = ("merger", "deepstack_merger_list")
    tower = [m for name, m in inner.visual.named_children() if name not in mergers]
    return tower, [getattr(inner.visual, name) for name in mergers if hasattr(inner.visual, name)]


def zero_from_vision(output) -> torch.Tensor:
    """``0 * (sum of every feature the tower call produced)``: adding it keeps every vision
    module of a dummy call (the merger, and Qwen3-VL's DeepStack mergers) in the autograd graph
    with a zero gradient, so every rank reduces the same parameters under ZeRO."""
    parts = []
    for feature in (output.pooler_output, *(getattr(output, "deepstack_features", None) or ())):
        parts.extend(feature if isinstance(feature, (list, tuple)) else [feature])
    return 0 * sum(p.sum() for p in parts)


def _forward_hooked(inner: nn.Module, add_vision, fired: list, subject: str, **inputs):
    """``inner(**inputs)`` with ``add_vision`` as a forward hook on its input embedding (where
    the stock forward runs the tower), the hook removed afterwards; an error naming
    ``subject`` if the hook never fired (``fired`` is the list it appends to)."""
    handle = inner.get_input_embeddings().register_forward_hook(add_vision)
    try:
        out = inner(use_cache=False, **inputs)
    finally:
        handle.remove()
    if not fired:
        raise RuntimeError(f"{subject} not run: the backbone's forward no longer goes through its input "
                           "embedding module")
    return out


def _parameters_of(parts) -> list[nn.Parameter]:
    params = []
    for part in parts:
        params.extend([part] if isinstance(part, nn.Parameter) else part.parameters())
    return params


def lm_head_is_tied(hf_model: nn.Module) -> bool:
    head, embed = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
    return head is not None and head.weight is embed.weight


def untied_head_key(hf_model: nn.Module) -> Optional[str]:
    """State-dict name of the LM head's weight when it is a tensor of its own (untied), else None.

    The embedding never runs the head and training freezes an untied one (`apply_freezing`;
    LoRA does not target it), so it stays the base checkpoint's head: exports leave it out
    (docs/EXPORT.md). A tied head is the input embedding, which is saved once anyway."""
    head = hf_model.get_output_embeddings()
    if head is None or lm_head_is_tied(hf_model):
        return None
    return next(f"{name}.weight" for name, module in hf_model.named_modules() if module is head)


# An export has no untied LM head (see `untied_head_key`): loading one here initialises the
# head (frozen, never run) without transformers' MISSING report.
_HEAD_MAY_BE_MISSING = r"^lm_head\.weight$"


@contextlib.contextmanager
def _head_may_be_missing(model_cls):
    """``from_pretrained`` without a MISSING report for the LM head. transformers reads
    ``_keys_to_ignore_on_load_missing`` from the class only, so it is set on the class for the
    call and restored after (a plain load elsewhere still reports)."""
    had = "_keys_to_ignore_on_load_missing" in model_cls.__dict__
    old = model_cls.__dict__.get("_keys_to_ignore_on_load_missing")
    model_cls._keys_to_ignore_on_load_missing = [*(old or ()), _HEAD_MAY_BE_MISSING]
    try:
        yield
    finally:
        if had:
            model_cls._keys_to_ignore_on_load_missing = old
        else:
            del model_cls._keys_to_ignore_on_load_missing


def apply_freezing(hf_model: nn.Module, backbone: str, cfg: ModelConfig) -> None:
    """requires_grad per the config. The LM head is never run, so an untied one is frozen."""
    tower, projector = vision_modules(hf_model, backbone)
    if cfg.freeze_vision_tower:
        for p in _parameters_of(tower):
            p.requires_grad_(False)
    if cfg.freeze_projector:
        for p in _parameters_of(projector):
            p.requires_grad_(False)
    if not lm_head_is_tied(hf_model):
        for p in hf_model.get_output_embeddings().parameters():
            p.requires_grad_(False)


def apply_lora(hf_model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap in a peft LoRA model targeting only language-model linears; only adapters train."""
    from peft import LoraConfig, get_peft_model

    names = "|".join(re.escape(n) for n in cfg.lora_target_modules)
    # A regex so the vision tower's q_proj / fc1 ... (same names in SigLIP) are left alone.
    target = rf".*\blanguage_model\..*\.(?:{names})"
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target, bias="none")
    return get_peft_model(hf_model, lora)


class EmbeddingModel(nn.Module):
    """Wraps a LLaVA-OV / Qwen2-VL / Qwen2.5-VL ForConditionalGeneration model (optionally
    peft-wrapped).

    ``forward`` takes the formatter's keys and returns ``[B, D]`` float32 unit vectors.
    State-dict keys carry the prefix ``hf_model.`` (plus peft's ``base_model.model.`` when
    LoRA is on) in front of the transformers names.
    """

    def __init__(self, hf_model: nn.Module, backbone: str, config: Optional[ModelConfig] = None):
        super().__init__()
        self.backbone = check_backbone(backbone)
        self.hf_model = hf_model
        self.model_config = config  # not `config`: wrappers probe `.config` for HF configs
        self._hf_deepspeed_config = None  # set by the loaders under ZeRO-3; must outlive the model
        self._warned_no_vision = False
        self.vision_cache: Optional[FrozenVisionCache] = None
        tower, _ = vision_modules(self.base_hf_model, self.backbone)
        installer = VISION_CACHE_INSTALLERS.get(self.backbone)  # none: the tower always runs
        if installer is not None and (config is None or config.cache_frozen_vision) and \
                not any(p.requires_grad for p in _parameters_of(tower)):
            self.vision_cache = installer(self.base_hf_model.model)

    def zero3_fetch_units(self) -> list[str]:
        """Class names of the blocks ZeRO-3 should fetch whole (``engine.set_fetch_units``):
        the repeated blocks (decoder layers, vision encoder blocks) among transformers' own
        ``_no_split_modules``. Classes that occur once (vision embeddings) are left out:
        as a leaf, SigLIP's patch embedding, the first module of a trainable tower, got an
        empty gradient under ZeRO-3 (measured: "0 != 18816 Cannot reduce scatter"). So are
        blocks that hold LoRA adapters: as leaves their adapters got an empty gradient under
        ZeRO-3 too ("0 != 256 Cannot reduce scatter", every backbone); the blocks without
        adapters (the frozen vision tower's) stay fetch units (docs/DECISIONS.md)."""
        counts: dict[str, int] = {}
        with_adapters: set[str] = set()
        for m in self.modules():
            name = type(m).__name__
            counts[name] = counts.get(name, 0) + 1
            if any("lora_" in n for n, _ in m.named_parameters()):
                with_adapters.add(name)
        declared = set(getattr(self.base_hf_model, "_no_split_modules", None) or ())
        return sorted(name for name in declared if counts.get(name, 0) > 1 and name not in with_adapters)

    @property
    def base_hf_model(self) -> nn.Module:
        """The transformers model itself (under the peft wrapper when LoRA is on)."""
        if hasattr(self.hf_model, "get_base_model"):
            return self.hf_model.get_base_model()
        return self.hf_model

    @property
    def hidden_size(self) -> int:
        return int(self.base_hf_model.config.text_config.hidden_size)

    def embedding_metadata(self, formatter: Any = None) -> dict:
        meta = {
            "pooling": "last_token",
            "normalized": True,
            "backbone": self.backbone,
            "dim": self.hidden_size,
            "dtype_out": "float32",
        }
        if formatter is not None:
            meta["input_format"] = formatter.metadata()
        return meta

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: Optional[torch.Tensor] = None, image_sizes: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, dummy_image: Any = None,
                mm_token_type_ids: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None,
                second_per_grid_ts: Optional[torch.Tensor] = None, dummy_video: Any = None) -> torch.Tensor:
        """Embed a formatted chunk (``InputFormatter``'s keys). Vision-tower calls, in this
        order: the chunk's images (or the dummy image), then, when the chunk carries video
        tensors, its videos (or the dummy video): the same sequence in every chunk of a run
        whose formatter has ``video_slot`` on (the ZeRO-3 rule; docs/VIDEO.md)."""
        inner = self.base_hf_model.model
        is_dummy = bool(dummy_image) if dummy_image is not None else False
        lm_mask = self.language_model_mask(attention_mask)
        has_video = pixel_values_videos is not None
        video_is_dummy = bool(dummy_video) if dummy_video is not None else False
        if self.backbone == "llava_onevision":
            vision = {"pixel_values": pixel_values, "image_sizes": image_sizes}
            video = {"pixel_values_videos": pixel_values_videos}
            # Positions count attended tokens only, so left and right padding embed alike. Without
            # a mask they run on through the padding (the same for real tokens): transformers reads
            # repeated positions as packed sequences and would build a block mask after all.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) if lm_mask is not None else \
                torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        else:
            vision = {"pixel_values": pixel_values, "image_grid_thw": image_grid_thw}
            video = {"pixel_values_videos": pixel_values_videos, "video_grid_thw": video_grid_thw}
            if mm_token_type_ids is None:  # text 0, image 1, video 2 (transformers' convention)
                mm_token_type_ids = ((input_ids == inner.config.image_token_id).to(torch.int32)
                                     + 2 * (input_ids == inner.config.video_token_id).to(torch.int32))
            # M-RoPE (Qwen2-VL, Qwen2.5-VL): keyword arguments only.
            rope_video = {}
            if has_video and not video_is_dummy:
                rope_video["video_grid_thw"] = video_grid_thw
                if self.backbone == "qwen2_5_vl" and second_per_grid_ts is not None:
                    rope_video["second_per_grid_ts"] = second_per_grid_ts
            position_ids, _ = inner.get_rope_index(
                input_ids, mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=None if is_dummy else image_grid_thw, attention_mask=attention_mask,
                **rope_video)

        if has_video:
            calls = []
            if pixel_values is not None:
                calls.append(("image", inner.get_image_features, vision, is_dummy))
            calls.append(("video", inner.get_video_features, video, video_is_dummy))
            out = self._forward_vision_from_hook(inner, input_ids, lm_mask, position_ids, calls)
        elif pixel_values is None:
            self._warn_if_vision_skipped()
            out = inner(input_ids=input_ids, attention_mask=lm_mask, position_ids=position_ids, use_cache=False)
        else:
            keyed = self.vision_cache.keyed(pixel_values) if self.vision_cache else contextlib.nullcontext()
            with keyed:
                if is_dummy:
                    out = self._forward_with_dummy_image(inner, input_ids, lm_mask, position_ids, vision)
                else:
                    out = inner(input_ids=input_ids, attention_mask=lm_mask, position_ids=position_ids,
                                use_cache=False, **vision)

        hidden = out.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return F.normalize(pooled.float(), dim=-1)

    def language_model_mask(self, attention_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """The padding mask the language model gets: None under ``padding_mask="auto"`` when
        each row is its real tokens followed by padding (``ModelConfig.padding_mask`` says why
        that is exact), else ``attention_mask``. Positions and pooling always use the mask."""
        if self.model_config is not None and self.model_config.padding_mask == "always":
            return attention_mask
        # Right padding: 1...1 0...0 in every row, i.e. the mask never rises along a row.
        # (One host sync per forward; ranks need not agree: no module or collective depends on it.)
        if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            return None
        return attention_mask

    def _forward_with_dummy_image(self, inner, input_ids, attention_mask, position_ids, vision):
        """Run the vision tower on the blank image without any image token in the text.

        The stock forward would reject image features with no placeholder tokens, so the
        tower is run from a forward hook on the input embedding: that is the exact point
        where the stock forward runs it for real images (embed tokens -> vision tower ->
        language model), so under ZeRO-3 the parameter gathers happen in the same order
        whether a chunk has real images or the dummy. ``0 * features.sum()`` keeps the
        vision parameters in the autograd graph (zero gradient) without changing outputs.
        """
        fired = []

        def add_vision(module, args, embeds):
            if fired:  # only the forward's own embedding lookup
                return embeds
            fired.append(True)
            output = inner.get_image_features(**vision, return_dict=True)
            return embeds + zero_from_vision(output).to(embeds.dtype)

        return _forward_hooked(inner, add_vision, fired, "the dummy image was", input_ids=input_ids,
                               attention_mask=attention_mask, position_ids=position_ids)

    def _forward_vision_from_hook(self, inner, input_ids, attention_mask, position_ids, calls):
        """The forward of a chunk with video tensors: every tower call runs from the input
        embedding's forward hook, in the order of ``calls`` (images, then videos), which is
        where and in which order the stock forward runs them. Real features are handed to
        the stock forward as ``mm_encoder_outputs`` (it scatters them into the placeholder
        tokens and checks their count); a dummy's are added as ``0 * features.sum()``.

        With the frozen-vision cache each call is keyed by its own pixel tensor (images by
        ``pixel_values``, videos by ``pixel_values_videos``), so the gradient cache's second
        pass replays each call's own features.
        """
        fired, features = [], {}

        def add_vision(module, args, embeds):
            if fired:  # only the forward's own embedding lookup
                return embeds
            fired.append(True)
            zero = None
            for kind, get_features, kwargs, dummy in calls:
                key = next(iter(kwargs.values()))  # the pixel tensor
                keyed = self.vision_cache.keyed(key) if self.vision_cache else contextlib.nullcontext()
                with keyed:
                    output = get_features(**kwargs, return_dict=True)
                if dummy:
                    zero = zero_from_vision(output) if zero is None else zero + zero_from_vision(output)
                else:
                    features[kind] = output
            return embeds if zero is None else embeds + zero.to(embeds.dtype)

        # The same dict object: filled by the hook before the forward reads it.
        return _forward_hooked(inner, add_vision, fired, "the vision inputs were", input_ids=input_ids,
                               attention_mask=attention_mask, position_ids=position_ids,
                               mm_encoder_outputs=features)

    def _warn_if_vision_skipped(self) -> None:
        if self._warned_no_vision or not self.training:
            return
        if is_distributed():
            self._warned_no_vision = True
            logger.warning("a training chunk came without pixel_values: the vision tower did not "
                           "run. Under ZeRO-3 every rank must run the same modules; use "
                           "InputFormatter, which adds a dummy image to text-only chunks")


def _is_zero3(deepspeed_config: Optional[dict]) -> bool:
    return bool(deepspeed_config) and int(
        deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3


def _hf_deepspeed_config(deepspeed_config: Optional[dict]):
    """The HfDeepSpeedConfig that makes transformers build under zero.Init (ZeRO-3 only)."""
    if not _is_zero3(deepspeed_config):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(deepspeed_config)


def _finish(hf_model: nn.Module, backbone: str, cfg: ModelConfig, hf_ds_config) -> EmbeddingModel:
    hf_model.config.use_cache = False
    if cfg.lora_r > 0:
        hf_model = apply_lora(hf_model, cfg)
    else:
        apply_freezing(hf_model, backbone, cfg)
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    apply_fused_kernels(base, backbone, cfg.fused_kernels)
    if cfg.gradient_checkpointing != "auto":  # auto: train.py applies the memory plan's choice
        apply_gradient_checkpointing(base, cfg.gradient_checkpointing, cfg.checkpoint_every)
    model = EmbeddingModel(hf_model, backbone, cfg)
    # transformers keeps only a weakref to this: it must live as long as the model does.
    model._hf_deepspeed_config = hf_ds_config
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in model.parameters() if p.requires_grad)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    logger.info("embedding model %s: %d / %d parameters trainable", backbone, trainable, total)
    return model


def load_embedding_model(cfg: ModelConfig, deepspeed_config: Optional[dict] = None,
                         load_processor_too: bool = True) -> tuple[EmbeddingModel, Any]:
    """Build the embedding model (and its processor) from ``cfg.path``.

    With a ZeRO stage-3 ``deepspeed_config`` the weights are loaded straight into
    partitioned parameters (call it on every rank, after the process group is up).
    Returns ``(model, processor)``; processor is None if ``load_processor_too`` is False.
    """
    if not cfg.path:
        raise ValueError("ModelConfig.path is empty: give a checkpoint directory or hub id")
    backbone = detect_backbone(cfg.path) if cfg.backbone == "auto" else cfg.backbone
    if cfg.backbone != "auto" and detect_backbone(cfg.path) != backbone:
        raise ValueError(f"ModelConfig.backbone={backbone!r} but {cfg.path} is a "
                         f"{detect_backbone(cfg.path)!r} checkpoint")
    hf_ds_config = _hf_deepspeed_config(deepspeed_config)
    cls = model_class(backbone)
    with _head_may_be_missing(cls):  # an llave-ds export has no untied LM head
        hf_model = cls.from_pretrained(cfg.path, dtype=cfg.torch_dtype,
                                       attn_implementation=resolve_attn_implementation(cfg.attn_implementation))
    model = _finish(hf_model, backbone, cfg, hf_ds_config)
    processor = load_processor(cfg.path, backbone) if load_processor_too else None
    return model, processor


def build_embedding_model_from_config(hf_config, cfg: ModelConfig,
                                      deepspeed_config: Optional[dict] = None) -> EmbeddingModel:
    """Randomly initialised embedding model of a transformers config (benchmarks, tests).

    Under ZeRO-3 goes through transformers' ``_from_config`` so construction happens inside
    zero.Init with the ZeRO-3-aware weight init.
    """
    backbone = backbone_from_model_type(hf_config.model_type)
    if cfg.backbone not in ("auto", backbone):
        raise ValueError(f"ModelConfig.backbone={cfg.backbone!r} but the config is {backbone!r}")
    hf_ds_config = _hf_deepspeed_config(deepspeed_config)
    hf_model = model_class(backbone)._from_config(
        hf_config, dtype=cfg.torch_dtype,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation))
    return _finish(hf_model, backbone, cfg, hf_ds_config)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should get (frozen parts and an untied LM head excluded)."""
    return [p for p in model.parameters() if p.requires_grad]


__all__ = [
    "ModelConfig", "EmbeddingModel", "load_embedding_model", "build_embedding_model_from_config",
    "last_token_index", "resolve_attn_implementation", "trainable_parameters", "SUPPORTED_BACKBONES",
]
