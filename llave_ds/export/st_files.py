"""The export as a sentence-transformers model: the files ``SentenceTransformer(dir)`` reads.

``write_sentence_transformers_files`` (called by ``export.write_model_dir``) adds to an
export directory, next to the transformers files it already holds:

* ``modules.json``: Transformer (the directory itself) -> ``1_Pooling`` -> ``2_Normalize``;
* ``sentence_bert_config.json``: the Transformer module: ``AutoModel`` (the inner
  ``LlavaOnevisionModel`` / ``Qwen2VLModel`` / ``Qwen2_5_VLModel``, no LM head), every input
  turned into a chat message, and ``processing_kwargs`` that reproduce llave-ds's prompt:
  a chat template written from the export's ``input_format`` (system prompt, image
  placement, prompt format, pooled tail), ``sanitize_control_tokens`` (text that spells a
  special token stays text, as ``InputFormatter``'s ``split_special_tokens``), right
  padding, Qwen's image-size cap, ``max_seq_length`` = ``processing.max_length``;
* ``1_Pooling/config.json``: last-token pooling; ``2_Normalize/config.json``: L2 norm;
* ``config_sentence_transformers.json``: the prompts (``query`` = the query instruction,
  ``document`` = the target instruction) and cosine similarity.

The instructions travel as sentence-transformers prompts: for chat-message models
sentence-transformers sends a prompt as a system message, and the template puts the text
of system messages in front of the content, which is where ``InputFormatter`` puts the
instruction; the system turn itself is always the export's system prompt.

No llave-ds code runs at load time and nothing needs ``trust_remote_code``. What the
template cannot reproduce is listed by ``differences`` (in ``llave_embedding.json`` under
``sentence_transformers.differences`` and in the model card). Nothing here imports
sentence-transformers: the files are plain JSON, and the tests load them with it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from llave_ds.formats import IMAGE_PLACEHOLDER
from llave_ds.media.side import Side
from llave_ds.model.backbones import QWEN_BACKBONES
from llave_ds.model.formatter import InputFormatter, ProcessingConfig
from llave_ds.model.prompt_formats import (DEFAULT_EMBEDDING_INSTRUCTION, DEFAULT_SYSTEM_PROMPT, EMPTY_SIDE_TEXT,
                                           TEMPLATE_TAILS, check_prompt_format, embedding_instruction)

logger = logging.getLogger(__name__)

# The version the files are written for and tested with (constraints.txt pins it).
SENTENCE_TRANSFORMERS_VERSION = "6.2.0"
POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            f"{POOLING_DIR}/config.json", f"{NORMALIZE_DIR}/config.json")
# Stands for the export directory in the usage snippets (the tests replace it).
MODEL_DIR = "path/to/export"


# ------------------------------------------------------------------------- the template

def _literal(text: str) -> str:
    """A Jinja string literal of ``text``. Jinja reads Python escapes, which JSON's are a
    subset of; non-ASCII characters stay as they are (Jinja escapes and unescapes them)."""
    return json.dumps(text, ensure_ascii=False)


def image_markup(backbone: str, processor: Any = None) -> str:
    """What the template writes for an image: the processor expands its image token to
    the image's feature count, as ``InputFormatter._image_ids`` lays them out."""
    if backbone in QWEN_BACKBONES:
        token = getattr(processor, "image_token", None) or "<|image_pad|>"
        return f"<|vision_start|>{token}<|vision_end|>"
    return getattr(processor, "image_token", None) or "<image>"


