"""Video files of LeRobot datasets through PyAV: decode frames by timestamp, encode episodes, join files.

PyAV's wheels bundle FFmpeg with dav1d (AV1 decode), SVT-AV1 (AV1 encode, LeRobot's default) and
x264, so no system FFmpeg is needed. Training must not decode video per sample (a seek plus up to a
GOP of decoding for every window), so `decode_at` decodes each file once, front to back, and drops
every frame a query asks for into its row of one (N, H, W, C) uint8 array - in memory, or a
memory-mapped cache file that later runs (and DDP ranks) open instead of decoding again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .replay_buffer import DataError

# LeRobot's own tolerance (LeRobotDataset(tolerance_s=1e-4)): a query timestamp further than this
# from every frame of the file means the metadata and the video disagree.
TOLERANCE_S = 1e-4

# LeRobot's encoder settings (encode_video_frames): a keyframe every 2 frames keeps random access
# cheap for readers that seek; CRF 30; SVT-AV1's fastest preset.
CODEC_OPTIONS = {
    "libsvtav1": {"g": "2", "crf": "30", "preset": "12"},
    "libx264": {"g": "2", "crf": "30"},
}


def _av():
    import av  # imported late: only datasets with video need it
    # SVT-AV1 prints a banner per encoder to stderr unless told otherwise (1 = errors only).
    os.environ.setdefault("SVT_LOG", "1")
    return av


def _open(path: Path, mode: str = "r", **kw):
    av = _av()
    try:
        return av.open(str(path), mode, **kw)
    except (av.FFmpegError, OSError) as e:
        raise DataError(f"{path}: cannot open video ({e})") from e


def decode_at(files: Sequence[tuple[Path, np.ndarray, np.ndarray]], n_rows: int, frame_shape: tuple[int, int, int],
              out: np.ndarray | None = None, tolerance_s: float = TOLERANCE_S) -> np.ndarray:
    """Frames for rows of a dataset, each given as (video file, rows, timestamps in that file).

    Every file is decoded once; row r gets the frame whose presentation time is nearest its
    timestamp (LeRobot's rule), which must lie within `tolerance_s`. Returns `out` (or a new
    array) of shape (n_rows, H, W, C) uint8 with `frame_shape` = (H, W, C).
    """
    h, w, c = frame_shape
    if out is None:
        out = np.empty((n_rows, h, w, c), dtype=np.uint8)
    fmt = {1: "gray", 3: "rgb24", 4: "rgba"}.get(c)
    if fmt is None:
        raise DataError(f"video frames with {c} channels are not supported (1, 3 or 4)")
    filled = np.zeros(n_rows, dtype=bool)
    for path, rows, times in files:
        if not path.is_file():
            raise DataError(f"{path}: video file missing")
        # A demux-only pass (no decoding) gives every frame's time, so each query knows its frame
        # before we decode: decoding then streams, holding one frame at a time.
        with _open(path) as container:
            if not container.streams.video:
                raise DataError(f"{path}: holds no video stream")
            stream = container.streams.video[0]
            tb = float(stream.time_base)
            pts = np.array(sorted(p.pts for p in container.demux(stream) if p.pts is not None), dtype=np.int64)
        if len(pts) == 0:
            raise DataError(f"{path}: video stream has no frames")
        t = pts * tb
        k = np.clip(np.searchsorted(t, times), 1, max(len(t) - 1, 1)) if len(t) > 1 else np.zeros(len(times), int)
        if len(t) > 1:
            k = np.where(np.abs(t[k - 1] - times) <= np.abs(t[k] - times), k - 1, k)
        err = np.abs(t[k] - times)
        if (err >= tolerance_s).any():
            i = int(np.argmax(err))
            raise DataError(f"{path}: no frame within {tolerance_s} s of timestamp {times[i]:.4f} s "
                            f"(nearest {t[k[i]]:.4f} s); the episode metadata and the video disagree")
        want: dict[int, list[int]] = {}
        for row, frame in zip(rows.tolist(), pts[k].tolist()):
            want.setdefault(frame, []).append(row)
        with _open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"  # frame + slice threads inside the decoder
            for frame in container.decode(stream):
                targets = want.pop(frame.pts, None)
                if targets is None:
                    continue
                img = frame.to_ndarray(format=fmt)
                img = img[..., None] if img.ndim == 2 else img
                if img.shape != (h, w, c):
                    raise DataError(f"{path}: frames are {img.shape[1]}x{img.shape[0]}x{img.shape[2]} (WxHxC) "
                                    f"but meta/info.json says {w}x{h}x{c}")
                out[targets] = img
                filled[targets] = True
                if not want:
                    break
        if want:
            raise DataError(f"{path}: {sum(map(len, want.values()))} frames listed by the container "
                            f"could not be decoded (truncated file?)")
    if not filled.all():
        raise DataError(f"row {int(np.flatnonzero(~filled)[0])}: no video frame was assigned")
    return out


def cached_frames(cache_dir: str | os.PathLike | None, identity: Iterable[str], n_rows: int,
                  frame_shape: tuple[int, int, int], fill) -> np.ndarray:
    """`fill(out)` writes the frames into `out`; with a cache_dir, once per identity.

    The cache file is a .npy opened memory-mapped (read-only), so a dataset larger than RAM still
    trains from the page cache. It is written to a temporary name and renamed, so concurrent
    writers (DDP ranks, two runs) never see half a file.
    """
    shape = (n_rows, *frame_shape)
    if cache_dir is None:
        out = np.empty(shape, dtype=np.uint8)
        fill(out)
        return out
    digest = hashlib.sha1("\n".join([*identity, repr(shape)]).encode()).hexdigest()[:20]
    path = Path(os.path.expanduser(cache_dir)) / "frames" / f"{digest}.npy"
    if path.is_file():
        try:
            frames = np.load(path, mmap_mode="r")
            if frames.shape == shape and frames.dtype == np.uint8:
                return frames
        except (ValueError, OSError):
            pass  # unreadable: decode again and replace it
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(out)
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return np.load(path, mmap_mode="r")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def encode_frames(frames: np.ndarray, path: Path, fps: int, vcodec: str = "libsvtav1") -> float:
    """(T, H, W, 3) uint8 -> one mp4 (yuv420p); returns its duration in seconds as LeRobot measures it."""
    av = _av()
    if vcodec not in CODEC_OPTIONS:
        raise ValueError(f"vcodec: {vcodec!r} is not one of {sorted(CODEC_OPTIONS)}")
    t, h, w, c = frames.shape
    if c != 3:
        raise DataError(f"video frames must be RGB (H, W, 3), got {frames.shape[1:]}")
    if h % 2 or w % 2:
        raise DataError(f"video frames must have even height and width for yuv420p, got {h}x{w}")
    with _open(path, "w") as out:
        stream = out.add_stream(vcodec, rate=fps, options=CODEC_OPTIONS[vcodec])
        stream.pix_fmt, stream.width, stream.height = "yuv420p", w, h
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")))
        out.mux(stream.encode())
    return video_duration_s(path)


def video_duration_s(path: Path) -> float:
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.duration is not None:
            return float(stream.duration * stream.time_base)
        return float(container.duration / _av().time_base)


def concatenate(parts: Sequence[Path], dst: Path) -> None:
    """Join same-codec mp4 files into `dst` without re-encoding (FFmpeg's concat demuxer)."""
    if len(parts) == 1:
        shutil.move(str(parts[0]), dst)
        return
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        listing = Path(tmp) / "parts.ffconcat"
        listing.write_text("ffconcat version 1.0\n" + "".join(f"file '{p.resolve()}'\n" for p in parts))
        joined = Path(tmp) / dst.name
        with _open(listing, "r", format="concat", options={"safe": "0"}) as src, \
                _open(joined, "w", options={"movflags": "faststart"}) as out:
            streams = {}
            for s in src.streams.video:
                streams[s.index] = out.add_stream_from_template(template=s, opaque=True)
                streams[s.index].time_base = s.time_base
            for packet in src.demux():
                if packet.dts is None or packet.stream.index not in streams:
                    continue  # flush packets carry nothing
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
        shutil.move(str(joined), dst)
    for p in parts:
        p.unlink(missing_ok=True)


def video_info(path: Path) -> dict:
    """The `info` block LeRobot writes into meta/info.json for a video feature (same keys, same order)."""
    with _open(path) as container:
        s = container.streams.video[0]
        channels = 1 if "gray" in s.pix_fmt else 4 if ("rgba" in s.pix_fmt or "yuva" in s.pix_fmt) else 3
        info = {"video.height": s.height, "video.width": s.width, "video.codec": s.codec.canonical_name,
                "video.pix_fmt": s.pix_fmt, "video.is_depth_map": False, "video.fps": int(s.base_rate),
                "video.channels": channels}
        info["has_audio"] = bool(container.streams.audio)
    return info
