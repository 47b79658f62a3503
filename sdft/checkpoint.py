"""Checkpoints for exact resume: safetensors weights, torch-saved state dicts and a JSON state.

Layout of one checkpoint, `<run_dir>/checkpoints/step_<N:08d>/`:
    <name>.safetensors   one per named tensor dict (student weights or adapter, EMA teacher, ...)
    <name>.pt            one per named torch-serializable object (optimizer, scheduler state dicts)
    state.json           {"format", "step", "rng", "tensors", "objects", "state", "files"}; written last
`files` is the manifest: {file path relative to the folder: {"bytes": size, "sha256": hex digest}} of every
other file. Loading checks each file against it before parsing, so a truncated, zeroed or otherwise changed
file is reported by name instead of being loaded (format-1 checkpoints, written before the manifest existed,
load unverified).

A sharded checkpoint (format 3, written by an FSDP2 run: its tensors are DTensors, each process holding a
shard) keeps every tensor dict and object in `sharded/`, a `torch.distributed.checkpoint` folder (one
`__<rank>_0.distcp` file per process with its shards, plus `.metadata`), and records {"world_size": N} under
"sharded" in state.json; nothing is gathered whole. Whole (replicated) tensors and other objects in it are
written by the main process. It is read back either into the sharded state of a run (`like=`: every process
loads its own shards, resharded by DCP when the number of processes changed) or, by one process, into whole
CPU tensors, so `load_checkpoint(...).tensors` is the same for either layout.

A save writes everything into a hidden temporary folder, fsyncs it and renames it into place, then
rewrites the `checkpoints/latest` pointer atomically, then prunes older checkpoints: a crash or a full disk
at any point leaves the previous checkpoint intact and findable. One writer per run folder (sdft.rundir);
for a sharded save the main process makes the temporary folder and tells the others, every process writes its
shards, and the main process alone writes the manifest and moves the folder into place.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sdft.io import atomic_write_text, fsync_dir, make_temp_dir

__all__ = ["Checkpoint", "CheckpointError", "CheckpointWriteError", "save_checkpoint", "load_checkpoint",
           "load_latest_intact", "latest_checkpoint", "list_checkpoints", "check_state_tensors",
           "capture_rng_state", "restore_rng_state"]

FORMAT_VERSION = 2
SHARDED_FORMAT = 3  # a torch.distributed.checkpoint folder of shards (FSDP2 runs)
SHARDED_DIR = "sharded"
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
                    keep_last: int = 2, rng: Mapping[str, Any] | None = None, parallel=None) -> Path | None:
    """Write checkpoint `step` atomically and return its folder.

    `rng` defaults to `capture_rng_state()` taken now. After the new checkpoint and the `latest` pointer
    are in place, complete checkpoints with a smaller step are pruned so that `keep_last` remain
    (the new one included); checkpoints with a larger step (an abandoned run) are left alone.
    An OSError while writing (ENOSPC, EACCES, ...) becomes a CheckpointWriteError naming the path; the
    temporary folder is removed and the previous checkpoint and `latest` pointer are untouched.

    `parallel` (`sdft.parallel.Parallel`; None: one process): every process calls this. Unsharded runs write
    from the main process only (the others return None); under FSDP2 (`parallel.sharded`) `tensors` and
    `objects` hold this process's shards (DTensors, e.g. a non-full optimizer state dict) and every process
    writes its own into `sharded/` (a collective call; every process returns the folder or raises).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    sharded = parallel is not None and parallel.sharded
    if parallel is not None and not parallel.is_main and not sharded:
        return None
    tensors, objects = dict(tensors or {}), dict(objects or {})
    for kind, names in (("tensors", tensors), ("objects", objects)):
        for name in names:
            if not isinstance(name, str) or not _NAME.match(name) or name == "state":
                raise ValueError(f"checkpoint {kind} name {name!r} must be a file-name stem "
                                 "(letters, digits, '_', '.', '-'; not 'state')")
    meta = {"format": SHARDED_FORMAT if sharded else FORMAT_VERSION, "step": step,
            "rng": dict(rng) if rng is not None else capture_rng_state(),
            "tensors": sorted(tensors), "objects": sorted(objects), "state": dict(state or {})}
    if sharded:
        meta["sharded"] = {"world_size": parallel.world_size}
    try:
        json.dumps(meta)
    except TypeError as error:
        raise ValueError(f"checkpoint state must be JSON-serializable: {error}") from None
    if not sharded:
        return _publish(run_dir, step, meta, keep_last, lambda tmp: _write_whole(tmp, tensors, objects))
    return _save_sharded(run_dir, step, meta, keep_last, {"tensors": tensors, "objects": objects}, parallel)


