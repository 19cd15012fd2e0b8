"""LLaVE's own prompt preprocessing, re-implemented for tests (imports nothing from llave_ds).

Transcribed from DeepLearnXMU/LLaVE (HEAD 2c23053):

* ``llava/train/train.py``: ``LazySupervisedDataset.__getitem__`` (how query and positive
  conversations are built), ``preprocess_multimodal``, ``preprocess_qwen`` (the path taken
  with ``--version qwen_1_5``: ``conv_qwen.version == "qwen"``);
* ``llava/eval/model_embed.py``: ``EvalDataset.__getitem__`` (the same conversation for
  MMEB eval queries and targets) and its copy of ``preprocess_multimodal``;
* ``llava/model/language_model/llava_qwen.py``: ``_pooling(..., "last")``;
* ``llava/model/llava_arch.py``: ``prepare_inputs_labels_for_multimodal`` (each
  ``IMAGE_TOKEN_INDEX`` becomes the image's features; no index, no features).

Settings of the published runs: ``mm_use_im_start_end False``, the conversation version
``qwen`` (no ``mmtag``), ``preprocess_qwen``'s default system message.
"""
from __future__ import annotations

import copy
import re

IMAGE_TOKEN_INDEX = -200                 # llava/constants.py
DEFAULT_IMAGE_TOKEN = "<image>"          # llava/constants.py
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
SYSTEM_MESSAGE = "You are a helpful assistant."  # preprocess_qwen's default
# preprocess_qwen resets the tokenizer's chat template to this one.
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")


def preprocess_multimodal(sources):
    """train.py ``preprocess_multimodal`` with is_multimodal True, no mmtag, no im_start_end."""
    for source in sources:
        for sentence in source:
            num_im = len(re.findall(DEFAULT_IMAGE_TOKEN, sentence["value"]))
            if (num_im == 1 and DEFAULT_IMAGE_TOKEN in sentence["value"]
                    and not sentence["value"].startswith(DEFAULT_IMAGE_TOKEN)):
                sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                sentence["value"] = DEFAULT_IMAGE_TOKEN + "\n" + sentence["value"]
                sentence["value"] = sentence["value"].strip()
            replace_token = DEFAULT_IMAGE_TOKEN  # mm_use_im_start_end False: no <im_start>/<im_end>
            sentence["value"] = sentence["value"].replace(DEFAULT_IMAGE_TOKEN, replace_token)
            sentence["value"] = sentence["value"].replace("QA_GT_caption_based_noisy", "")
    return sources


def _apply_chat_template(tokenizer, conversation):
    ids = tokenizer.apply_chat_template(conversation, return_dict=False)  # tokenize=True
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def preprocess_qwen(sources, tokenizer, has_image, system_message=SYSTEM_MESSAGE):
    """train.py ``preprocess_qwen``: input ids only (labels do not matter for embeddings)."""
    roles = {"human": "user", "gpt": "assistant"}
    tokenizer = copy.deepcopy(tokenizer)
    if has_image:
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    tokenizer.chat_template = CHAT_TEMPLATE
    input_ids = []
    for source in sources:
        if roles[source[0]["from"]] != roles["human"]:
            source = source[1:]
        input_id = _apply_chat_template(tokenizer, [{"role": "system", "content": system_message}])
        for conv in source:
            role = roles.get(conv["from"], conv["from"])
            input_id += _apply_chat_template(tokenizer, [{"role": role, "content": conv["value"]}])
        input_ids.append([IMAGE_TOKEN_INDEX if t == image_token_index else t for t in input_id])
    return input_ids


def llave_input_ids(text, tokenizer, system_message=SYSTEM_MESSAGE):
    """The input ids LLaVE builds for one side (query ``qry`` or positive ``pos_text``;
    eval: ``qry_text`` / ``tgt_text``), with ``IMAGE_TOKEN_INDEX`` where the image goes.

    ``has_image`` is always True in LLaVE: ``process_image("")`` returns a zero image with
    modality "text", never None, so every side goes through ``preprocess_multimodal``.
    """
    sources = preprocess_multimodal([[{"from": "human", "value": text.replace(MMEB_IMAGE_PLACEHOLDER, "<image>")},
                                      {"from": "gpt", "value": "\n"}]])
    return preprocess_qwen(sources, tokenizer, has_image=True, system_message=system_message)[0]


def expand_image(input_ids, n_image_tokens, image_token_id):
    """What the model sees: each ``IMAGE_TOKEN_INDEX`` replaced by the image's features
    (``n_image_tokens`` positions; in transformers' LLaVA-OV, as many ``<image>`` tokens)."""
    out = []
    for t in input_ids:
        out.extend([image_token_id] * n_image_tokens if t == IMAGE_TOKEN_INDEX else [t])
    return out


def pooled_index(attention_mask_row):
    """llava_qwen.py ``_pooling(..., "last")``: ``attention_mask.sum(dim=1) - 1`` (LLaVE pads
    on the right, so this is the last token of the sequence)."""
    return int(sum(attention_mask_row)) - 1
