"""Text-video retrieval scoring: Recall@K and median / mean rank from a similarity matrix,
and a loader for test splits (JSONL / CSV of video paths and captions).

Pure numpy (torch tensors are accepted); no models. See docs/VIDEO.md.

Inputs: ``sim`` [num_captions, num_videos] (text x video, e.g. cosine similarities) and
``caption_to_video`` [num_captions], the index of each caption's video. A video may have
several captions (MSVD: ~40); each video needs at least one.

Protocol (ranks are 1-based; R@K = fraction of queries with rank <= K):

- text -> video: every caption is a query; its rank is the position of its own video
  among all videos. With one caption per video (MSR-VTT 1k-A) this is the usual N x N
  protocol; with several, every caption counts once (as CLIP4Clip's multi-sentence
  scoring does).
- video -> text (``v2t_protocol="caption"``, default): every video is a query against the
  pool of all captions; its rank is the position of its *best-ranked* correct caption,
  so a hit@K means "any of the video's captions is in the top K". Why: every caption of
  a video is a correct answer and a retrieval system is right when it shows one of them
  near the top; ranking each caption separately would instead penalise a video for
  having many captions (at most one can be first) and weight videos by their caption
  count. This is the COCO / Flickr image->text protocol (5 captions per image).
  ``v2t_protocol="group"`` is CLIP4Clip's MSVD video->text variant: each video's
  captions are merged into one candidate scored by their maximum, and the video ranks
  the *videos* by that score (other captions of one wrong video count once, not each);
  both agree when every video has one caption.
- median rank (MdR) and mean rank (MnR) are over the per-query ranks.

Ties (exact float equality) follow ``tie_policy``, with the names and meanings of
`llave_ds.eval.mmeb_metrics.precision_at_1`:

- ``"strict"`` (default here): pessimistic; a correct item tied with a wrong one ranks
  after it. The result does not depend on the order of videos or captions in the test
  file, and a collapsed model (all embeddings equal) scores rank = last, R@1 = 0.
- ``"first"``: ``argmax``'s rule; of tied candidates the one with the lower index
  ranks first (what MMEB's official P@1 does, and `precision_at_1`'s default there: in
  MMEB the ground truth is always candidate 0, so it wins its ties; here the ground truth
  sits anywhere, so "first" would make scores depend on file order).

Real embeddings almost never tie; exact ties come from duplicate inputs (two identical
videos, or one caption text given to two videos, frequent in MSVD).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from llave_ds.eval.mmeb_metrics import TIE_POLICIES, _to_numpy

DEFAULT_KS: Tuple[int, ...] = (1, 5, 10)
DEFAULT_TIE_POLICY = "strict"
V2T_PROTOCOLS: Tuple[str, ...] = ("caption", "group")
VIDEO_COLUMNS: Tuple[str, ...] = ("video", "video_path")
CAPTION_COLUMNS: Tuple[str, ...] = ("captions", "caption")
SPLIT_EXTENSIONS: Tuple[str, ...] = (".jsonl", ".csv")


# --------------------------------------------------------------------------- ranks

def _check_inputs(sim: Any, caption_to_video: Any, tie_policy: str) -> Tuple[np.ndarray, np.ndarray]:
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"tie_policy must be one of {list(TIE_POLICIES)}, got {tie_policy!r}")
    s = _to_numpy(sim)
    if s.ndim != 2:
        raise ValueError(f"sim must be a [num_captions, num_videos] matrix, got shape {s.shape}")
    s = s.astype(np.float64, copy=False)
    num_captions, num_videos = s.shape
    if num_captions == 0 or num_videos == 0:
        raise ValueError(f"sim is empty (shape {s.shape})")
    gt = np.asarray(_to_numpy(caption_to_video))
    if gt.shape != (num_captions,):
        raise ValueError(f"caption_to_video must have one entry per caption ({num_captions}), got shape {gt.shape}")
    if gt.dtype.kind not in "iu":
        raise ValueError(f"caption_to_video must hold integer video indices, got dtype {gt.dtype}")
    gt = gt.astype(np.int64)
    bad = np.flatnonzero((gt < 0) | (gt >= num_videos))
    if bad.size:
        raise ValueError(f"caption {int(bad[0])}: video index {int(gt[bad[0]])} out of range for {num_videos} videos")
    if np.isnan(s).any():
        c, v = (int(i) for i in np.argwhere(np.isnan(s))[0])
        raise ValueError(f"sim[{c}, {v}] (caption {c}, video {v}) is NaN")
    return s, gt


def _ranks_of_targets(s: np.ndarray, target: np.ndarray, tie_policy: str) -> np.ndarray:
    """Per row, 1-based rank of column ``target[row]`` among all columns."""
    rows = np.arange(s.shape[0])
    own = s[rows, target][:, None]
    if tie_policy == "strict":
        return (s >= own).sum(axis=1).astype(np.int64)      # counts the target itself: rank >= 1
    before = np.arange(s.shape[1])[None, :] < target[:, None]
    return (1 + (s > own).sum(axis=1) + ((s == own) & before).sum(axis=1)).astype(np.int64)


def text_to_video_ranks(sim: Any, caption_to_video: Any, tie_policy: str = DEFAULT_TIE_POLICY) -> np.ndarray:
    """1-based rank of each caption's video among all videos ([num_captions] ints)."""
    s, gt = _check_inputs(sim, caption_to_video, tie_policy)
    return _ranks_of_targets(s, gt, tie_policy)


