"""Training from shards: lanes, so that the global batch of step k depends on (seed, k) only.

The shards are dealt into L lanes (``data.shard_lanes``) over and over: deal c permutes them by
(seed, c) and gives lane l every L-th shard from position l. A lane is its shards' samples end
to end, deal after deal, without end. The global batch of step k is, lane after lane, samples
``[k*p, (k+1)*p)`` of every lane (``p = global_batch_size / L``).
Rank r of W reads lanes ``[r*L/W, (r+1)*L/W)`` (its slice of the global batch, as the folder
sampler gives it its slice), and its DataLoader workers split those lanes into contiguous
blocks: every worker yields its part of every step, collated, and the main process joins the
parts in lane order (`ShardLoader`). Hence:

* the global batch of step k is the same for any rank count that divides L and for any number
  of workers (the rows and their order; chunk boundaries follow the parts);
* each shard is read by one worker of one rank, once per deal;
* resuming at step k starts every lane at sample ``k*p``: the index says which shard and offset,
  and only the samples before it in that one shard are streamed past.

Every sample is read once per deal of its lane, whatever the shard sizes (lanes of uneven
length simply run through their deals at different paces). An epoch is nominal: ``N //
global_batch_size`` steps, for the schedule and the logs; a lane that finished its deal before
another may meet a shard that the other is still reading, so a step can rarely hold a sample
twice, as the folder reader's stand-ins can.

A bad sample (a corrupt or missing member, a picture that does not decode) is an error naming
the shard and key, or with ``data.skip_bad_rows`` is replaced by the next good sample of its
part of the step (this rank's, or this worker's), counted in the batch's ``skipped`` like the
folder reader's replaced rows: the lanes keep their positions, so a resume stays exact.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import tempfile
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from llave_ds.data.batching import TrainBatch, join_batches
from llave_ds.data.errors import DataError
from llave_ds.data.mmeb_train import Pair, TrainDataConfig, pair_from_row
from llave_ds.data.shards.layout import ShardIndex, ShardSlice
from llave_ds.data.shards.reader import BadSample, ShardReader, ShardSample
from llave_ds.data.shards.streams import RetryPolicy
from llave_ds.data.train_rows import RowProblem, media_fields, parse_row
from llave_ds.media.files import UNREADABLE_IMAGE, MediaError
from llave_ds.media.image import decode_image
from llave_ds.media.video import DEFAULT_VIDEO_FRAMES, read_video

logger = logging.getLogger(__name__)


def default_lanes(global_batch_size: int, num_shards: int) -> int:
    """The largest divisor of the global batch that is at most the number of shards."""
    return max(d for d in range(1, min(global_batch_size, num_shards) + 1) if global_batch_size % d == 0)


class ShardBatchPlan:
    """The sampler's part for shards: steps per (nominal) epoch, the epoch, the resume point and
    the lanes. ``TrainState`` saves and restores it as it does a `GlobalBatchSampler`."""

    def __init__(self, index: ShardIndex, *, lanes: int, global_batch_size: int, seed: int, rank: int,
                 world_size: int, where: str):
        n = len(index.shards)
        if global_batch_size % lanes:
            raise DataError(f"data.shard_lanes={lanes} does not divide global_batch_size={global_batch_size}: every "
                            "lane gives each step the same number of samples")
        if lanes > n:
            raise DataError(f"the shard set {where} has {n} shard(s), fewer than data.shard_lanes={lanes}: make "
                            "more, smaller shards (llave-ds shard --shard-size) or lower data.shard_lanes")
        if lanes % world_size:
            raise DataError(f"{lanes} lanes (data.shard_lanes; shards of {where}) cannot be split evenly over "
                            f"{world_size} ranks: use a rank count that divides {lanes}, or set data.shard_lanes to "
                            f"a multiple of {world_size} that divides global_batch_size={global_batch_size}")
        self._steps = index.num_samples // global_batch_size
        if self._steps == 0:
            raise DataError(f"the shard set {where} holds {index.num_samples} samples, fewer than one global batch "
                            f"of {global_batch_size}")
        self.index, self.lanes, self.seed = index, lanes, seed
        self.global_batch_size, self.per_lane = global_batch_size, global_batch_size // lanes
        self.rank, self.world_size = rank, world_size
        self.epoch, self.resume_step = 0, 0

    def __len__(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.resume_step = 0
        self.epoch = epoch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.resume_step, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_samples": self.index.num_samples,
                "lanes": self.lanes}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "global_batch_size", "num_samples", "lanes"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(f"cannot resume: the saved plan had {key}={state[key]}, this one has "
                                 f"{self.state_dict()[key]}; the remaining batches would differ")
        step = int(state["step"])
        if not 0 <= step <= self._steps:
            raise ValueError(f"cannot resume at step {step}: an epoch has {self._steps} steps")
        self.epoch, self.resume_step = int(state["epoch"]), step

    def deal(self, cycle: int, lane: int) -> List[int]:
        """The shards (positions in the index) ``lane`` reads in deal ``cycle``, in order."""
        order = np.random.default_rng([self.seed, cycle]).permutation(len(self.index.shards))
        return order[lane::self.lanes].tolist()

    def rank_lanes(self) -> List[int]:
        per_rank = self.lanes // self.world_size
        return list(range(self.rank * per_rank, (self.rank + 1) * per_rank))


class ShardTrainData(torch.utils.data.IterableDataset):
    """A shard set as training data: yields ``(step, (TrainBatch part, truncated sides))`` for
    this rank and DataLoader worker (``None`` for a worker without lanes); `ShardLoader` joins
    the parts of a step. ``len()`` is the number of samples; ``plan`` plays the sampler."""

    def __init__(self, config: TrainDataConfig, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                 video_frames: Optional[int] = DEFAULT_VIDEO_FRAMES, video_max_side: Optional[int] = None):
        config.validate()
        self.config = config
        self.video_frames, self.video_max_side = video_frames, video_max_side
        self.reader = ShardReader(config.source, config.shard_index,
                                  retry=RetryPolicy(attempts=config.shard_retries, timeout_s=config.shard_timeout_s))
        index = self.reader.index
        lanes = config.shard_lanes or default_lanes(global_batch_size, len(index.shards))
        self.plan = ShardBatchPlan(index, lanes=lanes, global_batch_size=global_batch_size, seed=seed, rank=rank,
                                   world_size=world_size, where=config.source)
        self._num_negatives = config.num_hard_negatives if config.use_hard_negatives else 0
        # Rows dropped when the shards were made, as the folder reader's load-time skips.
        self.skip_counts: Counter = Counter()
        for info in index.subsets.values():
            self.skip_counts.update(info.get("skipped") or {})
        self.has_videos = any(info.get("videos") for info in index.subsets.values())
        self.collator = None  # set by ShardLoader: PairCollator-like, called on each worker's part
        logger.info("shards %s: %d samples in %d shards, %d lanes of %d samples per step, %d steps per epoch",
                    config.source, index.num_samples, len(index.shards), lanes, self.plan.per_lane, len(self.plan))

    def __len__(self) -> int:
        return self.reader.index.num_samples

    def __iter__(self):
        # The epoch and the resume point are read now, not when the generator first runs.
        first = self.plan.epoch * len(self.plan)
        return self._steps_from(first + self.plan.resume_step, first + len(self.plan))

    def worker_lanes(self) -> List[int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.plan.rank_lanes()
        return [mine[i] for i in np.array_split(np.arange(len(mine)), workers)[worker]]

    def _steps_from(self, start: int, end: int) -> Iterator[Tuple[int, Any]]:
        """Global steps ``[start, end)`` of this worker's lanes."""
        p, lanes = self.plan.per_lane, self.worker_lanes()
        streams = [self._lane(lane, start * p) for lane in lanes]
        for step in range(start, end):
            got: List[Union[Pair, DataError]] = []
            for stream in streams:
                got.extend(self._decoded(next(stream)) for _ in range(p))
            yield step, (self.collator(self._stand_ins(got, step)) if got else None)

    def _lane(self, lane: int, offset: int) -> Iterator[Union[ShardSample, BadSample]]:
        """Sample ``offset`` of the lane on, deal after deal (the index alone finds where)."""
        index, cycle = self.reader.index, 0
        while True:
            deal = self.plan.deal(cycle, lane)
            if not any(index.shards[position].num_samples for position in deal):
                raise DataError(f"lane {lane} holds no sample in deal {cycle}: the shard set's index lists empty "
                                "shards; re-make it with llave-ds shard")
            for position in deal:
                info = index.shards[position]
                if offset >= info.num_samples:
                    offset -= info.num_samples
                    continue
                part = ShardSlice(position, info.name, offset, info.num_samples, index.starts[position] + offset)
                yield from self.reader.read_slice(part, placeholders=True)
                offset = 0
            cycle += 1

    def _decoded(self, sample: Union[ShardSample, BadSample]) -> Union[Pair, DataError]:
        if isinstance(sample, BadSample):
            return sample.error
        try:
            return self.pair(sample)
        except DataError as exc:
            return exc

    def _stand_ins(self, got: List[Union[Pair, DataError]], step: int) -> List[Pair]:
        """This worker's part of a step as pairs: a bad sample is an error, or (skip_bad_rows)
        replaced by the next good pair of the part, so that the lanes keep their positions."""
        errors = [g for g in got if isinstance(g, DataError)]
        if errors and not self.config.skip_bad_rows:
            raise DataError(f"{errors[0]}\n(to replace bad samples, counted and logged: data.skip_bad_rows=true)",
                            reason=errors[0].reason, file=errors[0].file, field=errors[0].field)
        if len(errors) == len(got):
            raise DataError(f"step {step + 1}: all {len(got)} samples of this loader's part are bad, nothing can "
                            f"stand in for them; the first: {errors[0]}", reason=errors[0].reason, file=errors[0].file)
        out = []
        for i, item in enumerate(got):
            if isinstance(item, Pair):
                out.append(item)
                continue
            stand_in = next(got[j % len(got)] for j in range(i + 1, i + len(got)) if isinstance(got[j % len(got)], Pair))
            logger.warning("replacing a bad sample by the next good one of the step: %s", item)
            out.append(dataclasses.replace(stand_in, replaced=[item.reason or "unknown"]))
        return out

    def pair(self, sample: ShardSample) -> Pair:
        """A sample's `Pair` (media decoded as the folder reader decodes files), or a DataError
        naming the shard, the key and the field."""
        try:
            sides = parse_row(sample.fields, self._num_negatives)
            media: Dict[str, Any] = {}
            for field_name, path, kind in media_fields(sides):
                if path not in sample.media:
                    raise RowProblem(UNREADABLE_IMAGE, field_name, f"{path} is not in the sample")
                try:
                    media[field_name] = self._decode(sample.media[path], kind, f"{sample.shard}:{sample.key} {path}")
                except MediaError as exc:
                    raise RowProblem(exc.reason or UNREADABLE_IMAGE, field_name, str(exc)) from None
        except RowProblem as p:
            raise DataError(f"shard {sample.shard}, sample {sample.key} (subset {sample.subset!r}, {sample.file} "
                            f"row {sample.row}), field {p.field!r}: {p.detail}", reason=p.reason,
                            subset=sample.subset, row=sample.row, field=p.field, file=sample.shard) from None
        return pair_from_row(sides, media, sample.subset, sample.index)

    def _decode(self, data: Any, kind: str, name: str):
        cfg = self.config
        if kind != "video":
            return decode_image(io.BytesIO(data), name, max_pixels=cfg.max_image_pixels, max_side=cfg.max_image_side)
        # Videos go through the file reader (PyAV, frame folders) from a private temporary copy.
        with tempfile.TemporaryDirectory(prefix="llave-shard-video-") as tmp:
            if isinstance(data, list):   # a frame folder: [(file name, bytes)]
                for frame, payload in data:
                    with open(os.path.join(tmp, os.path.basename(frame)), "wb") as fh:
                        fh.write(payload)
                source = tmp
            else:
                source = os.path.join(tmp, "video" + os.path.splitext(name)[1])
                with open(source, "wb") as fh:
                    fh.write(data)
            return read_video(source, self.video_frames, max_side=self.video_max_side, max_pixels=cfg.max_image_pixels)


def _identity(item):
    return item


class ShardLoader:
    """Iterating it gives one ``(TrainBatch, truncated sides)`` per step, as the folder path's
    DataLoader does: every worker's part of the step, joined in lane order."""

    def __init__(self, data: ShardTrainData, collator, num_workers: int):
        data.collator = collator
        self.parts = max(1, num_workers)
        self.loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_identity,
                                                  num_workers=num_workers, persistent_workers=False)

    def __iter__(self) -> Iterator[Tuple[TrainBatch, int]]:
        items = iter(self.loader)   # workers answer in turn: worker 0's step k, worker 1's step k, ...
        while True:
            parts = []
            for _ in range(self.parts):
                try:
                    parts.append(next(items))
                except StopIteration:
                    if parts:
                        raise DataError(f"the shard loader's workers ended unevenly at step {parts[0][0] + 1}") from None
                    return
            steps = {step for step, _ in parts}
            if len(steps) != 1:
                raise DataError(f"the shard loader's workers are out of step: {sorted(steps)}")
            batches = [part for _, part in parts if part is not None]
            yield join_batches([b for b, _ in batches]), sum(t for _, t in batches)
