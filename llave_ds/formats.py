"""Names of what llave-ds reads and writes, each written once.

MMEB's placeholders and row fields (VLM2Vec's names, plus our video fields), the two roles a
side is formatted for, and the export's metadata file. A leaf: it imports nothing, and every
layer may import it.
"""
from __future__ import annotations

# Where an image (a video) goes in a side's text; the formatter replaces it with the
# backbone's own tokens.
IMAGE_PLACEHOLDER = "<|image_1|>"
VIDEO_PLACEHOLDER = "<|video_1|>"
PLACEHOLDERS = {"image": IMAGE_PLACEHOLDER, "video": VIDEO_PLACEHOLDER}

# The roles a side is formatted for (instructions differ); negatives are formatted as targets.
QUERY, TARGET = "query", "target"
ROLES = (QUERY, TARGET)

# MMEB-train rows: (text, image path, video path) of each side. Paths are relative to an
# image root; "" (or absent) means none. The video fields are llave-ds's (docs/DATA.md).
TRAIN_SIDE_FIELDS = {
    QUERY: ("qry", "qry_image_path", "qry_video_path"),
    TARGET: ("pos_text", "pos_image_path", "pos_video_path"),
    "negative": ("neg_text", "neg_image_path", "neg_video_path"),
}
REQUIRED_TRAIN_FIELDS = TRAIN_SIDE_FIELDS[QUERY][:2] + TRAIN_SIDE_FIELDS[TARGET][:2]
NEGATIVE_FIELDS = TRAIN_SIDE_FIELDS["negative"][:2]
VIDEO_FIELDS = tuple(fields[2] for fields in TRAIN_SIDE_FIELDS.values())
TRAIN_FIELDS = REQUIRED_TRAIN_FIELDS + NEGATIVE_FIELDS + VIDEO_FIELDS

# MMEB-eval rows: one query and its candidates, the ground truth first.
EVAL_FIELDS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")

# The export's description of itself (pooling, dimension, prompt format), beside config.json.
EMBEDDING_METADATA = "llave_embedding.json"
# ``llave-ds mine``'s provenance, written beside the mined data (not a subset: `mmeb_files` skips it)
MINING_RECORD = "mining.json"
