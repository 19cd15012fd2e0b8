"""What the training loop iterates: the data (a folder or hub dataset, or a shard set), the
sampler's part (`GlobalBatchSampler`, or the shards' lane plan) and the loader of per-rank
batches, chosen by ``data.source_type``."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from llave_ds.data.batching import GlobalBatchSampler
from llave_ds.data.mmeb_train import MMEBTrainDataset, TrainDataConfig
from llave_ds.data.shards.train_stream import ShardLoader, ShardTrainData


def open_train_data(config: TrainDataConfig, *, global_batch_size: int, rank: int, world_size: int, seed: int,
                    video_frames: Optional[int], video_max_side: Optional[int]) -> Tuple[object, object]:
    """(dataset, sampler). The sampler's plan is a function of (seed, epoch) only, so a run may
    resume on another rank count; it saves and restores its position (``state_dict``)."""
    if config.source_type == "shards":
        data = ShardTrainData(config, global_batch_size=global_batch_size, rank=rank, world_size=world_size,
                              seed=seed, video_frames=video_frames, video_max_side=video_max_side)
        return data, data.plan
    dataset = MMEBTrainDataset(config, video_frames=video_frames, video_max_side=video_max_side)
    return dataset, GlobalBatchSampler(dataset, global_batch_size, rank=rank, world_size=world_size, seed=seed,
                                       homogeneous=config.homogeneous_batches)


def train_loader(dataset, sampler, collator, num_workers: int):
    """Iterating it yields this rank's ``(TrainBatch, truncated sides)`` per step, in order."""
    if isinstance(dataset, ShardTrainData):
        return ShardLoader(dataset, collator, num_workers)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                                       persistent_workers=False)
