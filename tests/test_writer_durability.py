"""Demonstration files survive a crash: a writer killed with SIGKILL keeps every finished episode.

A child process (python -c) writes episodes of fresh random data (the seed comes from here, so both
sides build the same episodes), is made to stop in the middle of its 4th episode (a patched step of
the writer that tells us and then waits), and is killed with SIGKILL. The parent reads exactly the
3 finished episodes back, value for value. Also: a kill at a random moment keeps everything that
was reported finished; appending to an existing buffer; LeRobot's finalize and resume.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from dpag_engine.data.lerobot import JOURNAL, LeRobotWriter, finalize_lerobot, read_lerobot
from dpag_engine.data.replay_buffer import DataError, ReplayBufferWriter, read_replay_buffer

REPO = Path(__file__).resolve().parents[1]
MIDWAY = "MIDWAY"        # what the child prints when it has stopped inside its 4th episode


def episodes(seed, n, lerobot=False):
    """n episodes of random data (lengths 20..40): joint-like vectors and a small camera."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        T = int(rng.integers(20, 41))
        ep = {"action": rng.normal(size=(T, 6)).astype(np.float32),
              "state": rng.normal(size=(T, 9)).astype(np.float32),
              "img": rng.integers(0, 256, size=(T, 32, 32, 3), dtype=np.uint8)}
        if lerobot:
            # A per-frame flat colour: survives AV1, so each decoded frame can be checked for its own.
            ep["img"] = np.broadcast_to(rng.integers(0, 256, size=(T, 1, 1, 3), dtype=np.uint8), (T, 32, 32, 3)).copy()
            ep = {"action": ep["action"], "observation.state": ep["state"], "observation.images.front": ep["img"]}
        out.append(ep)
    return out


CHILD_PRELUDE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_writer_durability import episodes
    def stop_here():
        print({midway!r}, flush=True)
        time.sleep(120)
""")


def run_child(body: str, **fmt) -> subprocess.Popen:
    code = CHILD_PRELUDE.format(repo=str(REPO), tests=str(REPO / "tests"), midway=MIDWAY) + textwrap.dedent(body).format(**fmt)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(REPO))


def kill_when(child: subprocess.Popen, marker: str, timeout: float = 60.0) -> list[str]:
    """Read the child's lines until `marker`, SIGKILL it, and return the lines."""
    lines = []
    deadline = time.monotonic() + timeout
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if line.strip() == marker or time.monotonic() > deadline:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert marker in lines, f"child output {lines}, stderr: {child.stderr.read()[-3000:]}"
    assert child.returncode == -signal.SIGKILL
    return lines


def assert_same_episodes(buf, eps, keys=("action", "state", "img")):
    assert buf.n_episodes == len(eps), (buf.n_episodes, len(eps))
    assert buf.episode_lengths().tolist() == [len(e["action"]) for e in eps]
    for i, e in enumerate(eps):
        got = buf.get_episode(i)
        for k in keys:
            np.testing.assert_array_equal(got[k], e[k], err_msg=f"episode {i} {k}")


