"""Demonstration data in Diffusion Policy's zarr replay-buffer layout: read, check, write, sample."""
from .dataset import DataConfig, SequenceDataset, collate_batch, load_datasets, parse_key_spec
from .replay_buffer import (DataError, ReplayBuffer, ReplayBufferWriter, check_episode_ends,
                            read_replay_buffer, write_replay_buffer)
from .sampler import GlobalBatchSampler, sequence_windows, split_episodes, window_rows
from .synthetic import make_episodes, write_synthetic

__all__ = [
    "DataConfig", "DataError", "GlobalBatchSampler", "ReplayBuffer", "ReplayBufferWriter", "SequenceDataset",
    "check_episode_ends", "collate_batch", "load_datasets", "make_episodes", "parse_key_spec",
    "read_replay_buffer", "sequence_windows", "split_episodes", "window_rows", "write_replay_buffer",
    "write_synthetic",
]
