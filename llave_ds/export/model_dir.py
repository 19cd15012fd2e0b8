"""Export a trained embedding model as a plain transformers directory (safetensors weights).

Two ways in:

* ``llave-ds export CHECKPOINT --out DIR`` (``export_checkpoint``): one process, no GPU,
  no process group. Consolidates a DeepSpeed checkpoint saved by any number of ranks
  under ZeRO-1/2/3 (``engine.consolidate_checkpoint``), loads it into the model built from
  the run's ``config.yaml`` (base model path, LoRA settings), merges LoRA adapters into the
  base weights (peft ``merge_and_unload``) and writes the directory.
* ``export_from_engine`` at the end of training: every rank gathers (ZeRO-3 collectives),
  rank 0 writes. LoRA adapters are merged into the base weights from the gathered tensors.

The directory holds ``config.json``, sharded ``*.safetensors`` (+ index when several),
the tokenizer, processor and image-processor configs of the base model, ``README.md``
(model card) and ``llave_embedding.json`` (pooling, normalisation, and the prompt
format: every ``processing`` field of the run, from the formatter built by
``InputFormatter.from_config``). The weights load with ``<ConcreteClass>.from_pretrained``
without llave-ds installed; ``processor_config.json`` names the stock processor class
(``LlavaOnevisionProcessor`` / ``Qwen2VLProcessor``) for ``AutoProcessor``.

A run trained with Matryoshka sizes (``objective.matryoshka_dims``) declares them: the
resolved sizes in ``llave_embedding.json`` (``matryoshka_dims``), a section of the model card,
and ``is_matryoshka`` / ``matryoshka_dimensions`` in ``config.json``, the fields vLLM reads to
accept a ``dimensions`` request (docs/EXPORT.md, "Matryoshka sizes"). Without them the export
is what it was, byte for byte.

It is written into a temporary sibling and renamed into place at the end, so an
interrupted export never leaves a half directory at the destination.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import yaml

from llave_ds import __version__
from llave_ds.config import ConfigError, check_choices, config_from_dict, config_to_dict
from llave_ds.core import distributed
from llave_ds.core.gather import rank_errors
from llave_ds.core.objective import matryoshka_sizes
from llave_ds.export.st_files import usage_section as st_usage_section
from llave_ds.export.st_files import write_sentence_transformers_files
from llave_ds.files import fsync_tree
from llave_ds.formats import EMBEDDING_METADATA
from llave_ds.model.dtypes import dtype_name, to_dtype
from llave_ds.model.embedding import ModelConfig, load_embedding_model, untied_head_key
from llave_ds.model.formatter import InputFormatter, ProcessingConfig
from llave_ds.model.processors import VIDEO_CONFIG_ATTR, load_processor
from llave_ds.training import checkpoint as ckpt
from llave_ds.training.checkpoint import CheckpointError
from llave_ds.training.engine import consolidate_checkpoint, gathered_state_dict
from llave_ds.training.run_dir import RunDir

logger = logging.getLogger(__name__)

METADATA_FORMAT_VERSION = 1
# llave_embedding.json: the Matryoshka sizes the run trained (absent when it trained none).
MATRYOSHKA_KEY = "matryoshka_dims"
HF_PREFIX = "hf_model."
PEFT_PREFIX = "base_model.model."


class ExportError(RuntimeError):
    """The export cannot proceed; the message names the path and what to do."""


@dataclass
class ExportConfig:
    at_end: bool = True
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    dir: str = ""  # default: <run_dir>/export (training.run_dir.RunDir)

    def validate(self) -> None:
        check_choices(self, "export.")


def _dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    try:
        return to_dtype(name)
    except ValueError as exc:
        raise ExportError(f"export dtype: {exc}") from None


# ----------------------------------------------------------------------------- writing

def staging_dir(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")


def _warn_stale_staging(out_dir: Path) -> None:
    stale = sorted(p for p in out_dir.parent.glob(f".{out_dir.name}.partial-*") if p != staging_dir(out_dir))
    if stale:
        logger.warning("found leftovers of interrupted exports next to %s: %s (safe to delete)",
                       out_dir, ", ".join(str(p) for p in stale))


def check_destination(out_dir: Path, force: bool) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise ExportError(f"export destination {out_dir} exists; pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export destination {out_dir} exists and is not a directory")


def write_model_dir(hf_model, state_dict: Optional[dict], processor: Any, out_dir: Path, metadata: dict,
                    model_card: str, *, max_shard_size: Union[str, int] = "5GB", force: bool = False) -> Path:
    """Rank-0 part: save config + sharded safetensors + processor + metadata, atomically.

    ``state_dict`` None saves the model's own parameters. Everything goes to a staging
    sibling first; the destination appears (or is replaced, with ``force``) by a rename.
    """
    out_dir = Path(out_dir)
    check_destination(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _warn_stale_staging(out_dir)
    stage = staging_dir(out_dir)
    shutil.rmtree(stage, ignore_errors=True)
    head_key = untied_head_key(hf_model)
    if head_key is not None:
        metadata = {**metadata, "lm_head": LM_HEAD_LEFT_OUT}
    try:
        with _standard_save(hf_model, leave_out=head_key):
            hf_model.save_pretrained(str(stage), state_dict=state_dict, safe_serialization=True,
                                     max_shard_size=max_shard_size)
        if state_dict is not None:
            _fix_config_dtype(stage, state_dict)
        if metadata.get(MATRYOSHKA_KEY):
            _update_config_json(stage, serving_config_fields(metadata[MATRYOSHKA_KEY]))
        if processor is not None:
            processor.save_pretrained(str(stage))
            image_processor = getattr(processor, "image_processor", None)
            if image_processor is not None:
                # The standalone preprocessor_config.json: AutoImageProcessor works on its own.
                image_processor.save_pretrained(str(stage))
            video_config = getattr(processor, VIDEO_CONFIG_ATTR, None)
            if video_config:  # the base's video processor settings (the processor here has none)
                (stage / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2) + "\n")
            # What SentenceTransformer(dir) reads (llave_ds/export/st_files.py); recorded in the metadata.
            metadata = write_sentence_transformers_files(stage, processor, metadata)
        (stage / EMBEDDING_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        (stage / "README.md").write_text(model_card)
        fsync_tree(stage)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(stage, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out_dir


# Recorded in llave_embedding.json (and explained in the model card) when the head is left out.
LM_HEAD_LEFT_OUT = ("left out: untied, never run and frozen in training, so it is the base model's LM head; "
                    "AutoModel (sentence-transformers) loads the model without one")


@contextlib.contextmanager
def _standard_save(hf_model, leave_out: Optional[str] = None):
    """Save in the layout transformers writes for a model it did not load, without the
    state-dict entry ``leave_out`` (the untied LM head: `untied_head_key`).

    ``from_pretrained`` records the key renamings it applied (``_weight_conversions``) and
    ``save_pretrained`` reverts them. Under ZeRO-3 that record includes the legacy
    renamings, whose reversal writes names such as ``language_model.model.model.layers``
    and ``vision_tower.vision_model.encoder`` (transformers still reads them, other tools
    may not). Without the record, transformers uses its standard mapping: the layout of
    a checkpoint saved outside DeepSpeed.
    """
    had = "_weight_conversions" in hf_model.__dict__
    old = hf_model.__dict__.get("_weight_conversions")
    hf_model.__dict__["_weight_conversions"] = None
    # The embedding model turns the KV cache off (it passes use_cache=False itself anyway);
    # the saved config keeps transformers' default so generate() users are not surprised.
    old_use_cache = getattr(hf_model.config, "use_cache", None)
    hf_model.config.use_cache = True
    # save_pretrained drops these module names (before it reverts the renamings) from what it
    # writes, whether it is given a state dict (export_from_engine) or takes the model's own.
    old_ignore = hf_model._keys_to_ignore_on_save
    if leave_out is not None:
        hf_model._keys_to_ignore_on_save = set(old_ignore or ()) | {leave_out}
    try:
        yield
    finally:
        hf_model._keys_to_ignore_on_save = old_ignore
        hf_model.config.use_cache = old_use_cache
        if had:
            hf_model.__dict__["_weight_conversions"] = old
        else:
            hf_model.__dict__.pop("_weight_conversions", None)


def _update_config_json(stage: Path, fields: dict) -> None:
    """Set top-level fields of the saved ``config.json``, written as transformers writes it."""
    path = stage / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config.update(fields)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fix_config_dtype(stage: Path, state_dict: dict) -> None:
    """save_pretrained records the module's dtype; record the saved tensors' instead."""
    floats = {t.dtype for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point()}
    if len(floats) == 1:
        _update_config_json(stage, {"dtype": dtype_name(floats.pop())})


def serving_config_fields(sizes: list[int]) -> dict:
    """What ``config.json`` declares for a Matryoshka export: vLLM's ``ModelConfig`` reads
    ``is_matryoshka`` and ``matryoshka_dimensions`` from the HF config (the top level, for these
    multimodal configs too) and accepts a request's ``dimensions`` only when one is set, and
    then only a listed size (docs/EXPORT.md, "Matryoshka sizes")."""
    return {"is_matryoshka": True, "matryoshka_dimensions": [int(s) for s in sizes]}


def run_matryoshka_dims(cfg: Any, width: int) -> Optional[list[int]]:
    """The Matryoshka sizes a run trained, for the export to declare: ``objective.matryoshka_dims``
    resolved against the embedding width (``full`` -> the width; ascending), without the sizes
    whose ``matryoshka_weights`` entry is 0 (no loss term trained them); None when off.
    A bad value is a ValueError naming the field (``ObjectiveConfig``'s own rule)."""
    objective = (_plain_config(cfg) or {}).get("objective") or {}
    sizes = matryoshka_sizes(objective.get("matryoshka_dims"), objective.get("matryoshka_weights"), int(width))
    if sizes is None:
        return None
    return [size for size, weight in sizes if weight > 0]


# ---------------------------------------------------------------------------- metadata

def embedding_metadata(model, formatter, *, export_dtype: Union[str, torch.dtype], model_class: str,
                       lora_merged: bool = False, source: Optional[dict] = None,
                       matryoshka_dims: Optional[list[int]] = None) -> dict:
    """What ``llave_embedding.json`` holds: how to turn inputs into the embedding.
    ``matryoshka_dims``: the trained sizes (`run_matryoshka_dims`); no key when None."""
    meta = {"format_version": METADATA_FORMAT_VERSION, "library": "llave-ds", "llave_ds_version": __version__}
    meta.update(model.embedding_metadata(formatter))  # input_format: formatter.metadata()
    if matryoshka_dims:
        meta[MATRYOSHKA_KEY] = [int(d) for d in matryoshka_dims]
    meta.update({"similarity": "cosine", "model_class": model_class,
                 "export_dtype": dtype_name(_dtype(export_dtype)), "lora_merged": bool(lora_merged)})
    if untied_head_key(model.base_hf_model) is not None:  # write_model_dir leaves it out
        meta["lm_head"] = LM_HEAD_LEFT_OUT
    if source:
        meta["source"] = source
    return meta


def _plain_config(cfg: Any) -> Optional[dict]:
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg
    return config_to_dict(cfg)


def _head_note(metadata: dict, cls: str) -> list[str]:
    base = (metadata.get("source") or {}).get("base_model") or "the base model"
    return [f"The LM head is not included: the embedding never uses it, and this backbone's untied head is "
            f"frozen in training, so it is the base model's (`{base}`). `AutoModel` and sentence-transformers "
            f"load the model without one, with no warning. Loading the directory with `{cls}` reports "
            "`lm_head.weight` as MISSING and initialises it randomly: embeddings (`model.model(...)`) are "
            "unaffected; for `generate()`, copy the base model's `lm_head.weight` in.", ""]


def _matryoshka_note(metadata: dict) -> list[str]:
    sizes = metadata[MATRYOSHKA_KEY]
    shown = ", ".join(str(d) for d in sizes)
    return ["## Matryoshka sizes", "",
            f"Trained at the sizes {shown}: for each of these d, the first d dimensions of the embedding are an "
            "embedding of their own. Re-normalise after truncating (the whole vector has unit norm, its "
            "first d dimensions do not): `F.normalize(embedding[..., :d], dim=-1)`. Other sizes were not trained.",
            "",
            "- llave-ds: `LlaveEmbedder.from_pretrained(path, dim=d)` or `encode(..., dim=d)`; "
            "`llave-ds encode --dim d`.",
            "- sentence-transformers: `SentenceTransformer(path, truncate_dim=d)` and "
            "`encode(..., normalize_embeddings=True)`: it truncates after its `Normalize` module and does not "
            "re-normalise (`model.similarity`, cosine, gives the same scores either way).",
            f"- vLLM: `config.json` declares `is_matryoshka` and `matryoshka_dimensions` [{shown}], so a "
            "`dimensions` request of one of these sizes is accepted (vLLM truncates, then normalises); other "
            "sizes are refused.", "",
            f"`{EMBEDDING_METADATA}` lists the sizes under `{MATRYOSHKA_KEY}`.", ""]


def model_card(cfg: Any, metadata: dict, extra: Optional[dict] = None) -> str:
    """README.md: what the model is, how to use it, the training summary and config."""

    config = _plain_config(cfg)
    backbone = metadata.get("backbone")
    cls = metadata.get("model_class", "the transformers class in config.json")
    fmt = metadata.get("input_format", {})
    lines = ["---", "library_name: transformers", "tags: [embeddings, multimodal, llave, llave-ds]", "---", "",
             "# LLaVE-style multimodal embedding model (trained with llave-ds)", "",
             f"Backbone: `{backbone}` (`{cls}`), {metadata.get('dim')}-dimensional embeddings. Pooling: "
             "hidden state of the last non-pad token of the last layer, L2-normalised, float32; "
             "similarity: cosine.", "",
             f"Weights: `{metadata.get('export_dtype')}` safetensors"
             + (" (LoRA adapters merged into the base weights)" if metadata.get("lora_merged") else "") + ".", "",
             *(_head_note(metadata, cls) if metadata.get("lm_head") else []),
             *(_matryoshka_note(metadata) if metadata.get(MATRYOSHKA_KEY) else []),
             *st_usage_section(metadata),  # sentence-transformers, LlaveEmbedder, transformers
             f"Prompt: Qwen chat template, system prompt `{fmt.get('system_prompt')}`, query instruction "
             f"`{fmt.get('query_instruction')}`, target instruction `{fmt.get('target_instruction')}`, "
             f"max_length {fmt.get('max_length')}, padding {fmt.get('padding_side')}. See "
             f"`{EMBEDDING_METADATA}`.", ""]
    if config:
        data = config.get("data") or {}
        lines += ["## Training data", "",
                  f"- source: `{data.get('source')}` (split `{data.get('split')}`)",
                  f"- subsets: {data.get('subsets') or 'all found'}",
                  f"- max rows per subset: {data.get('max_per_subset')}",
                  f"- hard negatives: {data.get('num_hard_negatives') if data.get('use_hard_negatives') else 'none'}",
                  ""]
    if extra:
        lines += ["## Training summary", "", "```json", json.dumps(extra, indent=2, default=str), "```", ""]
    if config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False), "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------- LoRA merging

