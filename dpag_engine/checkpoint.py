"""`model.pt`: everything needed to rebuild and run a trained policy, and nothing that can run code.

A checkpoint is a plain dict saved with `torch.save` and read back only with
`torch.load(weights_only=True)`, whose unpickler accepts tensors and builtin containers/scalars and
refuses anything else (a pickle that would import and call a function is rejected before it runs):

    format_version  int            FORMAT_VERSION below; older files are migrated or refused with a reason
    kind            str            "dpag_engine.policy"
    config          dict           PolicyConfig.to_dict()
    state_dict      {str: Tensor}  EMA weights (what serving uses), normaliser buffers included
    raw_state_dict  {str: Tensor}  the optimiser's weights (absent when trained without EMA)
    step            int            optimiser steps taken
    metadata        dict           free-form builtins: train config, data info, library version
    spec            dict | None    PolicySpec.to_dict(): what each input and action column is (dpag_engine/spec.py);
                                   None when the data did not say (serving then refuses the file)
    checksum        dict           {"crc32": {key: CRC-32 of that value}} for every other key (added by atomic_save)

Resuming training needs more (optimiser, scheduler, RNG); that lives next to it in
`training_state.pt` (see dpag_engine.training.checkpoints), so a served `model.pt` stays small.

Every file is written by `atomic_save` (temporary name, fsync, rename) and read by `safe_load`, which
checks the checksum: torch.load does not verify the zip's own CRCs, so without it a flipped bit in
the tensor data loads as a silently changed weight. A damaged or foreign file is a CheckpointError
naming the file and what is wrong with it, never another exception.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import pickletools
import re
import shutil
import sys
import warnings
import zlib
from pathlib import Path
from typing import IO, Any, Callable

import torch

from .config import PolicyConfig
from .normalize import inverted_ranges
from .spec import PolicySpec, SpecError, reach_spec

FORMAT_VERSION = 2
KIND = "dpag_engine.policy"
# Every top-level key of the current format (the checksum is checked and removed by safe_load). Any
# other is refused: a newer writer would have raised format_version, so it is damage, e.g. a flip
# that renamed "checksum" and so would skip the check.
KEYS = {"format_version", "kind", "config", "state_dict", "raw_state_dict", "step", "metadata", "spec"}

# Migrations upgrade a checkpoint dict from version v to v + 1, so any supported old file walks up
# to FORMAT_VERSION. A version with no path up is refused with the reason stored here.
def _add_spec(ckpt: dict[str, Any]) -> dict[str, Any]:
    """1 -> 2: files from before specs. The only robot policy then was the reach task's (state 9 =
    joints + goal, action 6 = joint targets, no camera): that is its spec. Others get none."""
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    reach = (cfg.get("state_dim"), cfg.get("action_dim"), cfg.get("image")) == (9, 6, None)
    return {**ckpt, "spec": reach_spec().to_dict() if reach else None}


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _add_spec}
UNSUPPORTED: dict[int, str] = {
    0: "format 0 was the pre-release layout (a bare state dict without config or normaliser); "
       "it cannot be rebuilt into a policy - retrain, or save it again with dpag_engine.checkpoint.save_checkpoint",
}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely; the message says which file, key or tensor is wrong."""


