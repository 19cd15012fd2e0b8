"""Per-subset score files: ``<subset>_score.json`` written as each subset finishes (the official
VLM2Vec eval's naming), and the fingerprints that let a re-run reuse one instead of encoding
the subset again: the model's files, the subset's data files and the options of the run.
A score file is reused only when all three match exactly (docs/EVALUATION.md).
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from llave_ds.data.mmeb_files import is_local_source
from llave_ds.eval.mmeb_data import find_eval_files
from llave_ds.eval.mmeb_metrics import subset_registry
from llave_ds.files import atomic_write_text
from llave_ds.formats import EMBEDDING_METADATA

SCORE_FILE_SUFFIX = "_score.json"
SCORE_FILE_FORMAT = 1
# Files of a model directory whose change changes the embeddings (weights, configs,
# tokenizer, prompt settings). Other files (e.g. an eval JSON written into it) are ignored.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MODEL_FILES = {"config.json", EMBEDDING_METADATA, "generation_config.json", "preprocessor_config.json",
                "processor_config.json", "video_preprocessor_config.json", "chat_template.json",
                "chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "model.safetensors.index.json"}



def score_file(scores_dir: Path, subset: str) -> Path:
    """``<scores_dir>/<subset>_score.json`` (the official VLM2Vec eval's naming)."""
    if not subset or os.sep in subset or (os.altsep and os.altsep in subset) or subset in (".", ".."):
        raise ValueError(f"subset name {subset!r} cannot name a score file")
    return Path(scores_dir) / f"{subset}{SCORE_FILE_SUFFIX}"


def model_fingerprint(model_dir: str) -> dict:
    """What identifies the model cheaply: its resolved path and (size, mtime) of the files that
    make the embeddings (weights, configs, tokenizer, llave_embedding.json). Weights are not
    hashed (tens of GB); a rewritten or re-exported file changes its mtime."""
    path = Path(model_dir).expanduser().resolve()
    files = {}
    if path.is_dir():
        for f in sorted(path.iterdir()):
            name = f.name
            if f.is_file() and (name.endswith(_WEIGHT_SUFFIXES) or name in _MODEL_FILES
                                or name.startswith("tokenizer")):
                st = f.stat()
                files[name] = [st.st_size, st.st_mtime_ns]
    return {"path": str(path), "files": files}


def data_fingerprint(data: str, subset: str, split: str, *, source_type: str = "auto") -> dict:
    """A local subset's data files with (size, mtime); for a hub id, the id, subset and split."""
    if not is_local_source(data, source_type):
        return {"hub": data, "subset": subset, "split": split}
    return {"files": files_fingerprint(find_eval_files(os.path.expanduser(data), subset, split))}


def files_fingerprint(paths) -> dict:
    """``{absolute path: [size, mtime_ns]}`` of data files: what identifies a download cheaply
    (a re-downloaded or edited file changes its mtime)."""
    files = {}
    for f in paths:
        st = os.stat(f)
        files[os.path.abspath(f)] = [st.st_size, st.st_mtime_ns]
    return files


def _fingerprint_difference(stored: Any, current: Any, where: str = "") -> Optional[str]:
    """The first difference of two fingerprints, as a readable path (None when equal)."""
    if isinstance(stored, dict) and isinstance(current, dict):
        for key in list(current) + [k for k in stored if k not in current]:
            if key not in stored or key not in current:
                return f"{where}{key} only in the {'new' if key in current else 'stored'} fingerprint"
            diff = _fingerprint_difference(stored[key], current[key], f"{where}{key}.")
            if diff:
                return diff
        return None
    if stored != current:
        return f"{where.rstrip('.')}: stored {stored!r}, now {current!r}"
    return None


_RECORD_KEYS = ("p_at_1", "num_queries", "num_embedded", "empty_sides", "gap", "per_query", "fingerprint")


def read_score_file(path: Path, subset: str, fingerprint: Mapping[str, Any]) -> tuple[Optional[dict], str]:
    """``(record, "")`` when ``path`` holds this subset's result for exactly this fingerprint,
    else ``(None, why not)``."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, "no score file"
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if record.get("format") != SCORE_FILE_FORMAT:
        return None, f"format {record.get('format')!r}, expected {SCORE_FILE_FORMAT}"
    if record.get("subset") != subset:
        return None, f"holds subset {record.get('subset')!r}"
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        return None, f"missing field(s) {missing}"
    diff = _fingerprint_difference(record["fingerprint"], json.loads(json.dumps(fingerprint)))
    if diff:
        return None, f"computed with something else ({diff})"
    return record, ""


def write_score_file(path: Path, subset: str, record: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> Path:
    """Write one subset's result atomically (temporary file, then rename): an interrupted
    run never leaves a half-written file that a re-run would trust."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = subset_registry().get(subset)
    full = {"format": SCORE_FILE_FORMAT, "subset": subset,
            "category": info.category if info else None, "distribution": info.distribution if info else None,
            **record, "fingerprint": fingerprint,
            "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(path, json.dumps(full, indent=1))
    return path