# --------------------------------------------------------------------------- zarr
@pytest.mark.parametrize("name", ["demos.zarr", "demos.zarr.zip"])
def test_zarr_keeps_three_episodes_when_killed_during_the_fourth(tmp_path, name):
    seed = int(np.random.default_rng().integers(1 << 31))
    path = tmp_path / name
    child = run_child("""
        import dpag_engine.data.replay_buffer as rb
        original, calls = rb._sync_rows, []
        def sync_rows(folder, start, stop):
            original(folder, start, stop)
            calls.append(folder)
            if len(calls) == 3 * 3 + 1:       # the 4th episode: its first key is written, the others are not
                stop_here()
        rb._sync_rows = sync_rows
        w = rb.ReplayBufferWriter({path!r})
        for i, ep in enumerate(episodes({seed}, 4)):
            w.add_episode(ep)
            print(f"DONE {{i}}", flush=True)
    """, path=str(path), seed=seed)
    lines = kill_when(child, MIDWAY)
    assert lines[:3] == ["DONE 0", "DONE 1", "DONE 2"], lines
    eps = episodes(seed, 4)
    if name.endswith(".zip"):
        # The zip is written at close: a kill leaves its durable staging directory, named after it.
        assert not path.exists()
        staged = list(tmp_path.glob(f"{name}.partial-*/buffer.zarr"))
        assert len(staged) == 1, list(tmp_path.iterdir())
        path = staged[0]
    with pytest.warns(UserWarning, match=r"rows past meta/episode_ends\[-1\] = \d+ ignored in data/action"):
        buf = read_replay_buffer(path)
    assert_same_episodes(buf, eps[:3])
    assert "unfinished" not in buf.notes[0] and "being written" in buf.notes[0]
    # The killed episode's rows are really there (past the end), which is what the reader skipped.
    assert zarr.open_group(str(path), mode="r")["data/action"].shape[0] == buf.n_steps + len(eps[3]["action"])

    # A new session appends to it: the unfinished rows go, the new episodes follow the 3.
    more = episodes(seed + 1, 2)
    with ReplayBufferWriter(path, append=True) as w:
        assert w.n_episodes == 3 and any("unfinished episode dropped" in n for n in w.notes)
        for ep in more:
            w.add_episode(ep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing left to ignore
        assert_same_episodes(read_replay_buffer(path), eps[:3] + more)


def test_zarr_killed_at_a_random_moment_keeps_every_reported_episode(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 31))
    path = tmp_path / "demos.zarr"
    child = run_child("""
        from dpag_engine.data.replay_buffer import ReplayBufferWriter
        w = ReplayBufferWriter({path!r})
        for i, ep in enumerate(episodes({seed}, 200)):
            w.add_episode(ep)
            print(f"DONE {{i}}", flush=True)
    """, path=str(path), seed=seed)
    lines = []
    rng = np.random.default_rng(seed)
    target = int(rng.integers(3, 8))
    for line in child.stdout:
        lines.append(line.strip())
        if len(lines) >= target:
            break
    time.sleep(float(rng.uniform(0.0, 0.05)))       # somewhere inside a later episode
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    lines += [line.strip() for line in child.stdout]
    reported = sum(line.startswith("DONE") for line in lines)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # rows of the killed episode, if it was cut mid-way
        buf = read_replay_buffer(path)
    # Everything reported finished is there; at most the episode that finished as the kill came too.
    assert reported <= buf.n_episodes <= reported + 1, (reported, buf.n_episodes)
    assert_same_episodes(buf, episodes(seed, buf.n_episodes))


def test_a_buffer_with_rows_past_its_end_reads_but_a_short_one_is_refused(tmp_path):
    with ReplayBufferWriter(tmp_path / "a.zarr") as w:
        w.add_episode({"action": np.ones((4, 2), np.float32)})
    root = zarr.open_group(str(tmp_path / "a.zarr"), mode="r+")
    root["data/action"].resize((6, 2))                      # an unfinished episode's rows
    with pytest.warns(UserWarning, match=r"data/action \(2\)"):
        assert read_replay_buffer(tmp_path / "a.zarr").n_steps == 4
    root["data/action"].resize((3, 2))                      # fewer rows than episode_ends says: broken
    with pytest.raises(DataError, match=r"^data/action: has 3 rows but meta/episode_ends\[-1\] = 4"):
        read_replay_buffer(tmp_path / "a.zarr")
    # Killed during the very first episode: a buffer with no episodes, said so.
    w = ReplayBufferWriter(tmp_path / "b.zarr")
    with pytest.raises(DataError, match=r"^meta/episode_ends: is empty \(no episodes"):
        read_replay_buffer(tmp_path / "b.zarr")
    w.add_episode({"action": np.ones((2, 2), np.float32)})
    assert read_replay_buffer(tmp_path / "b.zarr").n_episodes == 1     # durable before close()
    w.close()


