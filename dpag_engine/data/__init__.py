"""Demonstration data: Diffusion Policy's zarr replay buffers, LeRobot v3 datasets and robomimic hdf5 files
read into one in-memory ReplayBuffer layout; windows, splits and batches from it; writers for zarr and LeRobot."""
from .dataset import DataConfig, SequenceDataset, collate_batch, load_datasets, parse_key_spec
from .formats import detect_format, prepare_data, read_buffer
from .lerobot import LeRobotWriter, read_lerobot
from .replay_buffer import (DataError, ReplayBuffer, ReplayBufferWriter, check_episode_ends,
                            read_replay_buffer, write_replay_buffer)
from .robomimic import read_robomimic
from .sampler import GlobalBatchSampler, sequence_windows, split_episodes, window_rows
from .synthetic import make_episodes, write_synthetic

__all__ = [
    "DataConfig", "DataError", "GlobalBatchSampler", "LeRobotWriter", "ReplayBuffer", "ReplayBufferWriter",
    "SequenceDataset", "check_episode_ends", "collate_batch", "detect_format", "load_datasets", "make_episodes",
    "parse_key_spec", "prepare_data", "read_buffer", "read_lerobot", "read_replay_buffer", "read_robomimic",
    "sequence_windows", "split_episodes", "window_rows", "write_replay_buffer", "write_synthetic",
]
