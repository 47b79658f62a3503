"""Export a finished local run's student as a plain Hugging Face model folder.

LoRA students are merged into the base weights (W + (alpha / r) B A), so the folder loads with
`AutoModelForCausalLM.from_pretrained` and can be the `model.name` of a later run (the next stage of
a continual-learning experiment). The folder is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdft.io import fsync_dir


def export_student(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Load run_dir/config.yaml and the run's latest checkpoint, save the student to `out_dir`."""
    from sdft.build import build_local_backend
    from sdft.checkpoint import latest_checkpoint, load_checkpoint
    from sdft.config import load_config
    from sdft.models import load_model_and_tokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no config.yaml: not a run folder")
    config = load_config(config_path)
    if config.backend.kind != "local":
        raise ValueError(f"{config_path}: backend.kind={config.backend.kind!r}; only local runs can be exported "
                         "as a model folder")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to export")
    model, tokenizer = load_model_and_tokenizer(config.model.name, cache_dir=config.model.cache_dir)
    backend = build_local_backend(config, model, tokenizer, steps=1)
    backend.load_state_tensors(load_checkpoint(checkpoint).tensors)
    if config.student.mode == "lora":  # merge only the student adapter (an EMA/sync teacher adds a second one)
        peft_model = backend.model
        student = peft_model.merge_and_unload(adapter_names=[peft_model.active_adapter])
    else:
        student = backend.model
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    student.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    return out_dir