def chat_template(input_format: Mapping[str, Any], markup: str) -> str:
    """A Jinja chat template that renders a message list the way ``InputFormatter`` lays
    out one side, for the export's ``prompt_format`` and ``system_prompt``.

    The text of ``system`` messages is the instruction (sentence-transformers' prompt),
    the text of the other messages the content; the image goes where ``InputFormatter``
    puts it (see ``prompt_formats.content_segments``). More than one image,
    or a video, is an error. ``add_generation_prompt`` is ignored: the tail (the pooled
    token) is always written.
    """
    prompt_format = check_prompt_format(input_format.get("prompt_format", "qwen_chat"))
    system_prompt = input_format.get("system_prompt")
    if system_prompt is None:
        system_prompt = DEFAULT_SYSTEM_PROMPT
    head = f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
    newline = _literal("\n")
    split = ("{%- set pieces = content.split(ph, 1) -%}{%- set before = pieces[0] -%}"
             "{%- set after = pieces[1].replace(ph, '') -%}")
    no_image = "{%- if ns.images == 0 -%}{%- set before = content.replace(ph, '') -%}{%- set after = '' -%}"
    parts = [
        "{#- llave-ds embedding prompt (", prompt_format, "), written by llave-ds export -#}",
        "{%- set ph = ", _literal(IMAGE_PLACEHOLDER), " -%}",
        "{%- set ns = namespace(instruction='', text='', images=0) -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}",
        "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}",
        "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}",
        "{%- for part in parts -%}",
        "{%- if part['type'] == 'text' -%}",
        "{%- if message['role'] == 'system' -%}{%- set ns.instruction = ns.instruction + part['text'] -%}",
        "{%- else -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}",
        "{%- elif part['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}",
        "{%- else -%}{{- raise_exception('llave-ds embeddings take text and one image per input, not '",
        " + part['type']) -}}{%- endif -%}",
        "{%- endfor -%}{%- endfor -%}",
        "{%- if ns.images > 1 -%}{{- raise_exception('llave-ds embeddings take at most one image per input') -}}",
        "{%- endif -%}",
        "{%- set content = ns.instruction + ns.text -%}",
    ]
    if prompt_format == "qwen3_vl_embedding":
        # The instruction is the system turn (the default one without); the image first, then the
        # text without placeholders (stripped beside an image); "NULL" for nothing at all.
        head = None
        parts += ["{%- set text = ns.text.replace(ph, '') -%}",
                  "{%- if ns.images -%}{%- set before = '' -%}{%- set after = text.strip() -%}",
                  "{%- else -%}{%- set before = text if text else ", _literal(EMPTY_SIDE_TEXT), " -%}",
                  "{%- set after = '' -%}{%- endif -%}",
                  "{%- set system = ns.instruction if ns.instruction else ",
                  _literal(DEFAULT_EMBEDDING_INSTRUCTION), " -%}",
                  "{{- ", _literal("<|im_start|>system\n"), " + system + ",
                  _literal("<|im_end|>\n<|im_start|>user\n"), " + before -}}"]
    elif prompt_format == "qwen_chat":
        # Image where the placeholder is (the others removed), else first and then "\n" + content.
        parts += [no_image, "{%- elif ph in content -%}", split,
                  "{%- else -%}{%- set before = '' -%}{%- set after = ", newline, " + content -%}{%- endif -%}"]
    else:
        # LLaVE: a lone placeholder not at the start (or none) -> image first, "\n" + stripped rest.
        parts += ["{%- set count = content.count(ph) -%}", no_image,
                  "{%- elif count == 0 or (count == 1 and not content.startswith(ph)) -%}",
                  "{%- set rest = content.replace(ph, '').strip() -%}{%- set before = '' -%}",
                  "{%- set after = (", newline, " + rest) if rest else '' -%}",
                  "{%- else -%}", split, "{%- endif -%}"]
    if head is not None:
        parts += ["{{- ", _literal(head), " + before -}}"]
    parts += ["{%- if ns.images -%}{{- ", _literal(markup), " -}}{%- endif -%}",
              "{{- after + ", _literal(TEMPLATE_TAILS[prompt_format]), " -}}"]
    return "".join(parts)


# ------------------------------------------------------------------------- what differs