def _plain(value: Any, where: str) -> Any:
    """Refuse to *write* anything the weights-only loader would refuse to read."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    # Exact builtins only: subclasses (torch.__version__, numpy scalars) pickle as their own class.
    if value is None or isinstance(value, bool):
        return value
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a weights-only checkpoint")


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """write(f) into a temporary file, fsync it, then rename it over `path`: a crash or power loss at any
    point leaves either the old file or the complete new one under the name, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # and the rename itself survives a power loss (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def _crc32(value: Any, crc: int = 0) -> int:
    """CRC-32 of a loaded value: a tensor by dtype, shape and bytes; a container by its items in order;
    anything else by type and repr. CRC-32 detects every single-bit and burst error (what disks and
    copies do) at several GB/s; it is no defence against tampering, which is weights_only's job."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        crc = zlib.crc32(f"T{t.dtype}{tuple(t.shape)}".encode(), crc)
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    if isinstance(value, dict):
        crc = zlib.crc32(f"D{len(value)}".encode(), crc)
        for k, v in value.items():
            crc = _crc32(v, _crc32(k, crc))
        return crc
    if isinstance(value, (list, tuple)):
        crc = zlib.crc32(f"L{len(value)}".encode(), crc)
        for v in value:
            crc = _crc32(v, crc)
        return crc
    text = f"{type(value).__name__}:{value!r}"
    return zlib.crc32(f"{len(text)}:{text}".encode(), crc)


def _checksums(obj: dict[str, Any]) -> dict[str, int]:
    return {k: _crc32(v) for k, v in obj.items() if k != "checksum"}


def atomic_save(obj: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save `obj` plus a fresh checksum of its content, written atomically (see _atomic_write)."""
    obj = {**obj, "checksum": {"crc32": _checksums(obj)}}
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file with the same guarantee as atomic_save (the final model.pt of a run)."""
    with open(src, "rb") as s:
        return _atomic_write(dst, lambda f: shutil.copyfileobj(s, f))


def save_checkpoint(path: str | os.PathLike, policy: torch.nn.Module, ema_policy: torch.nn.Module | None = None,
                    step: int = 0, metadata: dict[str, Any] | None = None, spec: PolicySpec | None = None) -> Path:
    """Write model.pt. `ema_policy` (if given) becomes `state_dict`; the trained weights are `raw_state_dict`.
    `spec` defaults to the policy's own (`policy.spec`, set by training and by load_policy)."""
    cfg: PolicyConfig = policy.cfg
    spec = spec if spec is not None else getattr(policy, "spec", None)
    if spec is not None:
        spec.check_policy(cfg)
    serving = ema_policy if ema_policy is not None else policy
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "config": cfg.to_dict(),
        "state_dict": _plain(dict(serving.state_dict()), "state_dict"),
        "step": int(step),
        "metadata": _plain(metadata or {}, "metadata"),
        "spec": spec.to_dict() if spec is not None else None,
    }
    if ema_policy is not None:
        ckpt["raw_state_dict"] = _plain(dict(policy.state_dict()), "raw_state_dict")
    return atomic_save(ckpt, path)


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True), then the checksum; errors say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged bytes make torch's parsers fail in any way at all
        raise CheckpointError(_load_failure(path, e)) from e
    if isinstance(obj, dict) and "checksum" in obj:
        _verify_checksum(obj, path)
    # Migration: files written before checksums were added have none, and are accepted unverified
    # (format_version did not change: nothing else did). A damaged new file passes for an old one only
    # if the damage hit the key "checksum" itself, and a single flip there leaves the rest intact.
    return obj


# weights_only's refusal of a GLOBAL that names a Python object, e.g. "os.system" (builtins lose their
# module: "exec"); random bytes that happen to hold a GLOBAL opcode name no such identifier.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*) (?:was not|whose module)")