def test_append_checks_keys_shapes_and_dtypes(tmp_path):
    path = tmp_path / "d.zarr"
    eps = episodes(int(np.random.default_rng().integers(1 << 31)), 3)
    with ReplayBufferWriter(path, spec_hints={"dt": 0.1}) as w:
        w.add_episode(eps[0])
    w = ReplayBufferWriter(path, append=True, spec_hints={"dt": 0.1})
    ep = eps[1]
    with pytest.raises(DataError, match=r"^data/img: keys differ from the buffer"):
        w.add_episode({"action": ep["action"], "state": ep["state"]})
    with pytest.raises(DataError, match=r"^data/extra: keys differ"):
        w.add_episode({**ep, "extra": ep["action"]})
    with pytest.raises(DataError, match=r"^data/state: per-step shape \(8,\) differs from the buffer \(9,\)"):
        w.add_episode({**ep, "state": ep["state"][:, :8]})
    with pytest.raises(DataError, match=r"^data/img: dtype float32 cannot be stored in the buffer's uint8"):
        w.add_episode({**ep, "img": ep["img"].astype(np.float32)})
    w.add_episode({**ep, "state": ep["state"].astype(np.float64)})     # same kind: stored as float32
    w.close()
    assert_same_episodes(read_replay_buffer(path), eps[:2])
    with pytest.raises(DataError, match=r"dpag_spec: the buffer's spec hints differ"):
        ReplayBufferWriter(path, append=True, spec_hints={"dt": 0.2})
    with pytest.raises(DataError, match=r"append needs a directory buffer"):
        ReplayBufferWriter(tmp_path / "x.zarr.zip", append=True)
    with pytest.raises(DataError, match=r"no such directory to append to"):
        ReplayBufferWriter(tmp_path / "missing.zarr", append=True)
    with pytest.raises(FileExistsError, match=r"append=True"):
        ReplayBufferWriter(path)


def test_append_to_a_buffer_written_by_another_writer(tmp_path):
    """DP's buffers (and ours before) keep episode_ends compressed: an append rewrites it in its own layout."""
    eps = episodes(int(np.random.default_rng().integers(1 << 31)), 3)
    path = tmp_path / "dp.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    for k in eps[0]:
        root.create_array(f"data/{k}", data=np.concatenate([e[k] for e in eps[:2]]))
    root.create_array("meta/episode_ends", data=np.cumsum([len(e["action"]) for e in eps[:2]]).astype(np.int64))
    with ReplayBufferWriter(path, append=True) as w:
        w.add_episode(eps[2])
    assert_same_episodes(read_replay_buffer(path), eps)
    meta = json.loads((path / "meta/episode_ends/.zarray").read_text())
    assert meta["compressor"] is None and not (path / "meta/.episode_ends.new").exists()


# ------------------------------------------------------------------------ LeRobot
def lerobot_child(root, seed, n, stop_in=None):
    """A child writing n episodes with LeRobotWriter; stop_in: stop in that episode's video (1-based)."""
    return run_child("""
        import dpag_engine.data.lerobot as lr
        original, calls = lr.encode_frames, []
        def encode_frames(*args, **kw):
            out = original(*args, **kw)
            calls.append(1)
            if len(calls) == {stop_in}:       # its data is staged, its video encoded, not yet committed
                stop_here()
            return out
        lr.encode_frames = encode_frames
        w = lr.LeRobotWriter({root!r}, fps=10, robot_type="ur5")
        for i, ep in enumerate(episodes({seed}, {n}, lerobot=True)):
            w.add_episode(ep, task="pick")
            print(f"DONE {{i}}", flush=True)
    """, root=str(root), seed=seed, n=n, stop_in=stop_in or -1)


def assert_same_lerobot(buf, eps):
    assert buf.episode_lengths().tolist() == [len(e["action"]) for e in eps]
    for k in ("action", "observation.state"):
        np.testing.assert_array_equal(buf.data[k], np.concatenate([e[k] for e in eps]), err_msg=k)
    err = np.abs(buf.data["observation.images.front"].astype(int)
                 - np.concatenate([e["observation.images.front"] for e in eps]))
    assert err.max() <= 4, err.max()            # flat colours, frame by frame: lossy, but each its own


