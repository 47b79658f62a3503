"""Checkpoints for exact resume: safetensors weights, torch-saved state dicts and a JSON state.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N:08d>/`:
    <name>.safetensors   one per named tensor dict (student weights or adapter, EMA teacher, ...)
    <name>.pt            one per named torch-serializable object (optimizer, scheduler state dicts)
    state.json           {"format", "step", "rng", "tensors", "objects", "state", "files"}; written last
`files` is the manifest: {file name: {"bytes": size, "sha256": hex digest}} of every other file. Loading
checks each file against it before parsing, so a truncated, zeroed or otherwise changed file is reported by
name instead of being loaded (format-1 checkpoints, written before the manifest existed, load unverified).
A save writes everything into a hidden temporary folder, fsyncs it and renames it into place, then
rewrites the `checkpoints/latest` pointer atomically, then prunes older checkpoints: a crash or a full disk
at any point leaves the previous checkpoint intact and findable. One writer per run folder (sdft.rundir).
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdft.io import atomic_write_text, fsync_dir, make_temp_dir

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriteError", "save_checkpoint", "load_checkpoint",
           "load_latest_intact", "latest_checkpoint", "list_checkpoints", "check_state_tensors",
           "capture_rng_state", "restore_rng_state"]

FORMAT_VERSION = 2
_UNVERIFIED_FORMAT = 1  # no manifest: still loaded, but nothing can be checked
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp_step_"
_OLD_PREFIX = ".old_step_"
_HASH_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it."""


class CheckpointWriteError(OSError):
    """A save that failed (full disk, lost permission, ...): the message names the path and what to do; the
    previous checkpoint is left intact. `errno` is the one of the underlying OSError."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: `tensors[name]` are CPU tensor dicts, `objects[name]` the torch-loaded
    objects, `state` the caller's JSON state and `rng` the RNG states captured at save time.
    `verified` is False for a format-1 checkpoint (no manifest to check its files against)."""
    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any]
    verified: bool = True