def _save_sharded(run_dir: str | os.PathLike, step: int, meta: dict[str, Any], keep_last: int,
                  shards: dict[str, Any], parallel) -> Path:
    """The sharded save of `save_checkpoint` (a collective call): the main process makes the temporary folder
    and tells the others its path (so it must be on a file system every process sees), every process writes
    its shards of `shards` into its `sharded/` with `torch.distributed.checkpoint`, then the main process
    alone finishes as `_publish` does and tells the others how it went; every process raises if it failed."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"

    def share(obj):  # the main process's `obj` on every process
        return parallel.gather(obj if parallel.is_main else None)[0]

    def write_shards(tmp: Path | None) -> None:
        from torch.distributed.checkpoint import FileSystemWriter, save
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        folder = share(None if tmp is None else str(tmp))
        if folder is None:
            raise CheckpointWriteError(f"could not save checkpoint step {step} to {final}: the main process could "
                                       "not make its temporary folder (it reports why)")
        # replicated entries (whole tensors, optimizer steps, schedule) are written once, by the main process
        save(shards, storage_writer=FileSystemWriter(Path(folder) / SHARDED_DIR, sync_files=True),
             planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))
        parallel.barrier()

    if not parallel.is_main:
        try:
            write_shards(None)
        except BaseException as error:
            if not getattr(error, "failures", None):  # (only DCP's CheckpointException lists failures)
                raise
            raise _as_write_error(error, step, final, None, False) from error  # every process raises it
        outcome = share(None)
        if outcome["error"] is not None:
            raise CheckpointWriteError(f"the main process could not finish checkpoint step {step}: {outcome['error']}")
        return Path(outcome["path"])
    told = {"others": True}  # whether the other processes stop by themselves when this save fails

    def write_main(tmp: Path) -> None:
        write_shards(tmp)
        told["others"] = False  # from here on they wait for the outcome

    def no_folder() -> None:
        with contextlib.suppress(CheckpointWriteError):
            write_shards(None)

    try:
        path = _publish(run_dir, step, meta, keep_last, write_main, on_no_folder=no_folder)
    except BaseException as error:
        if not told["others"]:
            share({"error": f"{type(error).__name__}: {error}", "path": None})
        raise
    share({"error": None, "path": str(path)})
    return path


def _publish(run_dir: str | os.PathLike, step: int, meta: dict[str, Any], keep_last: int, write,
             on_no_folder=None) -> Path:
    """Make a temporary folder, `write(folder)` the files into it, add the manifest and state.json, move it into
    place as step_<step>, point `latest` at it and prune. `on_no_folder()` is called when the temporary folder
    could not be made (a sharded save tells the other processes)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    previous = latest_checkpoint(run_dir)
    tmp = old = None
    renamed = False
    try:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(root)
            tmp = make_temp_dir(root, f"{_TMP_PREFIX}{step:08d}_")
        except BaseException:
            if on_no_folder is not None:
                on_no_folder()
            raise
        write(tmp)
        meta = {**meta, "files": {file.relative_to(tmp).as_posix(): {"bytes": file.stat().st_size,
                                                                     "sha256": _sha256(file)}
                                  for file in sorted(tmp.rglob("*")) if file.is_file()}}
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for folder in sorted({file.parent for file in tmp.rglob("*")} | {tmp}):
            fsync_dir(folder)
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
        if isinstance(error, OSError) or getattr(error, "failures", None):  # (DCP's CheckpointException)
            raise _as_write_error(error, step, final, previous, renamed) from error
        raise
    older = [path for path in list_checkpoints(run_dir) if _step_of(path) < step]
    for path in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _write_whole(tmp: Path, tensors: Mapping[str, Mapping[str, torch.Tensor]], objects: Mapping[str, Any]) -> None:
    """One safetensors file per tensor dict and one torch file per object, fsynced."""
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