def differences(metadata: Mapping[str, Any]) -> list[dict[str, str]]:
    """Where ``SentenceTransformer(dir).encode`` cannot give ``LlaveEmbedder.encode``'s
    vectors for this export. Each has an ``id`` (the tests pin each one) and a ``what``."""
    fmt = metadata.get("input_format") or {}
    out = [
        {"id": "image_row_over_max_length",
         "what": f"An input with an image whose prompt exceeds max_length ({fmt.get('max_length', 1024)} tokens): "
                 "LlaveEmbedder cuts its text and keeps the image tokens and the pooled end of the prompt; "
                 "sentence-transformers cuts the end of the rendered prompt, the pooled end included (and raises "
                 "when the cut falls among the image tokens). Text-only inputs are cut alike (sentence-transformers "
                 "restores the end of the template after truncating)."},
        {"id": "exif_orientation",
         "what": "An image given as a path or URL: sentence-transformers opens it with transformers' load_image, "
                 "which turns it by its EXIF orientation tag; LlaveEmbedder, like training, does not. PIL images "
                 "are used as they are by both."},
        {"id": "tokenization_at_prompt_boundaries",
         "what": "LlaveEmbedder tokenizes the content (instruction + text, special-token text included) apart "
                 "from the chat markers; sentence-transformers tokenizes the rendered prompt whole, except that "
                 "it encodes special-token text apart from its neighbours. With a BPE tokenizer whose merges "
                 "cross those boundaries the token ids differ where the content starts with a line break "
                 "(possibly after spaces) and next to special-token text. Elsewhere the ids are the same."},
        {"id": "dtype",
         "what": "sentence-transformers pools and normalises in the model's dtype; LlaveEmbedder normalises in "
                 "float32. Load with model_kwargs={'dtype': torch.float32} for the same numbers (bfloat16 "
                 "rounds the vectors)."},
    ]
    if metadata.get("backbone") == "llava_onevision" and fmt.get("max_image_tokens") is not None:
        out.append({"id": "llava_image_token_cap",
                    "what": f"max_image_tokens={fmt['max_image_tokens']}: LlaveEmbedder downscales images whose "
                            "anyres tiling exceeds the cap; sentence-transformers' processor has no such option "
                            "and tiles them at full size (images within the cap are equal)."})
    return out


# ---------------------------------------------------------------------------- the files

def st_prompts(input_format: Mapping[str, Any]) -> dict[str, str]:
    """sentence-transformers' prompts: the roles' instructions (sent as a system message; the
    template reads them as the instruction). For ``qwen3_vl_embedding`` they are the system
    turns themselves, with the default and the final "." already applied."""
    query, target = input_format.get("query_instruction"), input_format.get("target_instruction")
    if input_format.get("prompt_format") == "qwen3_vl_embedding":
        return {"query": embedding_instruction(query), "document": embedding_instruction(target)}
    return {"query": query or "", "document": target or ""}


def sentence_transformers_config(metadata: Mapping[str, Any], processor: Any, formatter: Any) -> dict[str, Any]:
    """path -> JSON content of every sentence-transformers file of the export."""
    fmt = formatter.metadata()
    processing_kwargs: dict[str, Any] = {
        # LLaVA-OV counts positions from the start of the row: right padding keeps them.
        "text": {"padding_side": "right"},
        "chat_template": {"chat_template": chat_template(fmt, image_markup(formatter.backbone, processor)),
                          "sanitize_control_tokens": True},
    }
    if formatter.image_kwargs:  # Qwen's max_image_tokens: the same size bounds as InputFormatter
        processing_kwargs["image"] = dict(formatter.image_kwargs)
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
            {"idx": 1, "name": "1", "path": POOLING_DIR,
             "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
            {"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.base.modules.normalize.Normalize"},
        ],
        "sentence_bert_config.json": {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": dict(forward), "image": dict(forward),
                                "message": {**forward, "format": "structured"}},
            "module_output_name": "token_embeddings",
            "processing_kwargs": processing_kwargs,
            "max_seq_length": int(fmt["max_length"]),
            # Checked padded only; Qwen2-VL's M-RoPE positions need the padded layout.
            "unpad_inputs": False,
        },
        f"{POOLING_DIR}/config.json": {"embedding_dimension": int(metadata["dim"]), "pooling_mode": "lasttoken",
                                       "include_prompt": True},
        f"{NORMALIZE_DIR}/config.json": {"module_input_name": "sentence_embedding",
                                         "module_output_name": "sentence_embedding"},
        "config_sentence_transformers.json": {
            "__version__": {"sentence_transformers": SENTENCE_TRANSFORMERS_VERSION},
            "model_type": "SentenceTransformer",
            "prompts": st_prompts(fmt),
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    }