def save_checkpoint(run_dir: str | os.PathLike, step: int, *,
                    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    objects: Mapping[str, Any] | None = None, state: Mapping[str, Any] | None = None,
                    keep_last: int = 2, rng: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically and return its folder.

    `rng` defaults to `capture_rng_state()` taken now. After the new checkpoint and the `latest` pointer
    are in place, complete checkpoints with a smaller step are pruned so that `keep_last` remain
    (the new one included); checkpoints with a larger step (an abandoned run) are left alone.
    An OSError while writing (ENOSPC, EACCES, ...) becomes a CheckpointWriteError naming the path; the
    temporary folder is removed and the previous checkpoint and `latest` pointer are untouched.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    tensors, objects = dict(tensors or {}), dict(objects or {})
    for kind, names in (("tensors", tensors), ("objects", objects)):
        for name in names:
            if not isinstance(name, str) or not _NAME.match(name) or name == "state":
                raise ValueError(f"checkpoint {kind} name {name!r} must be a file-name stem "
                                 "(letters, digits, '_', '.', '-'; not 'state')")
    meta = {"format": FORMAT_VERSION, "step": step, "rng": dict(rng) if rng is not None else capture_rng_state(),
            "tensors": sorted(tensors), "objects": sorted(objects), "state": dict(state or {})}
    try:
        json.dumps(meta)
    except TypeError as error:
        raise ValueError(f"checkpoint state must be JSON-serializable: {error}") from None

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    previous = latest_checkpoint(run_dir)
    tmp = old = None
    renamed = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        tmp = make_temp_dir(root, f"{_TMP_PREFIX}{step:08d}_")
        for name, tensor_dict in tensors.items():
            save_file(_portable_tensors(name, tensor_dict), str(tmp / f"{name}.safetensors"))
            # safetensors creates its file 0600; give it the mode open() would (0666 less the umask, which is
            # what the freshly made folder shows as 0777 less the umask)
            os.chmod(tmp / f"{name}.safetensors", tmp.stat().st_mode & 0o666)
            _fsync_file(tmp / f"{name}.safetensors")
        for name, obj in objects.items():
            with open(tmp / f"{name}.pt", "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
        meta["files"] = {file.name: {"bytes": file.stat().st_size, "sha256": _sha256(file)}
                         for file in sorted(tmp.iterdir())}
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): move the old copy aside first
            old = make_temp_dir(root, f"{_OLD_PREFIX}{step:08d}_")
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        tmp, renamed = None, True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except BaseException as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not renamed and (old / final.name).is_dir() and not final.exists():
            os.replace(old / final.name, final)  # put the earlier copy of this step back
        if isinstance(error, OSError):
            raise _write_error(error, step, final, previous, renamed) from error
        raise
    older = [path for path in list_checkpoints(run_dir) if _step_of(path) < step]
    for path in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _write_error(error: OSError, step: int, final: Path, previous: Path | None,
                 renamed: bool) -> CheckpointWriteError:
    """The CheckpointWriteError for `error`, saying what is left on disk and what to do."""
    where = f" ({error.filename})" if error.filename else ""
    if renamed and previous is not None and previous != final:
        kept = (f"The new checkpoint {final.name} is complete, but checkpoints/latest still names "
                f"{previous.name}, which is intact.")
    elif previous is not None:
        kept = f"The previous checkpoint {previous} is intact and checkpoints/latest still points to it."
    else:
        kept = "There is no earlier checkpoint."
    fix = ("free disk space (or set output_dir to a disk with room), then continue the run with resume=true"
           if error.errno in (errno.ENOSPC, errno.EDQUOT) else "fix the cause, then continue the run with resume=true")
    wrapped = CheckpointWriteError(f"could not save checkpoint step {step} to {final}: "
                                   f"{error.strerror or error}{where}. {kept} To go on: {fix}.")
    wrapped.errno = error.errno
    return wrapped


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, by increasing step (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _STEP_DIR.match(path.name) and _is_complete(path)]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `checkpoints/latest` when it is complete, else the complete checkpoint
    with the largest step, else None. "Complete" only looks at which files exist; `load_latest_intact`
    also verifies their contents."""
    name = _latest_name(Path(run_dir) / "checkpoints")
    if _STEP_DIR.match(name) and _is_complete(Path(run_dir) / "checkpoints" / name):
        return Path(run_dir) / "checkpoints" / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_latest_intact(run_dir: str | os.PathLike, *, weights_only: bool = True,
                       objects: bool = True) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of `run_dir` that loads and verifies, and one line "<folder>: <what is wrong>"
    per damaged checkpoint skipped on the way.

    Tried in order: the folder `checkpoints/latest` names, then every other `step_N` folder by decreasing
    step (folders without state.json included: a save renames a folder into place only once it is whole,
    so such a folder is damaged). Returns (None, []) when the run has no checkpoint folder at all; raises a
    CheckpointError naming each damaged checkpoint and why when it has some and none is intact.
    """
    root = Path(run_dir) / "checkpoints"
    folders = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_step_of,
                     reverse=True) if root.is_dir() else []
    pointed = root / _latest_name(root)
    if pointed in folders:
        folders.remove(pointed)
        folders.insert(0, pointed)
    damaged = []
    for folder in folders:
        try:
            return load_checkpoint(folder, weights_only=weights_only, objects=objects), damaged
        except CheckpointError as error:
            damaged.append(str(error))
    if damaged:
        raise CheckpointError(f"{root} holds no intact checkpoint: " + "; ".join(damaged))
    return None, []


def load_checkpoint(path: str | os.PathLike, *, weights_only: bool = True, objects: bool = True) -> Checkpoint:
    """Load a checkpoint folder; tensors come back on the CPU. `weights_only=False` allows `.pt` objects
    other than tensors and plain containers (only for files you trust); `objects=False` skips the `.pt`
    files (neither checked nor loaded: `objects` is then empty).

    Each file is checked against the manifest (size, then sha256) before it is parsed, and loaded tensors
    must hold no NaN; any problem is a CheckpointError naming the file and what is wrong.
    """
    path = Path(path)
    meta = _read_state(path)
    verified = meta["format"] != _UNVERIFIED_FORMAT
    tensors = {}
    for name in meta["tensors"]:
        file = path / f"{name}.safetensors"
        _check_file(file, meta.get("files"))
        try:
            tensors[name] = load_file(str(file), device="cpu")
        except Exception as error:  # SafetensorError and OSError: a damaged or unreadable file
            raise CheckpointError(f"{file}: unreadable safetensors file ({type(error).__name__}: {error})") from None
        for key, tensor in tensors[name].items():
            if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
                raise CheckpointError(f"{file}: tensor {key!r} holds NaN values (damaged weights, or a run that "
                                      "diverged before this save)")
    loaded = {}
    for name in meta["objects"] if objects else ():
        file = path / f"{name}.pt"
        _check_file(file, meta.get("files"))
        try:
            with open(file, "rb") as handle:
                loaded[name] = torch.load(handle, map_location="cpu", weights_only=weights_only)
        except Exception as error:  # UnpicklingError, RuntimeError (bad zip), EOFError, OSError, ...
            raise CheckpointError(f"{file}: unreadable torch file ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    return Checkpoint(path=path, step=meta["step"], tensors=tensors, objects=loaded, state=meta["state"],
                      rng=meta["rng"], verified=verified)


