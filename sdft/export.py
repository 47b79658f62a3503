"""Export a run's student in the layouts the tools people use next load directly.

Two formats, each a folder with the tokenizer (its chat template included) and a model card (README.md:
base model, method, the run's config and its pass@1 scores from metrics.jsonl):

- "adapter": a PEFT LoRA adapter, `adapter_config.json` + `adapter_model.safetensors`, which
  `PeftModel.from_pretrained(base, folder)` (and vLLM / SGLang LoRA serving) loads on the base model;
- "merged": a plain Hugging Face model folder, the adapter merged into the base weights (W + (alpha / r) B A)
  or the fully fine-tuned weights, which `AutoModelForCausalLM.from_pretrained(folder)` loads; it can be the
  `model.name` of a later run (the next stage of a continual-learning experiment).

A local run's student is rebuilt from its config.yaml and checkpoint (`sdft.eval_run.load_run_student`) and
written with peft's and transformers' own `save_pretrained`. A Tinker run's adapter lives on the service: it
is exported through the SDK (`create_training_client_from_state` on the checkpoint's saved state,
`save_weights_external`, the rest client's `get_external_weights_urls`, then the temporary export is deleted);
"merged" then loads the base model (`model.name`) locally and merges the downloaded adapter with peft.

The folder is written under a temporary name beside `out_dir` and renamed into place; an existing `out_dir`
is replaced only with `overwrite=True`, and is kept intact if anything fails.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from sdft.backends import LIMITS
from sdft.io import atomic_write_text, fsync_dir

__all__ = ["FORMATS", "export_run", "export_student", "model_card", "run_scores"]

FORMATS = ("adapter", "merged")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
CARD = "README.md"


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, format: str = "merged",
               checkpoint: str | os.PathLike | None = None, overwrite: bool = False, device=None) -> Path:
    """Write the student of the run in `run_dir` at `checkpoint` (a name such as "step_00000004" or a path;
    None: the latest) to `out_dir` in `format` ("adapter" or "merged", see the module docstring)."""
    from sdft.eval_run import find_run_checkpoint, load_run_config

    if format not in FORMATS:
        raise ValueError(f"export format {format!r} is not allowed; allowed: {', '.join(FORMATS)}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = load_run_config(run_dir)
    if format == "adapter" and config.student.mode != "lora":
        raise ValueError(f"{run_dir}: student.mode={config.student.mode} trains every weight, so there is no "
                         "adapter to export; use the merged format (a full model folder)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another folder or pass overwrite (--overwrite) to replace it")
    checkpoint_path = find_run_checkpoint(run_dir, checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        if LIMITS[config.backend.kind].local_weights:
            base = _export_local(run_dir, config, checkpoint_path, format, staging, device)
        else:  # the adapter lives with the service: downloaded through its SDK
            base = _export_tinker(run_dir, config, checkpoint_path, format, staging)
        step = _checkpoint_step(checkpoint_path)
        atomic_write_text(staging / CARD, model_card(config, format=format, base_model=base, step=step,
                                                     scores=run_scores(run_dir, step)))
        staging.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary folder
        _replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def export_student(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The merged student of a local run's latest checkpoint in `out_dir` (replaced if present): the model
    folder a continual-learning stage starts from."""
    return export_run(run_dir, out_dir, format="merged", overwrite=True)


# ------------------------------------------------------------------------------------------ local runs

def _export_local(run_dir: Path, config, checkpoint: Path, format: str, out: Path, device) -> str:
    from sdft.eval_run import load_run_student

    loaded = load_run_student(run_dir, checkpoint=checkpoint, device=device)
    model = loaded.backend.model
    base = base_model_reference(config)
    if config.student.mode == "lora":
        adapter = model.active_adapter  # the student's; an EMA or sync teacher is a second adapter, left out
        if format == "adapter":
            model.save_pretrained(str(out), selected_adapters=[adapter], safe_serialization=True)
            _set_adapter_base(out, base)
        else:
            model.merge_and_unload(adapter_names=[adapter]).save_pretrained(str(out), safe_serialization=True)
    else:
        model.save_pretrained(str(out), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(out))
    return base


def base_model_reference(config) -> str:
    """How an export names its base model: the hub id of model.name, or the absolute local folder it loads
    from (the packaged model's converted folder)."""
    from sdft.models import resolve_model_path

    resolved = resolve_model_path(config.model.name, config.model.cache_dir)
    return str(Path(resolved).resolve()) if Path(resolved).is_dir() else resolved


