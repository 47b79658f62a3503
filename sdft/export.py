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
    from sdft.eval_run import load_run_student

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    loaded = load_run_student(run_dir)
    backend, tokenizer, config = loaded.backend, loaded.tokenizer, loaded.config
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