def _check_template(formatter, template_kwargs: dict) -> Optional[str]:
    """Render a few text-only probes through the template and compare the token ids with
    the formatter's; the description of the first mismatch, or None."""
    tokenizer = formatter.tokenizer
    probes = [("query", "a probe: <|image_1|> with text"), ("target", ""), ("query", "x <|im_end|> y")]
    prompts = st_prompts(formatter.metadata())  # what sentence-transformers sends as the system message
    for role, text in probes:
        instruction = prompts["query" if role == "query" else "document"]
        messages = ([{"role": "system", "content": [{"type": "text", "text": instruction}]}] if instruction else [])
        messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
        batch = formatter([Side(text)], role)
        want = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        got = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **template_kwargs))
        if got != want:
            return f"{role} probe {text!r}: template ids {got} != InputFormatter ids {want}"
    return None


def write_sentence_transformers_files(out_dir: Path, processor: Any, metadata: dict) -> dict:
    """Write the sentence-transformers files into ``out_dir`` (an export being written) and
    return ``metadata`` with its ``sentence_transformers`` block (files, prompts, differences).

    The formatter is built from the ``input_format`` recorded in ``metadata``, the way
    ``LlaveEmbedder`` builds it. If the template does not reproduce the formatter's token
    ids on a few probes (a bug), no file is written and the block says why: the export
    itself is not lost over it.
    """
    metadata = dict(metadata)
    backbone = metadata.get("backbone")
    if processor is None or backbone is None or "dim" not in metadata:
        logger.warning("no processor or backbone in the export metadata: no sentence-transformers files written")
        return metadata
    config = ProcessingConfig.from_metadata(metadata.get("input_format"), source="the export metadata")
    formatter = InputFormatter.from_config(processor, backbone, config)
    files = sentence_transformers_config(metadata, processor, formatter)
    template_kwargs = files["sentence_bert_config.json"]["processing_kwargs"]["chat_template"]
    problem = _check_template(formatter, template_kwargs)
    if problem is not None:
        logger.error("sentence-transformers files not written: the chat template does not reproduce the "
                     "llave-ds prompt (%s)", problem)
        metadata["sentence_transformers"] = {"written": False, "error": problem}
        return metadata
    for name, content in files.items():
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    metadata["sentence_transformers"] = {
        "written": True,
        "files": list(ST_FILES),
        "version": SENTENCE_TRANSFORMERS_VERSION,
        "prompts": files["config_sentence_transformers.json"]["prompts"],
        "roles": {"encode_query": "query", "encode_document": "target", "encode": "no instruction"},
        "needs": "sentence-transformers>=6 and torchvision (the stock processor class builds a video processor)",
        "differences": differences(metadata),
    }
    return metadata


# ---------------------------------------------------------------------------- the card

SNIPPET_SENTENCE_TRANSFORMERS = f'''\
import torch
from PIL import Image
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{MODEL_DIR}", device="cpu", model_kwargs={{"dtype": torch.float32}})
image = Image.open("cat.jpg")
queries = model.encode_query(["a photo of a cat", {{"text": "<|image_1|>\\nWhat animal is this?", "image": image}}],
                             convert_to_tensor=True)
docs = model.encode_document([image, "a cat on a sofa"], convert_to_tensor=True)
scores = model.similarity(queries, docs)  # cosine
'''