def _set_adapter_base(folder: Path, base: str) -> None:
    path = folder / ADAPTER_CONFIG
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["base_model_name_or_path"] = base
    atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------- Tinker runs

def _export_tinker(run_dir: Path, config, checkpoint: Path, format: str, out: Path) -> str:
    from sdft.checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint).objects.get("optimizer", {}).get("tinker")
    if not isinstance(saved, dict) or "state_path" not in saved:
        raise ValueError(f"{checkpoint}: not a Tinker checkpoint (its optimizer state names no Tinker state path)")
    service, tokenizer = _tinker_service(run_dir, config)
    adapter_dir = out if format == "adapter" else Path(tempfile.mkdtemp(prefix=".adapter.", dir=out))
    _download_tinker_adapter(service, saved["state_path"], adapter_dir, name=f"export-{checkpoint.name}")
    base = config.backend.tinker_base_model if config.backend.tinker_service == "remote" else \
        base_model_reference(config)
    if format == "adapter":
        _set_adapter_base(out, base)
    else:
        _merge_adapter(config, adapter_dir, out)
        shutil.rmtree(adapter_dir)
    if tokenizer is None:
        from sdft.models import configured_tokenizer

        tokenizer = configured_tokenizer(config.model)
    tokenizer.save_pretrained(str(out))
    return base


def _tinker_service(run_dir: Path, config):
    """(service client, tokenizer or None): the Tinker API, or for a run made on the offline service, that
    service over model.name with the run's saved states (run_dir/tinker_offline). The offline service owns its
    model from then on (it injects adapters), so a merge loads a fresh copy of the base model."""
    if config.backend.tinker_service == "remote":
        import tinker

        from sdft.backends.tinker import require_api_key

        require_api_key()
        return tinker.ServiceClient(), None
    from sdft.backends.tinker_offline import OfflineServiceClient
    from sdft.models import load_configured

    model, tokenizer = load_configured(config.model)
    service = OfflineServiceClient(model, tokenizer, base_model=config.backend.tinker_base_model,
                                   root=run_dir / "tinker_offline", lora_alpha=config.student.lora_alpha,
                                   lora_dropout=config.student.lora_dropout, seed=config.seed)
    return service, tokenizer


def _result(value: Any) -> Any:
    """The SDK returns futures (`.result()`) for most calls and plain values for a few."""
    return value.result() if callable(getattr(value, "result", None)) else value


def _download_tinker_adapter(service, state_path: str, out: Path, *, name: str) -> None:
    """Export the LoRA weights saved at `state_path` in the external (PEFT) format and download its files."""
    training = _result(service.create_training_client_from_state(state_path))
    external = _result(training.save_weights_external(name)).path
    rest = service.create_rest_client()
    try:
        urls = _result(rest.get_external_weights_urls(external)).urls
        root = out.resolve()
        for relative, url in sorted(urls.items()):
            target = (out / relative).resolve()
            if not target.is_relative_to(root):
                raise ValueError(f"Tinker export {external}: file {relative!r} would be written outside {out}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as handle:
                shutil.copyfileobj(response, handle)
    finally:
        _result(rest.delete_checkpoint_from_tinker_path(external))
    _check_peft_adapter(out, external)


def _check_peft_adapter(folder: Path, source: str) -> None:
    """A clear error when an exported adapter is not in peft's layout (keys base_model.model.*.lora_A/B)."""
    from safetensors import safe_open

    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"Tinker export {source} holds no {', '.join(missing)}; files: "
                         f"{sorted(p.name for p in folder.iterdir())}")
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = list(handle.keys())
    odd = [key for key in keys if not (key.startswith("base_model.model.") and (".lora_A." in key or ".lora_B." in key))]
    if odd or not keys:
        raise ValueError(f"Tinker export {source}: {len(odd)} of {len(keys)} weights are not named as peft names "
                         f"LoRA weights (e.g. {odd[:2]}); convert the folder with "
                         "tinker_cookbook.weights.build_lora_adapter")


def _merge_adapter(config, adapter_dir: Path, out: Path) -> None:
    """Load the base model, apply the adapter with peft and save the merged weights. An adapter on the output
    layer of a model whose output layer shares the input embeddings' weight unties them first: merging into
    the shared tensor would change the embeddings too."""
    import torch
    from peft import PeftConfig, PeftModel

    from sdft.models import load_configured

    model, _ = load_configured(config.model)
    targets = set(PeftConfig.from_pretrained(str(adapter_dir)).target_modules or [])
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
    if head_names & targets and head.weight is embeddings.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)


# ----------------------------------------------------------------------------------------- model card

