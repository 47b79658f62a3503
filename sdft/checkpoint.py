"""Checkpoints for exact resume: safetensors weights, torch-saved state dicts and a JSON state.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N:08d>/`:
    <name>.safetensors   one per named tensor dict (student weights or adapter, EMA teacher, ...)
    <name>.pt            one per named torch-serializable object (optimizer, scheduler state dicts)
    state.json           {"format", "step", "rng", "tensors", "objects", "state"}; written last
A save writes everything into a hidden temporary folder, fsyncs it and renames it into place, then
rewrites the `checkpoints/latest` pointer atomically, then prunes older checkpoints: a crash at any
point leaves the previous checkpoint intact and findable. One writer per run folder.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdft.io import atomic_write_text, fsync_dir

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints",
           "capture_rng_state", "restore_rng_state"]

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_PREFIX = ".tmp_step_"
_OLD_PREFIX = ".old_step_"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: `tensors[name]` are CPU tensor dicts, `objects[name]` the torch-loaded
    objects, `state` the caller's JSON state and `rng` the RNG states captured at save time."""
    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, Any]
    state: dict[str, Any]
    rng: dict[str, Any]


def save_checkpoint(run_dir: str | os.PathLike, step: int, *,
                    tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    objects: Mapping[str, Any] | None = None, state: Mapping[str, Any] | None = None,
                    keep_last: int = 2, rng: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint `step` atomically and return its folder.

    `rng` defaults to `capture_rng_state()` taken now. After the new checkpoint and the `latest` pointer
    are in place, complete checkpoints with a smaller step are pruned so that `keep_last` remain
    (the new one included); checkpoints with a larger step (an abandoned run) are left alone.
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
    try:
        state_text = json.dumps({"format": FORMAT_VERSION, "step": step,
                                 "rng": dict(rng) if rng is not None else capture_rng_state(),
                                 "tensors": sorted(tensors), "objects": sorted(objects),
                                 "state": dict(state or {})}, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"checkpoint state must be JSON-serializable: {error}") from None

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}_", dir=root))
    try:
        for name, tensor_dict in tensors.items():
            save_file(_portable_tensors(name, tensor_dict), str(tmp / f"{name}.safetensors"))
            _fsync_file(tmp / f"{name}.safetensors")
        for name, obj in objects.items():
            with open(tmp / f"{name}.pt", "wb") as handle:
                torch.save(obj, handle)
                handle.flush()
                os.fsync(handle.fileno())
        atomic_write_text(tmp / "state.json", state_text + "\n")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resumed run): move the old copy aside first
            old = Path(tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{step:08d}_", dir=root))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    older = [path for path in list_checkpoints(run_dir) if _step_of(path) < step]
    for path in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, by increasing step (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if _STEP_DIR.match(path.name) and _is_complete(path)]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint named by `checkpoints/latest` when it is complete, else the complete checkpoint
    with the largest step, else None."""
    root = Path(run_dir) / "checkpoints"
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    if _STEP_DIR.match(name) and _is_complete(root / name):
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, *, weights_only: bool = True) -> Checkpoint:
    """Load a checkpoint folder; tensors come back on the CPU. `weights_only=False` allows `.pt` objects
    other than tensors and plain containers (only for files you trust)."""
    path = Path(path)
    state_path = path / "state.json"
    try:
        meta = json.loads(state_path.read_text(encoding="utf-8"))
    except OSError:
        raise ValueError(f"{path} is not a checkpoint folder (no readable state.json)") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{state_path}:{error.lineno}: corrupt checkpoint state: {error.msg}") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{state_path}: checkpoint format {meta.get('format')!r} is not supported; "
                         f"allowed: {FORMAT_VERSION}")
    tensors = {name: load_file(str(path / f"{name}.safetensors"), device="cpu") for name in meta["tensors"]}
    objects = {}
    for name in meta["objects"]:
        with open(path / f"{name}.pt", "rb") as handle:
            objects[name] = torch.load(handle, map_location="cpu", weights_only=weights_only)
    return Checkpoint(path=path, step=int(meta["step"]), tensors=tensors, objects=objects,
                      state=meta["state"], rng=meta["rng"])


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