def merge_lora_state_dict(peft_model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into the base weights of a state dict with peft names.

    ``state`` holds the peft model's tensors (``base_model.model.X.base_layer.weight``,
    ``X.lora_A.<adapter>.weight``, ``X.lora_B.<adapter>.weight``); the result holds plain
    transformers names with ``W + scaling * B @ A`` (the scaling read from the live peft
    layers, so rsLoRA and per-layer ranks are honoured). Works on partitioned (ZeRO-3)
    models: only module names and scalings are read from ``peft_model``.
    """
    merged = dict(state)
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")):
            continue
        key = f"{name}.base_layer.weight"
        if key not in merged:
            raise ExportError(f"LoRA layer {name}: {key} is missing from the gathered state")
        weight = merged[key].float()
        for adapter in module.lora_A.keys():
            a = merged.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = merged.pop(f"{name}.lora_B.{adapter}.weight").float()
            if getattr(module, "fan_in_fan_out", False):
                raise ExportError(f"LoRA layer {name} uses fan_in_fan_out, which this merge does not handle")
            weight = weight + module.scaling[adapter] * (b @ a)
        merged[key] = weight
    out = {}
    for key, tensor in merged.items():
        if ".lora_" in key:
            continue  # embedding / magnitude vectors of other LoRA variants are not produced here
        plain = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        out[plain.replace(".base_layer.", ".")] = tensor
    return out


def _is_peft(module) -> bool:
    return hasattr(module, "get_base_model") and hasattr(module, "peft_config")


# ------------------------------------------------------------------- from the engine

def export_from_engine(engine, model, processor, formatter, out_dir, cfg=None, *, dtype: str = "bfloat16",
                       summary: Optional[dict] = None, force: bool = True,
                       max_shard_size: Union[str, int] = "5GB") -> Optional[Path]:
    """Call on every rank (ZeRO-3 gathers are collectives); rank 0 writes the directory.

    Under LoRA the adapters are merged into the base weights (from the gathered fp32
    tensors), so the result is a plain model either way. When rank 0 fails to write, every
    rank raises (rank 0 its own error, the others an ExportError naming it), so no rank
    reports a finished export that does not exist.
    """

    target = _dtype(dtype)
    lora = _is_peft(getattr(model, "hf_model", None))
    state = gathered_state_dict(engine, dtype=torch.float32 if lora else target, keep_on_all_ranks=False,
                                strip_prefix=HF_PREFIX)
    rank = distributed.rank()
    path = None
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            if lora:
                state = merge_lora_state_dict(model.hf_model, state)
                state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
            base = model.base_hf_model
            metadata = embedding_metadata(model, formatter, export_dtype=target, model_class=type(base).__name__,
                                          lora_merged=lora, matryoshka_dims=run_matryoshka_dims(cfg, model.hidden_size))
            path = write_model_dir(base, state, processor, Path(out_dir), metadata,
                                   model_card(cfg, metadata, summary), force=force,
                                   max_shard_size=max_shard_size)
        except BaseException as exc:  # noqa: BLE001 - re-raised once every rank knows
            error = exc
    # Ranks must agree: rank 0's failure becomes every rank's failure.
    device = torch.device(engine.device) if getattr(engine, "device", None) is not None else None
    errors = rank_errors(None if error is None else f"{type(error).__name__}: {error}", device)
    if error is not None:
        raise error
    if errors:
        raise ExportError(f"the export to {out_dir} failed on " + "; ".join(errors))
    return path


# ---------------------------------------------------------------- from a checkpoint

def resolve_checkpoint_dir(path: Union[str, Path]) -> Path:
    """A checkpoint dir (``step_X``), a checkpoints dir (its ``latest``) or a run dir (its
    checkpoints' ``latest``, wherever the run's config put them) -> the checkpoint
    directory, checked complete."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"checkpoint path {p} does not exist")
    if not p.is_dir():
        raise ExportError(f"{p} is not a directory: give a checkpoint directory (.../checkpoints/step_X), "
                          "a checkpoints directory (holding `latest`) or a run directory")
    if ckpt.looks_like_checkpoint(p):
        found = p
    else:
        run = RunDir.open(p)
        root = next((c for c in (p, run.checkpoints) if (c / ckpt.LATEST).is_file()), None)
        if root is None:
            if run.is_run():
                raise ExportError(f"run directory {p} has no {ckpt.LATEST} in {run.checkpoints}: the run saved no "
                                  "checkpoint yet")
            raise ExportError(f"{p} is not a checkpoint: expected a checkpoint directory "
                              f"(.../checkpoints/step_X with {ckpt.COMPLETE_MARKER}), a checkpoints directory "
                              f"with a `{ckpt.LATEST}` file, or a run directory with checkpoints/{ckpt.LATEST}")
        tag = (root / ckpt.LATEST).read_text().strip()
        found = root / tag
        if not found.is_dir():
            raise ExportError(f"{root / ckpt.LATEST} names {tag!r}, but {found} does not exist")
    ckpt.describe(found)  # CheckpointError naming the directory when incomplete
    return found


