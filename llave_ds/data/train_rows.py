"""One MMEB-train row's sides, checked: the rule every reader of training rows shares.

A row holds a query (``qry``, ``qry_image_path``, ``qry_video_path``), its positive
(``pos_text``, ``pos_image_path``, ``pos_video_path``) and optional hard negatives (``neg_text``,
``neg_image_path``, ``neg_video_path``: one string, as MMEB-train writes them, or lists of equal
length). `parse_row` checks types and content without touching a file; a problem is a
`RowProblem` with its skip reason and field, which the caller turns into an error naming the
file and row (`llave_ds.data.mmeb_train` for training, `llave_ds.mine.run` for mining).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping, Tuple

# Skip reasons (keys of the skip counters): the media ones of llave_ds.media.files
# (missing_image, empty_image_file, unreadable_image, image_too_large, path_outside_root,
# missing_video, empty_video_file, unreadable_video, no_video_stream, no_frames, bad_frame,
# video_too_large), and these row ones.
EMPTY_SIDE = "empty_side"
WRONG_TYPE = "wrong_type"
MISSING_NEGATIVES = "missing_negatives"
IMAGE_AND_VIDEO = "image_and_video"  # a side naming both an image and a video


class RowProblem(Exception):
    """Internal: what is wrong with one row; turned into a DataError with its location."""

    def __init__(self, reason: str, field_name: str, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field_name, detail




def _as_text(value: Any, field_name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise RowProblem(WRONG_TYPE, field_name, f"expected a string, got {type(value).__name__} {_short(value)}")


def _as_text_list(value: Any, field_name: str) -> List[str]:
    """A negatives field: "" / None (none), one string (MMEB-train), or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, (list, tuple)):
        return [_as_text(v, f"{field_name}[{i}]") for i, v in enumerate(value)]
    raise RowProblem(WRONG_TYPE, field_name,
                      f"expected a string or a list of strings, got {type(value).__name__} {_short(value)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# (text, image path, video path) of one side; "" = none.
SideFields = Tuple[str, str, str]


@dataclass
class RowSides:
    query: SideFields
    target: SideFields
    negatives: List[SideFields]
    # The row's field names of each negative (its index in the row's lists, which may skip
    # empty entries): "neg_image_path[3]" names the file the user wrote.
    negative_index: List[int] = field(default_factory=list)


def _one_medium(text_field: str, image_field: str, video_field: str, side: SideFields, what: str) -> None:
    text, image, video = side
    if image and video:
        raise RowProblem(IMAGE_AND_VIDEO, video_field, f"{what} has both an image ({image_field}={image!r}) and a "
                          f"video ({video_field}={video!r}); a side holds at most one of them")
    if not text.strip() and not image and not video:
        raise RowProblem(EMPTY_SIDE, text_field, f"{what} has neither text ({text_field}) nor image "
                          f"({image_field}) nor video ({video_field})")


def parse_row(row: Mapping[str, Any], num_negatives: int, *, every_negative: bool = False) -> RowSides:
    """Type- and content-check one row (no file access). num_negatives=0: ignore negatives.
    ``every_negative``: keep all the row's non-empty negatives, none required (the shard
    writer, which keeps the row whole for any later ``num_hard_negatives``)."""
    query = (_as_text(row.get("qry"), "qry"), _as_text(row.get("qry_image_path"), "qry_image_path"),
             _as_text(row.get("qry_video_path"), "qry_video_path"))
    target = (_as_text(row.get("pos_text"), "pos_text"), _as_text(row.get("pos_image_path"), "pos_image_path"),
              _as_text(row.get("pos_video_path"), "pos_video_path"))
    _one_medium("qry", "qry_image_path", "qry_video_path", query, "query")
    _one_medium("pos_text", "pos_image_path", "pos_video_path", target, "positive")
    negatives: List[SideFields] = []
    index: List[int] = []
    if num_negatives > 0 or every_negative:
        texts = _as_text_list(row.get("neg_text"), "neg_text")
        paths = _as_text_list(row.get("neg_image_path"), "neg_image_path")
        videos = _as_text_list(row.get("neg_video_path"), "neg_video_path")
        n = max(len(texts), len(paths), len(videos))
        for name, values in (("neg_text", texts), ("neg_image_path", paths), ("neg_video_path", videos)):
            if values and len(values) != n:
                lengths = ", ".join(f"{len(v)} {k}" for k, v in (("neg_text", texts), ("neg_image_path", paths),
                                                                 ("neg_video_path", videos)) if v)
                raise RowProblem(WRONG_TYPE, name, f"the negatives' lists differ in length ({lengths} entries)")
        texts, paths, videos = (v or [""] * n for v in (texts, paths, videos))
        for i, side in enumerate(zip(texts, paths, videos)):
            if side[1] and side[2]:
                _one_medium("neg_text", f"neg_image_path[{i}]", f"neg_video_path[{i}]", side, f"negative {i}")
            if side[0].strip() or side[1] or side[2]:
                negatives.append(side)
                index.append(i)
        if every_negative:
            return RowSides(query, target, negatives, index)
        if len(negatives) < num_negatives:
            raise RowProblem(MISSING_NEGATIVES, "neg_text", f"row has {len(negatives)} hard negative(s), "
                              f"{num_negatives} required (num_hard_negatives)")
        negatives, index = negatives[:num_negatives], index[:num_negatives]
    return RowSides(query, target, negatives, index)


def train_row_sides(row: Mapping[str, Any]) -> Tuple[SideFields, SideFields]:
    """The (text, image path, video path) of a row's query and of its positive, checked by the
    training reader's own rule (`parse_row`, negatives ignored); a ValueError names the field."""
    try:
        sides = parse_row(row, 0)
    except RowProblem as p:
        raise ValueError(f"field {p.field!r}: {p.detail}") from None
    return sides.query, sides.target


def media_fields(sides: RowSides) -> List[Tuple[str, str, str]]:
    """(field name, relative path, "image" | "video") of every image and video the pair needs."""
    out = []
    for prefix, side in (("qry", sides.query), ("pos", sides.target)):
        if side[1]:
            out.append((f"{prefix}_image_path", side[1], "image"))
        if side[2]:
            out.append((f"{prefix}_video_path", side[2], "video"))
    for i, side in zip(sides.negative_index, sides.negatives):
        if side[1]:
            out.append((f"neg_image_path[{i}]", side[1], "image"))
        if side[2]:
            out.append((f"neg_video_path[{i}]", side[2], "video"))
    return out
