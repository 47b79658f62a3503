"""Materialize each task's train and test parts as `save_to_disk` folders inside the experiment folder.

Every cell of an experiment trains on `<results>/data/<task>/train` and is evaluated on
`<results>/data/<task>/test` of every task, so the split is decided once, is visible on disk, and is
the same for all cells and stages. The split rule is `sdft.data.split_examples` (by API name: no test
API is ever trained on; or at random with a fixed seed).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from sdft.data import load_examples, split_examples
from sdft.experiments.spec import TaskSpec
from sdft.io import atomic_write_json, fsync_dir


@dataclass(frozen=True)
class TaskData:
    """Where one task's parts are (train None: evaluated only; test None: kind lm_eval, named by its
    benchmark.task) and a line that says how they were made."""

    train: str | None
    test: str | None
    note: str


def prepare_task(task: TaskSpec, root: str | os.PathLike) -> TaskData:
    """Return the task's train/test folders, writing them under root/<task> the first time."""
    from sdft.build import resolve_path

    if task.kind == "lm_eval":
        return TaskData(train=None, test=None, note=f"{task.title}: lm-evaluation-harness task "
                                                    f"{task.benchmark['task']!r} (evaluated only)")
    if task.path is None:
        given = [(key, value) for key, value in (("train_path", task.train_path), ("test_path", task.test_path))
                 if value is not None]
        for key, value in given:
            if not resolve_path(value).exists():
                raise FileNotFoundError(f"task {task.name!r}: {key} {value!r} does not exist")
        note = (f"{task.title}: trained on {task.train_path}, evaluated on {task.test_path}" if task.train_path
                else f"{task.title}: {task.test_path} (evaluated only)")
        return TaskData(train=task.train_path, test=task.test_path, note=note)
    source = Path(task.path)
    if not source.exists():
        raise FileNotFoundError(f"task {task.name!r}: path {task.path!r} does not exist")
    folder = Path(root) / task.name
    train_dir, test_dir = folder / "train", folder / "test"
    examples = load_examples(task.kind, source)
    train, test = split_examples(examples, by=task.split, test_fraction=task.test_fraction, seed=task.split_seed)
    note = (f"{task.title}: {source} split by {task.split!r} (test_fraction {task.test_fraction}, seed "
            f"{task.split_seed}): {len(train)} train / {len(test)} test rows")
    if task.split == "api":
        note += "; test APIs (never trained on): " + ", ".join(sorted({e.id.rsplit('/', 1)[0] for e in test}))
    record = {"source": str(source), "train_ids": [e.id for e in train], "test_ids": [e.id for e in test]}
    manifest = folder / "split.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()) != record:
            raise ValueError(f"task {task.name!r}: {folder} holds a different split (source, split rule or "
                             "seed changed); cells trained on it would be mixed with the new one: delete the "
                             "experiment folder or give the experiment another name")
    else:
        from datasets import load_from_disk

        rows = load_from_disk(str(source))
        for part, target in ((train, train_dir), (test, test_dir)):
            _write_rows(rows.select([_row_index(e.id) for e in part]), target)
        atomic_write_json(manifest, record)  # written last: its presence means both parts are complete
    return TaskData(train=str(train_dir), test=str(test_dir), note=note)


def _row_index(example_id: str) -> int:
    """Loader ids end in the dataset row index ('<api>/<row>', 'science/<row>')."""
    return int(example_id.rsplit("/", 1)[1])


def _write_rows(dataset, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    dataset.save_to_disk(str(tmp))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)