def _pickle_globals(f: IO[bytes]) -> list[str | None] | None:
    """Python objects a pickle stream refers to, or None if `f` does not hold one complete pickle.
    pickletools only decodes opcodes: nothing is imported or run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decoding garbage as text opcodes warns about escapes
            ops = list(pickletools.genops(f))
    except Exception:  # noqa: BLE001 - not a pickle: unknown opcode, short read, bad text, ...
        return None
    names, strings = [], []
    for op, arg, _ in ops:
        if op.name in ("GLOBAL", "INST"):
            names.append(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":  # module and name are the two strings pushed just before
            names.append(".".join(strings[-2:]) if len(strings) >= 2 else None)  # None: named via the memo
        if isinstance(arg, str):
            strings.append(arg)
        elif op.name != "MEMOIZE":
            strings.clear()
    return names


def _exists(name: str) -> bool:
    """Whether a pickled global names something real (which a full unpickler would import and could
    run), judged without importing anything: a damaged name such as "torch.FloapStorage" does not."""
    module, _, attr = name.rpartition(".")
    module = module or "builtins"  # torch reports builtins without their module
    if module in sys.modules:
        return hasattr(sys.modules[module], attr)
    try:  # not imported yet: importing it would run its code, if it exists
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ValueError, ImportError):
        return False


def _load_failure(path: Path, e: Exception) -> str:
    """Why torch.load failed, as truly as the file allows: a pickle that refers to Python objects (which
    a full unpickler would import and call) is refused as such; anything else is damage."""
    refused = _REFUSED_GLOBAL.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
    named = [refused.group(1)] if refused else None
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if named is None and head[:2] != b"PK":  # a raw pickle.dump: weights_only may fail before its globals
            f.seek(0)
            named = _pickle_globals(f)
    if named and (named[0] is None or _exists(named[0])):  # refused before anything was imported or called
        return (f"{path}: refused - the file contains Python objects other than tensors and plain containers "
                f"(it refers to {named[0] or 'one'}), which could run code when loaded. Only weights-only "
                f"checkpoints are accepted.")
    if size == 0:
        what = "empty file"
    elif head == b"PK\x03\x04":
        what = "damaged zip archive"
    else:  # torch.save writes a zip archive; this is part of one, or something else entirely
        what = f"not a torch.save zip archive ({size} B, starting {head.hex(' ')})"
    # The parser's own complaint, without torch's advice to retry with weights_only=False.
    lines = [ln.strip() for ln in str(e).split("WeightsUnpickler error:")[-1].splitlines() if ln.strip()]
    detail = lines[0].split(". ")[0] if lines else ""
    return f"{path}: unreadable - {what} (truncated or corrupted?): {type(e).__name__}{': ' * bool(detail)}{detail}"


def _verify_checksum(obj: dict[str, Any], path: Path) -> None:
    stored = obj.pop("checksum")
    stored = stored.get("crc32") if isinstance(stored, dict) else None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path}: the checksum entry is malformed (corrupted?)")
    actual = _checksums(obj)
    bad = sorted(str(k) for k in stored.keys() | actual.keys() if stored.get(k) != actual.get(k))
    if bad:
        raise CheckpointError(f"{path}: checksum mismatch in {', '.join(bad)} - the file changed after it was "
                              f"written (disk or copy corruption); its contents cannot be trusted")


def _migrate(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version missing or not an int - not a dpag_engine checkpoint "
                              f"(keys: {sorted(map(str, ckpt))[:8]})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version} is newer than this dpag_engine understands "
                              f"({FORMAT_VERSION}); upgrade dpag_engine to load it")
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            reason = UNSUPPORTED.get(version, "no migration is defined from it")
            raise CheckpointError(f"{path}: format_version {version} cannot be loaded by this dpag_engine "
                                  f"(current {FORMAT_VERSION}): {reason}")
        ckpt = MIGRATIONS[version](dict(ckpt))
        version += 1
        ckpt["format_version"] = version
    return ckpt


def check_state_dict(name: str, state: Any, expected: dict[str, torch.Tensor]) -> None:
    """Keys, shapes, dtypes and finiteness against a freshly built model; the message names the tensor."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: expected a dict of tensors, got {type(state).__name__}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{name}: does not match the model built from its config - "
                              f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for key, ref in expected.items():
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{name}[{key!r}]: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{name}[{key!r}]: shape {tuple(t.shape)} in the file, the model expects "
                                  f"{tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise CheckpointError(f"{name}[{key!r}]: dtype {t.dtype} in the file, the model expects {ref.dtype}")
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise CheckpointError(f"{name}[{key!r}]: {bad} of {t.numel()} values are NaN or inf")