def find_run(ckpt_dir: Path, config_path: Optional[Union[str, Path]] = None) -> tuple[RunDir, Path]:
    """(the run, its config.yaml) of a checkpoint: ``--config`` when given, else the run
    directory the checkpoint sits in."""
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ExportError(f"run config {path} (--config) does not exist")
        return RunDir.open(path.parent), path
    run = RunDir.of_checkpoint(ckpt_dir)
    if run is None:
        looked = [ckpt_dir.parent.parent / RunDir.CONFIG, ckpt_dir.parent / RunDir.CONFIG]
        raise ExportError(f"no {RunDir.CONFIG} found for checkpoint {ckpt_dir} (looked for "
                          f"{' and '.join(str(c) for c in looked)}): export needs the run's resolved config "
                          f"for the base model and prompt settings; pass --config RUN_DIR/{RunDir.CONFIG}")
    return run, run.config_file


def read_run_config(path: Path):
    """(raw dict, ModelConfig, ProcessingConfig) from a run's config.yaml.

    Only the model and processing sections are interpreted (and the export dtype, by
    `export_checkpoint`), so a run whose data or DeepSpeed config files are not on this
    machine still exports.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ExportError(f"cannot read the run config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ExportError(f"run config {path} is not a mapping")
    try:
        model_cfg = config_from_dict(ModelConfig, raw.get("model") or {}, source=f"{path} (model)")
        processing = config_from_dict(ProcessingConfig, raw.get("processing") or {}, source=f"{path} (processing)")
    except (ConfigError, ValueError) as exc:
        raise ExportError(f"invalid run config {path}: {exc}") from exc
    return raw, model_cfg, processing


def _check_base_model(base: str, config_path: Path, overridden: bool) -> Path:
    where = "--base-model" if overridden else f"model.path in {config_path}"
    path = Path(base) if base else None
    if path is None or not path.is_dir():
        raise ExportError(f"base model directory {base!r} ({where}) not found: export reads the architecture, "
                          "tokenizer and processor from it; pass --base-model DIR where it lives on this machine")
    if not (path / "config.json").is_file():
        raise ExportError(f"base model directory {path} ({where}) has no config.json: not a transformers "
                          "model directory")
    return path


def _load_consolidated(model, state: dict[str, torch.Tensor], ckpt_dir: Path, base: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise ExportError(f"checkpoint {ckpt_dir} does not match the model built from {base} with the run's "
                          f"model settings: missing {show(missing) or 'none'}; unexpected {show(unexpected) or 'none'}")


def export_checkpoint(checkpoint: Union[str, Path], out_dir: Union[str, Path], *, dtype: Optional[str] = None,
                      max_shard_size: Union[str, int] = "5GB", force: bool = False,
                      base_model: Optional[str] = None, config_path: Optional[Union[str, Path]] = None) -> Path:
    """Consolidate a training checkpoint into a transformers model directory (one CPU process).

    ``dtype``: the weights' dtype; None takes the run's own ``export.dtype`` (what its
    end-of-training export used), bfloat16 when the config does not say."""
    out = Path(out_dir)
    check_destination(out, force)  # before the (long) consolidation
    ckpt_dir = resolve_checkpoint_dir(checkpoint)
    # What resume checks, checked here too: a flipped byte in the fp32 masters would
    # otherwise be exported without a word (sizes and CRC-32 of every file, ~2 GB/s).
    marker = ckpt.verify_checkpoint(ckpt_dir, checksums=True, purpose="export")
    run, cfg_file = find_run(ckpt_dir, config_path)
    raw, model_cfg, processing = read_run_config(cfg_file)
    if dtype is None:
        dtype = (raw.get("export") or {}).get("dtype") or ExportConfig.dtype
        logger.info("export dtype %s (the run's export.dtype; --dtype overrides it)", dtype_name(_dtype(dtype)))
    target = _dtype(dtype)
    base = _check_base_model(base_model or model_cfg.path, cfg_file, base_model is not None)

    logger.info("consolidating %s", ckpt_dir)
    state = consolidate_checkpoint(ckpt_dir)
    build_cfg = dataclasses.replace(model_cfg, path=str(base), dtype="float32", attn_implementation="sdpa",
                                    gradient_checkpointing="off")
    model, _ = load_embedding_model(build_cfg, load_processor_too=False)
    _load_consolidated(model, state, ckpt_dir, base)
    del state
    lora = _is_peft(model.hf_model)
    hf_model = model.hf_model.merge_and_unload() if lora else model.hf_model
    hf_model.to(target)

    processor = load_processor(str(base), model.backbone)
    # The training formatter: every processing field of the run config, as train.py builds it.
    formatter = InputFormatter.from_config(processor, model.backbone, processing)
    source = {"checkpoint": str(ckpt_dir.resolve()), "step": marker.get("step"),
              "world_size": marker.get("world_size"), "base_model": str(base)}
    try:
        dims = run_matryoshka_dims(raw, model.hidden_size)
    except ValueError as exc:
        raise ExportError(f"invalid run config {cfg_file}: objective: {exc}") from None
    metadata = embedding_metadata(model, formatter, export_dtype=target, model_class=type(hf_model).__name__,
                                  lora_merged=lora, source=source, matryoshka_dims=dims)
    summary = {"steps": marker.get("step"), "ranks": marker.get("world_size"), "checkpoint": ckpt_dir.name}
    metrics = run.last_metrics()
    if metrics:
        summary["final_metrics"] = metrics
    path = write_model_dir(hf_model, None, processor, out, metadata, model_card(raw, metadata, summary),
                           max_shard_size=max_shard_size, force=force)
    logger.info("exported %s to %s", ckpt_dir, path)
    return path


# -------------------------------------------------------------------------------- CLI

def _shard_size(text: str) -> Union[str, int]:
    return int(text) if text.isdigit() else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint directory (.../checkpoints/step_X), a checkpoints directory "
                             "(uses its `latest`) or a run directory (uses its checkpoints' `latest`)")
    parser.add_argument("--out", required=True, help="destination model directory")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32", "bfloat16", "float32"],
                        help="weight dtype of the export (default: the run's export.dtype, else bf16)")
    parser.add_argument("--max-shard-size", default="5GB", type=_shard_size,
                        help="largest safetensors shard, e.g. 5GB, 500MB or a byte count (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    parser.add_argument("--base-model", default=None,
                        help="base model directory (default: model.path of the run's config.yaml)")
    parser.add_argument("--config", default=None,
                        help="the run's config.yaml (default: found next to the checkpoints directory)")


def run(args: argparse.Namespace) -> int:

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        path = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                 force=args.force, base_model=args.base_model, config_path=args.config)
    except (ExportError, CheckpointError) as exc:
        print(f"llave-ds export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"export": str(path)}))
    return 0