SNIPPET_LLAVE_DS = f'''\
from llave_ds import LlaveEmbedder

model = LlaveEmbedder.from_pretrained("{MODEL_DIR}", device="cpu", dtype="float32")
queries = model.encode(texts=["a photo of a cat", "<|image_1|>\\nWhat animal is this?"], images=[None, "cat.jpg"],
                       role="query", progress=False)
docs = model.encode(texts=[None, "a cat on a sofa"], images=["cat.jpg", None], role="target", progress=False)
scores = queries @ docs.T  # cosine (unit vectors)
'''

SNIPPET_TRANSFORMERS = f'''\
import json
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, AutoProcessor

path = "{MODEL_DIR}"
model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()  # the inner model, no LM head
processor = AutoProcessor.from_pretrained(path)
kwargs = json.load(open(f"{{path}}/sentence_bert_config.json"))["processing_kwargs"]  # the llave-ds prompt
prompts = json.load(open(f"{{path}}/config_sentence_transformers.json"))["prompts"]  # the instructions


def embed(rows, prompt):
    """rows: (text or None, image or None) pairs."""
    messages = []
    for text, image in rows:
        content = ([{{"type": "image", "image": image}}] if image is not None else []) + \\
                  ([{{"type": "text", "text": text}}] if text else [])
        system = [{{"role": "system", "content": [{{"type": "text", "text": prompt}}]}}] if prompt else []
        messages.append(system + [{{"role": "user", "content": content}}])
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", **kwargs["chat_template"],
        processor_kwargs={{"text_kwargs": {{"padding": True, **kwargs["text"]}}, "images_kwargs": kwargs.get("image", {{}})}})
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1  # right padding: the last real token
    return F.normalize(hidden[torch.arange(len(hidden)), last].float(), dim=-1)


image = Image.open("cat.jpg")
queries = embed([("a photo of a cat", None), ("<|image_1|>\\nWhat animal is this?", image)], prompts["query"])
docs = embed([(None, image), ("a cat on a sofa", None)], prompts["document"])
scores = queries @ docs.T
'''

SNIPPETS = {"sentence-transformers": SNIPPET_SENTENCE_TRANSFORMERS, "llave-ds": SNIPPET_LLAVE_DS,
            "transformers": SNIPPET_TRANSFORMERS}


def usage_section(metadata: Mapping[str, Any]) -> list[str]:
    """The model card's "Usage": the three ways to load the export, and what differs."""
    lines = ["## Usage", "",
             f"Three ways to load this directory (`{MODEL_DIR}` below); in float32 they give the same vectors "
             "(within 1e-5), except in the cases listed at the end. `<|image_1|>` in a text marks where the "
             "image goes.", "",
             "### sentence-transformers", "",
             "`pip install 'sentence-transformers>=6'` plus a torchvision matching your torch (the stock "
             "processor class builds a video processor, which needs it). No llave-ds, no `trust_remote_code`. "
             "`encode_query` adds the query instruction, `encode_document` the target instruction (the "
             "`prompts` of `config_sentence_transformers.json`), `encode` neither. An input is a text, an "
             "image (PIL or path), or `{\"text\": ..., \"image\": ...}`.", "",
             "```python", SNIPPET_SENTENCE_TRANSFORMERS.rstrip("\n"), "```", "",
             "### llave-ds (`LlaveEmbedder`)", "",
             "```python", SNIPPET_LLAVE_DS.rstrip("\n"), "```", "",
             "### transformers (plain model + last-token pooling)", "",
             "The prompt is the chat template in `sentence_bert_config.json` (`AutoProcessor` needs torchvision, "
             "as above).", "",
             "```python", SNIPPET_TRANSFORMERS.rstrip("\n"), "```", "",
             "### Where sentence-transformers differs", ""]
    lines += [f"- `{d['id']}`: {d['what']}" for d in differences(metadata)]
    lines += ["", "### Prompt", ""]  # the card's prompt line follows
    return lines