def _expected_state(cfg: PolicyConfig) -> dict[str, torch.Tensor]:
    """Shapes and dtypes a policy built from `cfg` has."""
    from .policy import DPAGPolicy  # here, not at the top: the policy pulls in the whole model

    try:
        with torch.device("meta"):  # shapes only: no memory for a 255 M-parameter reference
            return DPAGPolicy(cfg).state_dict()
    except (NotImplementedError, RuntimeError):  # parts that compute tables at build time need real data
        return DPAGPolicy(cfg).state_dict()


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "model.pt" if path.is_dir() else path


def _validated(ckpt: Any, path: Path,
               build_expected: Callable[[PolicyConfig], dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Migrate and check a loaded checkpoint; adds "policy_config". `build_expected(cfg)` gives the
    state dict of a model built from the file's config, to compare keys and shapes against."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(ckpt).__name__}")
    ckpt = _migrate(ckpt, path)
    unknown = sorted(set(map(str, ckpt)) - KEYS)
    if unknown:
        raise CheckpointError(f"{path}: unexpected top-level keys {unknown} - not part of format {FORMAT_VERSION} "
                              f"(corrupted?)")
    if ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path}: kind is {ckpt.get('kind')!r}, expected {KIND!r}")
    for key in ("config", "state_dict", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: key {key!r} missing")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: config must be a dict")
    try:
        cfg = PolicyConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:  # ConfigError, or a value no field check could convert
        raise CheckpointError(f"{path}: config is invalid: {e}") from e
    expected = build_expected(cfg)
    for name in ("state_dict", "raw_state_dict"):
        if name in ckpt:
            check_state_dict(f"{path}: {name}", ckpt[name], expected)
            inverted = inverted_ranges(ckpt[name])
            if inverted:
                key, dims = next(iter(inverted.items()))
                raise CheckpointError(f"{path}: {name}[{key!r}]: min above max in dims {dims} - not a range "
                                      f"fit() can produce; the normaliser would pass those dimensions through "
                                      f"unscaled, so values would come out in the wrong units")
    fitted = ckpt["state_dict"].get("normalizer.fitted")
    if fitted is not None and not bool(fitted):
        raise CheckpointError(f"{path}: state_dict['normalizer.fitted'] is False - the normaliser was never "
                              f"fitted, so actions would come out in the wrong units")
    try:
        spec = PolicySpec.from_dict(ckpt["spec"]) if ckpt.get("spec") is not None else None
        if spec is not None:
            spec.check_policy(cfg)
    except SpecError as e:
        raise CheckpointError(f"{path}: {e}") from e
    ckpt["policy_config"], ckpt["policy_spec"] = cfg, spec
    return ckpt


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and fully validate a model.pt (or a directory holding one); returns the dict plus
    "policy_config". See `load_policy` for the usual entry point."""
    path = _resolve(path)
    return _validated(safe_load(path, map_location), path, _expected_state)


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "ema"):
    """Rebuild a DPAGPolicy from model.pt, in eval mode. weights: "ema" (serving default) or "raw"."""
    from .policy import DPAGPolicy

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights: must be 'ema' or 'raw', got {weights!r}")
    path = _resolve(path)
    built: list[DPAGPolicy] = []

    def build(cfg: PolicyConfig) -> dict[str, torch.Tensor]:  # the model we load into is the reference
        built.append(DPAGPolicy(cfg))
        return built[0].state_dict()

    ckpt = _validated(safe_load(path), path, build)
    policy = built[0]
    # A run without EMA stores only the trained weights, under "state_dict".
    key = "raw_state_dict" if weights == "raw" and "raw_state_dict" in ckpt else "state_dict"
    policy.load_state_dict(ckpt[key])
    policy.checkpoint_step = int(ckpt["step"])
    policy.spec = ckpt["policy_spec"]
    return policy.to(device).eval()
