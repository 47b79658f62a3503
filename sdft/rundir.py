"""Run folders: one owner at a time, a record of what made them, no silent overwrite, mix or wrong resume.

`<output_dir>/<run_name>/` holds, besides the run's outputs (config.yaml, metrics.jsonl, checkpoints/, ...):
    run.lock   an advisory lock (fcntl.flock) held by the process that trains into the folder; its text
               names the holder (pid, host, start time, command line). The OS drops the lock when that
               process ends, however it ends (SIGKILL included), so a dead run never leaves it stuck.
    run.json   what the run was made with: {"sdft_version", "created_utc", "command", "config",
               "resumes": [{"time_utc", "sdft_version", "command", "changed"}]}.

`claim_run_folder(config)` takes the lock and decides, before anything is written:
- the folder is in use by another process: RunFolderError naming the holder;
- the folder holds a run and resume=false: RunFolderError offering resume=true, another run_name, or
  overwrite=true, which moves the old folder to `<run_name>.replaced-<UTC time>` (never deletes it);
- resume=true on a run made with other training settings: RunFolderError listing the keys (old -> new).
  Only the keys under `RESUME_MAY_CHANGE` may differ; `compare_configs` is the one "what changed" rule,
  also used by the experiment cells.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdft.io import atomic_write_json, fsync_dir

__all__ = ["RunFolder", "RunFolderError", "RunLock", "ConfigChanges", "compare_configs", "claim_run_folder",
           "read_run_record", "LOCK_FILE", "RECORD_FILE", "RESUME_MAY_CHANGE"]

LOCK_FILE = "run.lock"
RECORD_FILE = "run.json"
# the outputs that make a folder "hold a run" (a lock file alone, or a tinker_offline cache, does not)
RUN_OUTPUTS = (RECORD_FILE, "config.yaml", "metrics.jsonl", "summary.md", "checkpoints", "predictions")
# keys a resumed run may change: evaluation and logging never affect training, the step budget only extends
# or shortens it, resume/overwrite say how to start, output_dir/run_name say where the folder is now
RESUME_MAY_CHANGE = ("eval", "logging", "optim.max_steps", "optim.epochs", "resume", "overwrite", "output_dir",
                     "run_name")


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# What changed between two configs


@dataclass(frozen=True)
class ConfigChanges:
    """Differences between two configs as "key: old -> new" lines, by key: `allowed` are under one of the
    ignorable prefixes, `refused` are all the others."""
    allowed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def compare_configs(old: Mapping[str, Any], new: Mapping[str, Any], *, may_change: Sequence[str]) -> ConfigChanges:
    """Compare two plain config dicts (`config_to_dict`) leaf by leaf.

    Keys are dotted paths ("optim.lr"); a list of mappings with distinct "name"s is keyed by name
    ("eval.benchmarks[science].max_new_tokens"), so reordering or adding one benchmark shows as such.
    A key is allowed to change when it equals a prefix in `may_change` or lies below it ("eval" covers
    "eval.batch_size" and "eval.benchmarks[x].path"); a key present on one side only counts as changed.
    """
    old_flat, new_flat = _flatten(dict(old)), _flatten(dict(new))
    missing = object()
    allowed, refused = [], []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        before, after = old_flat.get(key, missing), new_flat.get(key, missing)
        if before == after:
            continue
        line = f"{key}: {_shown(before, missing)} -> {_shown(after, missing)}"
        (allowed if any(_under(key, prefix) for prefix in may_change) else refused).append(line)
    return ConfigChanges(allowed=allowed, refused=refused)


def _shown(value: Any, missing: object) -> str:
    return "(absent)" if value is missing else repr(value)


def _under(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith((prefix + ".", prefix + "["))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf}; a list of mappings with distinct "name"s is keyed by name ("eval.benchmarks[x].path")
    plus an "<list>.order" entry when it has more than one item."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(item, dict) and "name" in item for item in tree):
        names = [str(item["name"]) for item in tree]
        if len(set(names)) == len(names):
            out = {f"{prefix.rstrip('.')}.order": names} if len(names) > 1 else {}
            for name, item in zip(names, tree):
                out.update(_flatten(item, f"{prefix.rstrip('.')}[{name}]."))
            return out
    return {prefix.rstrip("."): tree}


# ----------------------------------------------------------------------------------------------
# The lock


class RunLock:
    """An exclusive fcntl.flock on `<folder>/run.lock`, whose text names the holder.

    flock locks belong to the open file, not to the path: the lock is released by `release()` or when the
    process ends (even by SIGKILL), and it follows the folder when the folder is renamed. Where the file
    system does not support flock (some network file systems), acquiring raises the OSError.
    """

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> "RunLock":
        """Lock `folder` (which must exist) without waiting; a RunFolderError naming the holder when it is held."""
        path = Path(folder) / LOCK_FILE
        for _ in range(10):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except FileNotFoundError:  # the folder was removed by a run that left nothing in it: make it again
                Path(folder).mkdir(parents=True, exist_ok=True)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(_read_holder(fd))
                os.close(fd)
                raise RunFolderError(
                    f"{Path(folder)} is in use by another run ({holder}); two runs writing into one folder would "
                    "mix their metrics, configs and checkpoints. Wait for it to finish (or stop it), or choose "
                    "another run_name") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:  # else the folder was moved aside between open() and flock(): lock the new file instead
                lock = cls(path, fd)
                lock._write_holder()
                return lock
            os.close(fd)
        raise RunFolderError(f"{path}: could not lock it (the folder keeps being replaced)")

    def _write_holder(self) -> None:
        """Best effort (a full disk must not keep the run from reporting its own error): the holder's pid, host,
        start time and command line, as one JSON line."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started_utc": _utc_now(),
                  "command": _command_line()}
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
            os.fsync(self._fd)
        except OSError:
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, *, remove: bool = False) -> None:
        """Unlock; the file is emptied, or with `remove` deleted while still locked (a process that opened it
        meanwhile then finds it gone and locks a new one: see `acquire`)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove:
                self.path.unlink()
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8")
        holder = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe_holder(holder: Mapping[str, Any] | None) -> str:
    if not holder:
        return "holder not yet recorded: it is starting"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started_utc')}, "
            f"command: {holder.get('command')}")


# ----------------------------------------------------------------------------------------------
# The folder


@dataclass
class RunFolder:
    """A run folder claimed for one run.

    path: the folder. notes: what the claim did or found, for the run's output and summary.md (the old
    folder moved aside, settings changed on resume). lock: the held RunLock (None on the other processes
    of a distributed run, which write nothing). record: run.json of the run being resumed (None when the
    run starts anew or the folder predates run.json). continues: the folder held a run and resume=true.
    changed: the allowed "key: old -> new" changes. created: the claim made the folder.
    """
    path: Path
    notes: list[str] = field(default_factory=list)
    lock: RunLock | None = None
    record: dict[str, Any] | None = None
    continues: bool = False
    changed: list[str] = field(default_factory=list)
    created: bool = False

    def record_start(self, config) -> None:
        """Write run.json: a new record for a new run, or one more entry under "resumes" for a resumed one."""
        from sdft import __version__
        from sdft.config import config_to_dict

        if self.record is not None:
            record = dict(self.record)
            record["resumes"] = list(record.get("resumes", [])) + [
                {"time_utc": _utc_now(), "sdft_version": __version__, "command": _command_line(),
                 "changed": list(self.changed)}]
        else:
            record = {"sdft_version": __version__, "created_utc": _utc_now(), "command": _command_line(),
                      "config": config_to_dict(config), "resumes": []}
        atomic_write_json(self.path / RECORD_FILE, record)
        self.record = record

    def release(self) -> None:
        """Give the folder back. A run that wrote nothing (it stopped before its first output) leaves no trace:
        its lock file is removed, and the folder too when the claim made it."""
        if self.lock is None or not self.lock.held:
            return
        folder = self.lock.path.parent
        try:
            untouched = [p.name for p in folder.iterdir()] == [LOCK_FILE]
        except OSError:
            untouched = False
        self.lock.release(remove=untouched)
        if untouched and self.created:
            try:
                folder.rmdir()
            except OSError:  # another run has started in it meanwhile
                pass

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """run.json of a run folder (None when there is none); a RunFolderError naming the file when unreadable."""
    path = Path(run_dir) / RECORD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path}: unreadable ({error})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); the record of what the run was "
                             "made with is damaged: use overwrite=true or another run_name") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunFolderError(f"{path}: expected an object with a 'config' mapping; use overwrite=true or another "
                             "run_name")
    return record


def claim_run_folder(config, *, run_dir: str | os.PathLike | None = None, is_main: bool = True,
                     world_size: int = 1) -> RunFolder:
    """Claim `run_dir` (default `<config.output_dir>/<config.run_name>`) for a run of `config`; see the module
    docstring for what is refused. Creates the folder and its lock file, moves an old run aside when
    config.overwrite asks for it, and writes nothing else (run.json is written by `RunFolder.record_start`
    once the run starts). Use as a context manager (or call `release()`) to give the folder back.

    In a distributed run (`world_size` > 1, torch.distributed initialized) only the main process claims;
    it sends the outcome to the others, so that every process stops with the same error.
    """
    path = Path(run_dir) if run_dir is not None else Path(config.output_dir) / config.run_name
    if world_size == 1:
        return _claim(config, path) if is_main else RunFolder(path=path)
    import torch.distributed as dist

    folder, failure, outcome = None, None, [None]
    if is_main:
        try:
            folder = _claim(config, path)
        except Exception as error:  # every process must learn of it, or the others wait forever
            failure, outcome = error, [f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RunFolderError(f"the main process could not claim {path}: {outcome[0]}")
    return folder if is_main else RunFolder(path=path)


def _claim(config, path: Path) -> RunFolder:
    from sdft.config import config_to_dict

    if config.resume and config.overwrite:
        raise RunFolderError("resume=true and overwrite=true exclude each other: resume=true continues the run in "
                             f"{path}, overwrite=true moves it aside and starts anew; set only one")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(path)
    try:
        found = _run_outputs(path)
        if not found:
            return RunFolder(path=path, lock=lock, created=created)
        if config.overwrite:
            aside = _move_aside(path)
            lock.path = aside / LOCK_FILE  # the lock moved with its folder
            path.mkdir(parents=True, exist_ok=True)
            new_lock = RunLock.acquire(path)
            lock.release()
            return RunFolder(path=path, lock=new_lock, created=True,
                             notes=[f"overwrite=true: the previous run in this folder was moved to {aside}"])
        record = read_run_record(path)
        if not config.resume:
            raise RunFolderError(
                f"{path} already holds a run ({', '.join(found)}{_made_with(record)}). Choose one: resume=true to "
                "continue it from its newest intact checkpoint; another run_name to keep it and start a new run; "
                f"or overwrite=true to start anew here (the old folder is moved to {path.name}.replaced-<UTC time>, "
                "not deleted)")
        old = record["config"] if record is not None else _stored_config(path)
        if old is None:
            return RunFolder(path=path, lock=lock, continues=True, notes=[
                f"{path} has no run.json or config.yaml: resumed without checking that the training settings are "
                "unchanged"])
        changes = compare_configs(old, config_to_dict(config), may_change=RESUME_MAY_CHANGE)
        if changes.refused:
            shown = "; ".join(changes.refused)
            raise RunFolderError(
                f"resume=true: {path} was made with other training settings ({shown}); a resumed run must train "
                f"as it started (only {', '.join(RESUME_MAY_CHANGE)} and the keys under them may change). Set "
                "them back, or start a new run: another run_name, or overwrite=true with resume=false")
        notes = [f"resumed with changed settings: {'; '.join(changes.allowed)}"] if changes.allowed else []
        return RunFolder(path=path, lock=lock, record=record, continues=True, changed=changes.allowed, notes=notes)
    except BaseException:
        RunFolder(path=path, lock=lock, created=created).release()
        raise


def _run_outputs(path: Path) -> list[str]:
    """The run outputs present in `path` ("config.yaml", "3 checkpoint folders", ...)."""
    found = []
    for name in RUN_OUTPUTS:
        item = path / name
        if name in ("checkpoints", "predictions"):
            entries = sum(1 for _ in item.iterdir()) if item.is_dir() else 0
            if entries and name == "checkpoints":
                steps = sum(1 for p in item.iterdir() if p.name.startswith("step_"))
                found.append(f"{steps} checkpoint folder(s)" if steps else "checkpoints/")
            elif entries:
                found.append(f"{name}/")
        elif item.exists():
            found.append(name)
    return found


def _made_with(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return ""
    config = record.get("config", {})
    return f"; made {record.get('created_utc')} with sdft {record.get('sdft_version')}, seed {config.get('seed')}"


def _stored_config(path: Path) -> dict[str, Any] | None:
    """config.yaml of a folder made before run.json existed, with defaults filled in (None when absent)."""
    from sdft.config import config_to_dict, load_config

    stored = path / "config.yaml"
    if not stored.is_file():
        return None
    try:
        return config_to_dict(load_config(stored))
    except ValueError as error:
        raise RunFolderError(f"resume=true: cannot compare with the run's own config: {error}; start a new run "
                             "(another run_name, or overwrite=true with resume=false)") from None


def _move_aside(path: Path) -> Path:
    """Rename `path` to `<name>.replaced-<UTC time>` (with -2, -3, ... when taken) and return the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for index in range(1, 1000):
        aside = path.with_name(f"{path.name}.replaced-{stamp}" + (f"-{index}" if index > 1 else ""))
        if not aside.exists():
            os.rename(path, aside)
            fsync_dir(path.parent)
            return aside
    raise RunFolderError(f"{path}: no free name to move it aside")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