def _captions_per_video(gt: np.ndarray, num_videos: int) -> np.ndarray:
    counts = np.bincount(gt, minlength=num_videos)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        listed = ", ".join(str(int(v)) for v in missing[:10]) + (" ..." if missing.size > 10 else "")
        raise ValueError(f"{missing.size} video(s) have no caption (video indices {listed}); video->text needs "
                         "at least one caption per video")
    return counts


def video_to_text_ranks(sim: Any, caption_to_video: Any, tie_policy: str = DEFAULT_TIE_POLICY,
                        protocol: str = "caption") -> np.ndarray:
    """1-based rank of each video's best-ranked correct caption ([num_videos] ints).

    ``protocol="caption"``: among all captions (a hit@K when any of the video's captions
    is in the top K); ``"group"``: among videos, each scored by the maximum over its
    captions (CLIP4Clip's MSVD video->text). See the module docstring.
    """
    if protocol not in V2T_PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(V2T_PROTOCOLS)}, got {protocol!r}")
    s, gt = _check_inputs(sim, caption_to_video, tie_policy)
    num_captions, num_videos = s.shape
    _captions_per_video(gt, num_videos)
    if protocol == "group":
        group = np.full((num_videos, num_videos), -np.inf)    # [caption group (its video), video]
        np.maximum.at(group, gt, s)
        return _ranks_of_targets(group.T, np.arange(num_videos), tie_policy)
    st = s.T                                                   # [video, caption]
    correct = np.zeros(st.shape, dtype=bool)
    correct[gt, np.arange(num_captions)] = True
    best = np.where(correct, st, -np.inf).max(axis=1)[:, None]  # best correct caption's score
    wrong = ~correct
    if tie_policy == "strict":
        return (1 + ((st >= best) & wrong).sum(axis=1)).astype(np.int64)
    # "first": the best correct caption is the first correct one (lowest index) with the best score.
    first = np.argmax(correct & (st == best), axis=1)[:, None]
    before = np.arange(num_captions)[None, :] < first
    return (1 + ((st > best) & wrong).sum(axis=1) + ((st == best) & wrong & before).sum(axis=1)).astype(np.int64)


def rank_summary(ranks: Any, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, Any]:
    """``{"R@K": fraction of ranks <= K, ..., "median_rank", "mean_rank", "num_queries"}``."""
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    out: Dict[str, Any] = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        out[f"R@{int(k)}"] = float((r <= int(k)).mean())
    out.update(median_rank=float(np.median(r)), mean_rank=float(r.mean()), num_queries=int(r.size))
    return out


def retrieval_metrics(sim: Any, caption_to_video: Any, ks: Sequence[int] = DEFAULT_KS,
                      tie_policy: str = DEFAULT_TIE_POLICY, v2t_protocol: str = "caption",
                      return_ranks: bool = False) -> Dict[str, Any]:
    """Text->video and video->text Recall@K, median and mean rank (recalls as fractions).

    Returns ``{"t2v": {...}, "v2t": {...}, "num_videos", "num_captions", "ks",
    "tie_policy", "v2t_protocol", "chance_R@1"}`` where each direction is a
    `rank_summary`; ``chance_R@1`` (= 1 / num_videos) is the expected R@1 of a random
    ranking in both directions. ``return_ranks`` adds ``"ranks"`` to each direction (lists).
    """
    s, gt = _check_inputs(sim, caption_to_video, tie_policy)
    t2v = text_to_video_ranks(s, gt, tie_policy)
    v2t = video_to_text_ranks(s, gt, tie_policy, v2t_protocol)
    out: Dict[str, Any] = dict(t2v=rank_summary(t2v, ks), v2t=rank_summary(v2t, ks), num_videos=int(s.shape[1]),
                               num_captions=int(s.shape[0]), ks=[int(k) for k in ks], tie_policy=tie_policy,
                               v2t_protocol=v2t_protocol)
    out["chance_R@1"] = 1.0 / s.shape[1]
    if return_ranks:
        out["t2v"]["ranks"] = t2v.tolist()
        out["v2t"]["ranks"] = v2t.tolist()
    return out


