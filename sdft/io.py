"""Atomic file writes: a crash leaves either the old file or the new one, never a partial file.

Temporary files and folders are created with `os.open(..., 0o666)` and `os.mkdir(..., 0o777)`, so they get
the permissions the process umask gives any new file (0644 / 0755 under umask 022), like `open()` would;
`tempfile.mkstemp` / `mkdtemp` would make them 0600 / 0700 whatever the umask.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def read_text(path: str | os.PathLike, *, fix: str = "save the file as UTF-8", encoding: str = "utf-8") -> str:
    """The file's text; a ValueError naming the file, the first byte that is not UTF-8 and `fix` otherwise
    (`encoding="utf-8-sig"` also drops a byte-order mark)."""
    try:
        return Path(path).read_text(encoding=encoding)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte {error.start}); {fix}") from None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The rows of a JSONL file (blank lines skipped); a ValueError naming the file and line of a row that is
    not JSON, or of a byte that is not UTF-8."""
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
    return rows


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """Create a new folder `<parent>/<prefix><random>` (mode 0777 less the umask) and return it."""
    for _ in range(100):
        folder = Path(parent) / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free temporary folder name {prefix}* in {parent}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp_file(folder: Path, prefix: str) -> tuple[int, str]:
    """(fd, path) of a new empty file `<folder>/<prefix><random>.tmp` opened for writing (0666 less the umask)."""
    for _ in range(100):
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name {prefix}*.tmp in {folder}")