def _as_write_error(error: BaseException, step: int, final: Path, previous: Path | None,
                    renamed: bool) -> CheckpointWriteError:
    """`error` as a CheckpointWriteError: an OSError as it is, a failed collective write (DCP's
    CheckpointException, which carries each process's exception) by the first OSError in it, or by its text."""
    failures = {rank: pair[0] if isinstance(pair, tuple) else pair
                for rank, pair in (getattr(error, "failures", None) or {}).items()}
    found = error if isinstance(error, OSError) else next(
        (e for e in failures.values() if isinstance(e, OSError)), None)
    if found is None:
        detail = "; ".join(f"process {rank}: {type(e).__name__}: {e}" for rank, e in sorted(failures.items()))
        found = OSError(errno.EIO, detail or f"{type(error).__name__}: {error}")
    return _write_error(found, step, final, previous, renamed)


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


def load_latest_intact(run_dir: str | os.PathLike, *, weights_only: bool = True, objects: bool = True,
                       like=None, parallel=None) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint of `run_dir` that loads and verifies, and one line "<folder>: <what is wrong>"
    per damaged checkpoint skipped on the way.

    Tried in order: the folder `checkpoints/latest` names, then every other `step_N` folder by decreasing
    step (folders without state.json included: a save renames a folder into place only once it is whole,
    so such a folder is damaged). Returns (None, []) when the run has no checkpoint folder at all; raises a
    CheckpointError naming each damaged checkpoint and why when it has some and none is intact.

    `like`: see `load_checkpoint`. `parallel` (`sdft.parallel.Parallel`, several processes): a collective
    call; the main process chooses the checkpoint (verifying its files) and tells the others, then every
    process loads it (a sharded one into `like()`, each process its own shards).
    """
    if parallel is None or parallel.mode == "single":
        return _newest_intact(run_dir, lambda folder: load_checkpoint(folder, weights_only=weights_only,
                                                                      objects=objects, like=like))
    chosen = outcome = failure = None
    if parallel.is_main:
        try:
            chosen, damaged = _newest_intact(run_dir, lambda folder: _verify_or_load(folder, weights_only, objects))
            where = chosen.path if isinstance(chosen, Checkpoint) else chosen
            outcome = {"path": None if where is None else str(where), "damaged": damaged, "error": None}
        except Exception as error:  # every process must stop with it
            failure, outcome = error, {"error": str(error)}
    outcome = parallel.gather(outcome)[0]
    if failure is not None:
        raise failure
    if outcome["error"] is not None:
        raise CheckpointError(f"the main process found no checkpoint to resume from: {outcome['error']}")
    if outcome["path"] is None:
        return None, outcome["damaged"]
    if isinstance(chosen, Checkpoint):  # the main process loaded it already (whole files)
        return chosen, outcome["damaged"]
    path = Path(outcome["path"])
    sharded = _read_state(path).get("sharded") is not None
    # (the main process verified the checkpoint's files; the others do not hash them all again)
    loaded = _load(path, weights_only=weights_only, objects=objects, like=like, verify=False)
    if sharded:  # no NaN in any process's shards
        bad = sorted({name for names in parallel.gather(_nan_entries(loaded.tensors)) for name in names})
        if bad:
            raise CheckpointError(f"{path / SHARDED_DIR}: tensors {bad[:5]} hold NaN values (damaged weights, or a "
                                  "run that diverged before this save)")
    return loaded, outcome["damaged"]


def _newest_intact(run_dir: str | os.PathLike, load) -> tuple[Any, list[str]]:
    """`load(folder)` of the newest checkpoint folder for which it raises no CheckpointError (see
    `load_latest_intact`), and the errors of the folders skipped."""
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
            return load(folder), damaged
        except CheckpointError as error:
            damaged.append(str(error))
    if damaged:
        raise CheckpointError(f"{root} holds no intact checkpoint: " + "; ".join(damaged))
    return None, []


def _verify_or_load(folder: Path, weights_only: bool, objects: bool) -> Checkpoint | Path:
    """A whole checkpoint loaded, or the folder of a sharded one whose files match its manifest."""
    meta = _read_state(folder)
    if meta.get("sharded") is None:
        return load_checkpoint(folder, weights_only=weights_only, objects=objects)
    for name in meta["files"]:
        _check_file(folder, name, meta["files"])
    return folder


def load_checkpoint(path: str | os.PathLike, *, weights_only: bool = True, objects: bool = True,
                    like=None) -> Checkpoint:
    """Load a checkpoint folder; tensors come back on the CPU. `weights_only=False` allows `.pt` objects
    other than tensors and plain containers (only for files you trust); `objects=False` skips the `.pt`
    files (neither checked nor loaded: `objects` is then empty).

    Each file is checked against the manifest (size, then sha256) before it is parsed, and loaded tensors
    must hold no NaN; any problem is a CheckpointError naming the file and what is wrong.

    A sharded checkpoint is read whole into CPU tensors by this one process, unless `like` is given: a
    function returning (tensors, objects) shaped as they were saved, holding this process's shards (DTensors)
    of a sharded run; every process then loads its shards into them in place (a collective call; a different
    number of processes than at the save is resharded) and they are returned. `like` is not called for a
    whole checkpoint; a sharded checkpoint and a `like` without DTensors (a run that is not sharded) is a
    ValueError naming the number of processes that wrote it.
    """
    return _load(Path(path), weights_only=weights_only, objects=objects, like=like, verify=True)


def _load(path: Path, *, weights_only: bool, objects: bool, like, verify: bool) -> Checkpoint:
    """`load_checkpoint`; `verify=False` skips the manifest check (files another process has just verified)."""
    meta = _read_state(path)
    verified = meta["format"] != _UNVERIFIED_FORMAT
    if meta.get("sharded") is not None:
        if verify:
            for name in meta["files"]:
                _check_file(path, name, meta["files"])
        tensors, loaded = _read_sharded(path, meta, weights_only=weights_only, objects=objects, like=like)
        if like is None:
            for name, tensor_dict in tensors.items():
                _check_no_nan(path / SHARDED_DIR, tensor_dict, name)
        return Checkpoint(path=path, step=meta["step"], tensors=tensors, objects=loaded, state=meta["state"],
                          rng=meta["rng"], verified=True)
    tensors = {}
    for name in meta["tensors"]:
        file = path / f"{name}.safetensors"
        if verify:
            _check_file(path, file.name, meta.get("files"))
        try:
            tensors[name] = load_file(str(file), device="cpu")
        except Exception as error:  # SafetensorError and OSError: a damaged or unreadable file
            raise CheckpointError(f"{file}: unreadable safetensors file ({type(error).__name__}: {error})") from None
        _check_no_nan(file, tensors[name])
    loaded = {}
    for name in meta["objects"] if objects else ():
        file = path / f"{name}.pt"
        if verify:
            _check_file(path, file.name, meta.get("files"))
        try:
            with open(file, "rb") as handle:
                loaded[name] = torch.load(handle, map_location="cpu", weights_only=weights_only)
        except Exception as error:  # UnpicklingError, RuntimeError (bad zip), EOFError, OSError, ...
            raise CheckpointError(f"{file}: unreadable torch file ({type(error).__name__}: "
                                  f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
    return Checkpoint(path=path, step=meta["step"], tensors=tensors, objects=loaded, state=meta["state"],
                      rng=meta["rng"], verified=verified)


def _check_no_nan(where: Path, tensor_dict: Mapping[str, torch.Tensor], group: str | None = None) -> None:
    for key in _nan_entries({group or "": tensor_dict}):
        raise CheckpointError(f"{where}: tensor {key!r} holds NaN values (damaged weights, or a run that "
                              "diverged before this save)")


def _nan_entries(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """Names ("<group>/<name>", or the name alone for group "") of the floating tensors holding NaN (of a
    DTensor: in this process's shard)."""
    found = []
    for group, tensor_dict in tensors.items():
        for key, tensor in tensor_dict.items():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point() and bool(torch.isnan(local).any()):
                found.append(f"{group}/{key}" if group else key)
    return found


def _read_sharded(path: Path, meta: Mapping[str, Any], *, weights_only: bool, objects: bool,
                  like) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """(tensors, objects) of the sharded checkpoint `path`: whole, read by this process alone (like None), or
    loaded into this process's shards `like()` (a collective call)."""
    import torch.distributed.checkpoint as dcp

    folder = path / SHARDED_DIR
    reader = dcp.FileSystemReader(folder)
    if like is None:
        try:
            metadata = reader.read_metadata()
        except Exception as error:
            raise CheckpointError(f"{folder / '.metadata'}: unreadable ({type(error).__name__}: {error})") from None
        paths = metadata.planner_data or {}
        wanted = ("tensors", "objects") if objects else ("tensors",)
        flat = {key: (torch.empty(entry.size, dtype=entry.properties.dtype)
                      if isinstance(entry, dcp.metadata.TensorStorageMetadata) else None)
                for key, entry in metadata.state_dict_metadata.items()
                if key in paths and paths[key][0] in wanted}
        _dcp_load(folder, flat, reader=reader, weights_only=weights_only, no_dist=True)
        state: dict[str, Any] = {}
        for key, value in flat.items():
            _set_path(state, paths[key], value)
    else:
        like_tensors, like_objects = like()
        if not any(hasattr(t, "device_mesh") for group in like_tensors.values() for t in group.values()):
            size = meta["sharded"]["world_size"]
            raise ValueError(f"{path} was written sharded by an FSDP2 run of {size} process{'es' * (size != 1)}; "
                             "continue it as an FSDP2 run (accelerate launch --config_file "
                             "configs/accelerate/fsdp2.yaml ...), or read it whole with sdft evaluate or sdft export")
        state = {"tensors": dict(like_tensors), "objects": dict(like_objects) if objects else {}}
        _dcp_load(folder, state, reader=reader, weights_only=weights_only, no_dist=False)
    tensors = {name: dict(state.get("tensors", {}).get(name, {})) for name in meta["tensors"]}
    loaded = {name: state.get("objects", {}).get(name) for name in meta["objects"]} if objects else {}
    return tensors, loaded


def _dcp_load(folder: Path, state: dict, *, reader, weights_only: bool, no_dist: bool) -> None:
    """dcp.load into `state` in place; its errors become a CheckpointError naming the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        """DCP's planner, with its pickled (non-tensor) entries read under our `weights_only` setting."""

        def load_bytes(self, read_item, value):
            _set_path(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                      torch.load(value, map_location="cpu", weights_only=weights_only))

    try:
        with warnings.catch_warnings():  # (no_dist: DCP warns that it reads in one process, as asked)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=Planner(), no_dist=no_dist)
    except BaseException as error:
        if not isinstance(error, Exception) and not getattr(error, "failures", None):
            raise
        detail = str(error).strip().splitlines()
        raise CheckpointError(f"{folder}: unreadable sharded checkpoint ({type(error).__name__}: "
                              f"{' '.join(detail[:3]) if detail else 'no detail'})") from None


def _set_path(root: dict, path: Sequence[Any], value: Any) -> None:
    """root[path[0]][path[1]]...[path[-1]] = value, making the dicts (lists for int keys) on the way."""
    node: Any = root
    for key, following in zip(path[:-1], path[1:]):
        empty = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            node[key] = empty if node[key] is None else node[key]
        else:
            node.setdefault(key, empty)
        node = node[key]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


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
    formats = (_UNVERIFIED_FORMAT, FORMAT_VERSION, SHARDED_FORMAT)
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{state_path}: checkpoint format {found!r} is not supported; "
                              f"allowed: {_UNVERIFIED_FORMAT} (unverified), {FORMAT_VERSION}, "
                              f"{SHARDED_FORMAT} (sharded)")
    fields = {"step": int, "rng": dict, "tensors": list, "objects": list, "state": dict}
    if meta["format"] != _UNVERIFIED_FORMAT:
        fields["files"] = dict
    if meta["format"] == SHARDED_FORMAT:
        fields["sharded"] = dict
    else:
        meta.pop("sharded", None)
    for key, kind in fields.items():
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{state_path}: malformed checkpoint state: {key!r} must be a {kind.__name__}, "
                                  f"got {type(meta.get(key)).__name__}")
    if meta["format"] == SHARDED_FORMAT:
        size = meta["sharded"].get("world_size")
        listed = f"{SHARDED_DIR}/.metadata" in meta["files"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1 or not listed:
            raise CheckpointError(f"{state_path}: malformed sharded checkpoint state: 'sharded' must hold "
                                  f"world_size (an int >= 1) and 'files' must list {SHARDED_DIR}/.metadata")
    return meta


def _check_file(folder: Path, name: str, manifest: Mapping[str, Any] | None) -> None:
    """Raise a CheckpointError unless `folder / name` exists and matches its manifest entry (size and sha256)."""
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (state.json lists it)")
    if manifest is None:  # format 1: nothing to compare with
        return
    entry = manifest.get(name)
    if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)):
        raise CheckpointError(f"{file}: no size and sha256 for it in {folder / 'state.json'}")
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
        if meta.get("format") == SHARDED_FORMAT:
            return (path / SHARDED_DIR / ".metadata").is_file()
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