def _checkpoint_step(path: Path) -> int:
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return int(state["step"])


def run_scores(run_dir: str | os.PathLike, step: int) -> dict[str, dict[str, Any]]:
    """{"<split>/<benchmark>": {"before", "after", "ci_low", "ci_high", "n", "step"}} from the run's
    metrics.jsonl: pass@1 at step 0 and at the last evaluation at or before `step` (None where absent)."""
    from sdft.logs import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    scores: dict[str, dict[str, Any]] = {}
    for row in sorted(read_metrics(path), key=lambda r: r["step"]):
        if row["split"] == "train" or row["step"] > step:
            continue
        for key, value in row["metrics"].items():
            if not key.endswith("/pass@1"):
                continue
            prefix = key[:-len("/pass@1")]
            entry = scores.setdefault(prefix, {"before": None, "after": None, "ci_low": None, "ci_high": None,
                                               "n": None, "step": None})
            if row["step"] == 0:
                entry["before"] = value
            if row["step"] > 0 or entry["after"] is None:
                entry.update(after=value, ci_low=row["metrics"].get(f"{prefix}/ci_low"),
                             ci_high=row["metrics"].get(f"{prefix}/ci_high"), n=row["metrics"].get(f"{prefix}/n"),
                             step=row["step"])
    return scores


def model_card(config, *, format: str, base_model: str, step: int, scores: dict[str, dict[str, Any]]) -> str:
    """The README.md of an export: front matter for the hub, what was trained and how, scores, usage, config."""
    from sdft.config import config_to_dict

    hub_base = not Path(base_model).is_absolute()
    front = {"library_name": "peft" if format == "adapter" else "transformers",
             "tags": ["sdft", "self-distillation", config.algorithm] + (["lora"] if format == "adapter" else [])}
    if hub_base:
        front["base_model"] = base_model
    if config.algorithm == "sdft":
        teacher = {"static": "the base model", "ema": f"an EMA of the student (a = {config.teacher.ema_alpha})",
                   "sync": f"a copy of the student every {config.teacher.sync_every} steps"}[config.teacher.mode]
        method = (f"Self-Distillation Fine-Tuning (SDFT): the student samples completions on-policy from the bare "
                  f"prompt and is trained to match, token by token, the teacher ({teacher}) shown the prompt with "
                  f"a gold demonstration in context (teacher template `{config.teacher.template}`); objective "
                  f"`{config.objective.targets}`, reduction `{config.objective.reduction}`.")
    else:
        method = "Supervised fine-tuning on the demonstrations (the SFT baseline of sdft), cross-entropy."
    where = LIMITS[config.backend.kind].trained_on
    student = "LoRA" if config.student.mode == "lora" else "full fine-tuning"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip("\n"), "---", "",
             f"# {config.run_name}", "",
             f"The {'LoRA adapter' if format == 'adapter' else 'merged model'} of the student of the sdft run "
             f"`{config.run_name}` at optimizer step {step}.", "",
             f"- Base model: `{base_model}`" + ("" if hub_base else f" (model.name `{config.model.name}`)"),
             f"- Method: {method}",
             f"- Training: {student} on {where}, data `{config.data.path}` (kind `{config.data.kind}`), "
             f"lr {config.optim.lr}, {config.optim.batch_size} prompts per step.", "", "## Scores", ""]
    if scores:
        lines += ["| benchmark | pass@1 before | pass@1 after | 95% CI (Wilson) | n |", "|---|---:|---:|---|---:|"]
        for name, entry in scores.items():
            interval = (f"[{entry['ci_low']:.3f}, {entry['ci_high']:.3f}]"
                        if entry["ci_low"] is not None and entry["ci_high"] is not None else "-")
            show = [f"{v:.3f}" if isinstance(v, (int, float)) else "-" for v in (entry["before"], entry["after"])]
            lines.append(f"| {name} | {show[0]} | {show[1]} (step {entry['step']}) | {interval} | "
                         f"{entry['n'] if entry['n'] is not None else '-'} |")
    else:
        lines.append("The run logged no evaluation.")
    lines += ["", "## Use", "", "```python"]
    if format == "adapter":
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
                  "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")"]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/folder\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/folder\")"]
    if config.data.chat_template_kwargs:
        lines += [f"# prompts were rendered with apply_chat_template(..., **{config.data.chat_template_kwargs!r})"]
    lines += ["```", "", "## Training config", "", "```yaml",
              yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=100).rstrip("\n"),
              "```", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- folders

def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` is moved aside first and removed only after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