def _read_state(path: Path) -> dict[str, Any]:
    """state.json of the checkpoint folder `path`, its fields checked."""
    state_path = path / "state.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (no such folder)")
    try:
        text = state_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint folder (no readable state.json)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{state_path}: unreadable ({error})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{state_path}:{error.lineno}: corrupt checkpoint state (truncated or damaged): "
                              f"{error.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (_UNVERIFIED_FORMAT, FORMAT_VERSION):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{state_path}: checkpoint format {found!r} is not supported; "
                              f"allowed: {_UNVERIFIED_FORMAT} (unverified), {FORMAT_VERSION}")
    fields = {"step": int, "rng": dict, "tensors": list, "objects": list, "state": dict}
    if meta["format"] == FORMAT_VERSION:
        fields["files"] = dict
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{state_path}: malformed checkpoint state: {key!r} must be a {kind.__name__}, "
                                  f"got {type(meta.get(key)).__name__}")
    return meta


def _check_file(file: Path, manifest: Mapping[str, Any] | None) -> None:
    """Raise a CheckpointError unless `file` exists and matches its manifest entry (size and sha256)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (state.json lists it)")
    if manifest is None:  # format 1: nothing to compare with
        return
    entry = manifest.get(file.name)
    if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
        raise CheckpointError(f"{file}: no size and sha256 for it in {file.parent / 'state.json'}")
    size = file.stat().st_size
    if size < entry["bytes"]:
        raise CheckpointError(f"{file}: truncated: {size} bytes, expected {entry['bytes']}")
    if size > entry["bytes"]:
        raise CheckpointError(f"{file}: {size} bytes, expected {entry['bytes']} (data appended after the save)")
    digest = _sha256(file)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{file}: checksum mismatch (sha256 {digest[:16]}..., saved {entry['sha256'][:16]}...): "
                              "its contents changed after the save (disk or copy damage)")


def _sha256(file: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(file, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def _latest_name(root: Path) -> str:
    try:
        return (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def check_state_tensors(what: str, expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> None:
    """Raise a ValueError naming `what` unless `given` has exactly the names of `expected`, each with its shape."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} must hold exactly the expected tensors; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in expected.items():
        if tuple(given[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{what}[{name!r}] has shape {tuple(given[name].shape)}, expected {tuple(tensor.shape)}")


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of Python, NumPy, torch (CPU) and every CUDA device, as JSON-able data."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": [int(key) for key in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": _encode_bytes(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_encode_bytes(device_state) for device_state in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `capture_rng_state` returned; CUDA states are restored for the devices present."""
    try:
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))
        numpy = state["numpy"]
        np.random.set_state((numpy["kind"], np.asarray(numpy["keys"], dtype=np.uint32), numpy["pos"],
                             numpy["has_gauss"], numpy["cached_gaussian"]))
        torch.set_rng_state(_decode_bytes(state["torch"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"not an RNG state from capture_rng_state: missing or malformed {error}") from None
    if state.get("cuda") and torch.cuda.is_available():
        devices = min(len(state["cuda"]), torch.cuda.device_count())
        for index in range(devices):
            torch.cuda.set_rng_state(_decode_bytes(state["cuda"][index]), index)


def _portable_tensors(name: str, tensor_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors rejects shared or strided ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensor_dict.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"checkpoint tensors {name!r}: entry {key!r} must map a str to a torch.Tensor, "
                             f"got {type(tensor).__name__}")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.to("cpu")
        storage = tensor.untyped_storage()
        owns = storage.nbytes() == tensor.numel() * tensor.element_size()
        if not tensor.is_contiguous() or not owns or (storage.nbytes() and storage.data_ptr() in seen):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        if tensor.untyped_storage().nbytes():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _is_complete(path: Path) -> bool:
    try:
        meta = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return all((path / f"{name}.safetensors").is_file() for name in meta["tensors"]) and all(
            (path / f"{name}.pt").is_file() for name in meta["objects"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _remove_stale_temporaries(root: Path) -> None:
    """Folders left by a save that was killed midway."""
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _encode_bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