def similarity_matrix(text_embeddings: Any, video_embeddings: Any, normalize: bool = False) -> np.ndarray:
    """``text @ video.T`` ([num_captions, num_videos]); cosine when the embeddings are
    L2-normalised (LLaVE's are) or with ``normalize=True``."""
    t = _to_numpy(text_embeddings).astype(np.float64)
    v = _to_numpy(video_embeddings).astype(np.float64)
    if t.ndim != 2 or v.ndim != 2 or t.shape[1] != v.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D] embeddings, got {t.shape} and {v.shape}")
    if normalize:
        t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return t @ v.T


def markdown_table(result: Mapping[str, Any], *, percent: bool = True, digits: int = 1) -> str:
    """Markdown of a `retrieval_metrics` result: one row per direction (recalls x100 with ``percent``)."""
    ks = result["ks"]
    head = [f"R@{k}" for k in ks] + ["MdR", "MnR", "queries"]
    lines = ["| direction | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for key, name in (("t2v", "text→video"), ("v2t", "video→text")):
        d = result[key]
        recalls = [f"{d[f'R@{k}'] * (100 if percent else 1):.{digits}f}" for k in ks]
        lines.append(f"| {name} | " + " | ".join(recalls + [f"{d['median_rank']:g}", f"{d['mean_rank']:.{digits}f}",
                                                            str(d["num_queries"])]) + " |")
    lines += ["", f"{result['num_videos']} videos, {result['num_captions']} captions; ties: "
              f"{result['tie_policy']}; video→text protocol: {result['v2t_protocol']}; chance R@1 "
              f"{result['chance_R@1'] * (100 if percent else 1):.{digits}f}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- test split loader

class RetrievalDataError(ValueError):
    """A bad retrieval split; the message names the file, and the line / field when known."""

    def __init__(self, message: str, *, path: Optional[str] = None, line: Optional[int] = None,
                 field_name: Optional[str] = None):
        super().__init__(message)
        self.path, self.line, self.field = path, line, field_name

    def __reduce__(self):
        return _rebuild_retrieval_error, (str(self), self.path, self.line, self.field)


def _rebuild_retrieval_error(message, path, line, field_name):
    return RetrievalDataError(message, path=path, line=line, field_name=field_name)


@dataclass
class RetrievalSplit:
    """A text-video test split: ``videos[v]`` (resolved paths, first-appearance order),
    ``captions[c]`` and ``caption_to_video[c]`` (index into ``videos``)."""
    source: str
    videos: List[str]
    captions: List[str]
    caption_to_video: np.ndarray
    video_keys: List[str] = field(default_factory=list)   # the video values as written in the file

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def captions_of(self, video: int) -> List[str]:
        return [self.captions[c] for c in np.flatnonzero(self.caption_to_video == video)]


def _pick_column(available: Sequence[str], wanted: Optional[str], defaults: Sequence[str], what: str,
                 path: str, line: Optional[int]) -> str:
    if wanted is not None:
        if wanted not in available:
            where = f"{path}, line {line}" if line is not None else path
            raise RetrievalDataError(f"{where}: no {what} field {wanted!r} (found {list(available)})", path=path,
                                     line=line, field_name=wanted)
        return wanted
    for name in defaults:
        if name in available:
            return name
    where = f"{path}, line {line}" if line is not None else path
    raise RetrievalDataError(f"{where}: no {what} field; expected one of {list(defaults)} (or pass "
                             f"{what}_column=...), found {list(available)}", path=path, line=line,
                             field_name=defaults[0])


def _read_jsonl(path: str, video_column: Optional[str], caption_column: Optional[str]):
    with open(path, encoding="utf-8") as fh:
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except ValueError as exc:
                raise RetrievalDataError(f"{path}, line {number}: not valid JSON ({exc})", path=path,
                                         line=number) from None
            if not isinstance(row, dict):
                raise RetrievalDataError(f"{path}, line {number}: expected a JSON object, got "
                                         f"{type(row).__name__}", path=path, line=number)
            vcol = _pick_column(list(row), video_column, VIDEO_COLUMNS, "video", path, number)
            ccol = _pick_column(list(row), caption_column, CAPTION_COLUMNS, "caption", path, number)
            yield number, vcol, row[vcol], ccol, row[ccol]


def _read_csv(path: str, video_column: Optional[str], caption_column: Optional[str]):
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise RetrievalDataError(f"{path}: empty CSV file (no header row)", path=path, line=1)
        names = [n for n in reader.fieldnames if n is not None]
        vcol = _pick_column(names, video_column, VIDEO_COLUMNS, "video", path, 1)
        ccol = _pick_column(names, caption_column, CAPTION_COLUMNS, "caption", path, 1)
        for row in reader:
            number = reader.line_num
            if None in row:
                raise RetrievalDataError(f"{path}, line {number}: more values than header columns", path=path,
                                         line=number)
            yield number, vcol, row[vcol], ccol, row[ccol]


def load_retrieval_split(path: str, *, video_root: Optional[str] = None, video_column: Optional[str] = None,
                         caption_column: Optional[str] = None, video_pattern: str = "{}",
                         check_files: bool = True) -> RetrievalSplit:
    """Read a text-video test split from JSONL or CSV.

    Each row names a video (field ``video`` or ``video_path``, or ``video_column``) and
    its caption(s) (``captions``: a list of strings, or ``caption``: one string; or
    ``caption_column``). CSV rows hold one caption each. Rows naming the same video are
    merged (one row per caption, or a list per video, or both); videos keep the order of
    first appearance, captions the file order. ``video_pattern`` formats the value into a
    path (``"videos/{}.mp4"`` for bare MSR-VTT ids). Relative paths are resolved against
    ``video_root`` (default: the split file's folder). ``check_files``: a video that does
    not exist is an error naming its line.

    Raises `RetrievalDataError` (a ValueError) naming the file, line and field.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in SPLIT_EXTENSIONS:
        raise RetrievalDataError(f"{path}: unsupported split format {ext or '(no extension)'!r}; expected "
                                 f"{' or '.join(SPLIT_EXTENSIONS)}", path=path)
    if not os.path.isfile(path):
        raise RetrievalDataError(f"{path}: split file not found", path=path)
    root = os.path.abspath(video_root if video_root is not None else os.path.dirname(path) or ".")
    rows = _read_jsonl(path, video_column, caption_column) if ext == ".jsonl" else \
        _read_csv(path, video_column, caption_column)
    index: Dict[str, int] = {}
    videos: List[str] = []
    keys: List[str] = []
    captions: List[str] = []
    owner: List[int] = []
    try:
        for number, vcol, value, ccol, caps in rows:
            where = f"{path}, line {number}"
            if not isinstance(value, str) or not value.strip():
                raise RetrievalDataError(f"{where}, field {vcol!r}: expected a non-empty video path, got "
                                         f"{value!r}", path=path, line=number, field_name=vcol)
            was_list = isinstance(caps, list)
            if isinstance(caps, str):
                caps = [caps]
            if not isinstance(caps, list) or not caps:
                raise RetrievalDataError(f"{where}, field {ccol!r}: expected a caption string or a non-empty list "
                                         f"of them, got {caps!r}", path=path, line=number, field_name=ccol)
            for j, cap in enumerate(caps):
                if not isinstance(cap, str) or not cap.strip():
                    at = f"{ccol!r}[{j}]" if was_list else repr(ccol)
                    raise RetrievalDataError(f"{where}, field {at}: expected a non-empty caption string, got "
                                             f"{cap!r}", path=path, line=number, field_name=ccol)
            key = value.strip()
            if key not in index:
                try:
                    rel = video_pattern.format(key)
                except (IndexError, KeyError, ValueError) as exc:
                    raise ValueError(f"video_pattern {video_pattern!r} cannot format {key!r}: {exc}") from None
                full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(root, rel))
                if check_files and not os.path.exists(full):
                    raise RetrievalDataError(f"{where}, field {vcol!r}: video not found: {full}", path=path,
                                             line=number, field_name=vcol)
                index[key] = len(videos)
                videos.append(full)
                keys.append(key)
            captions.extend(c.strip() for c in caps)
            owner.extend([index[key]] * len(caps))
    except UnicodeDecodeError as exc:
        raise RetrievalDataError(f"{path}: not UTF-8 text ({exc})", path=path) from None
    except csv.Error as exc:
        raise RetrievalDataError(f"{path}: malformed CSV ({exc})", path=path) from None
    if not videos:
        raise RetrievalDataError(f"{path}: no rows", path=path)
    return RetrievalSplit(source=path, videos=videos, captions=captions,
                          caption_to_video=np.asarray(owner, dtype=np.int64), video_keys=keys)