def test_lerobot_keeps_three_episodes_when_killed_during_the_fourth(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 31))
    root = tmp_path / "demos"
    lines = kill_when(lerobot_child(root, seed, 4, stop_in=4), MIDWAY)
    assert lines[:3] == ["DONE 0", "DONE 1", "DONE 2"], lines
    eps = episodes(seed, 4, lerobot=True)
    # Not finalized: the reader says so and names the command.
    with pytest.raises(DataError, match=r"not finalized.*3 finished episodes.*python -m dpag_engine.data.lerobot "
                                        r"finalize"):
        read_lerobot(root)
    out = subprocess.run([sys.executable, "-m", "dpag_engine.data.lerobot", "finalize", str(root)],
                         capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert "3 episodes" in out.stdout
    assert not (root / JOURNAL).exists()
    assert_same_lerobot(read_lerobot(root, cache_dir=None), eps[:3])
    # What finalize packed is what a writer that was never killed writes, file for file.
    clean = tmp_path / "clean"
    with LeRobotWriter(clean, fps=10, robot_type="ur5") as w:
        for ep in eps[:3]:
            w.add_episode(ep, task="pick")
    files = [sorted(p.relative_to(r).as_posix() for p in r.rglob("*") if p.is_file()) for r in (root, clean)]
    assert files[0] == files[1]
    assert (root / "meta/info.json").read_text() == (clean / "meta/info.json").read_text()
    import pyarrow.parquet as pq
    for f in ("meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet"):
        assert pq.read_table(root / f).equals(pq.read_table(clean / f)), f
    assert finalize_lerobot(root) == root       # a finalized dataset is left as it is


def test_lerobot_resume_after_a_kill_and_one_writer_at_a_time(tmp_path):
    seed = int(np.random.default_rng().integers(1 << 31))
    root = tmp_path / "demos"
    kill_when(lerobot_child(root, seed, 3, stop_in=3), MIDWAY)         # 2 finished, killed in the 3rd
    eps = episodes(seed, 2, lerobot=True) + episodes(seed + 1, 2, lerobot=True)
    w = LeRobotWriter(root, resume=True)
    assert w.n_episodes == 2 and w.fps == 10
    with pytest.raises(DataError, match="another process is writing"):
        finalize_lerobot(root)                  # the live writer holds the journal
    for ep in eps[2:]:
        w.add_episode(ep, task="pick")
    w.close()
    buf = read_lerobot(root, cache_dir=None)
    assert_same_lerobot(buf, eps)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["total_episodes"] == 4 and info["total_tasks"] == 1
    with pytest.raises(DataError, match="finalized dataset"):
        LeRobotWriter(root, resume=True)
    with pytest.raises(DataError, match=r"fps: 15 given"):
        kill_when(lerobot_child(tmp_path / "b", seed, 2, stop_in=2), MIDWAY)
        LeRobotWriter(tmp_path / "b", fps=15, resume=True)


def test_lerobot_exception_inside_with_keeps_finished_episodes(tmp_path):
    eps = episodes(int(np.random.default_rng().integers(1 << 31)), 3, lerobot=True)
    with pytest.raises(KeyboardInterrupt):
        with LeRobotWriter(tmp_path / "d", fps=10, extra_info={"dpag_spec": {"dt": 0.1}}) as w:
            for ep in eps[:2]:
                w.add_episode(ep)
            raise KeyboardInterrupt           # Ctrl-C between episodes
    finalize_lerobot(tmp_path / "d")
    assert_same_lerobot(read_lerobot(tmp_path / "d", cache_dir=None), eps[:2])
    info = json.loads((tmp_path / "d/meta/info.json").read_text())
    assert info["dpag_spec"] == {"dt": 0.1} and list(info)[-1] == "dpag_spec"
