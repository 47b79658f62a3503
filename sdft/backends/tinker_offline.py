"""An in-process stand-in for the Tinker service, running a local Hugging Face causal LM.

`OfflineServiceClient(model, tokenizer, base_model=...)` implements the part of the `tinker` SDK (0.38)
that `sdft.backends.tinker.TinkerBackend` uses, with the SDK's own types (`tinker.types.Datum`,
`SampleResponse`, `ForwardBackwardOutput`, ...) and futures (`tinker.APIFuture`: `.result()`), so a
Tinker config runs end to end without network, API key or GPU, and its behaviour can be debugged line by
line:

    service = OfflineServiceClient(model, tokenizer, base_model="Qwen/Qwen3-8B", root="runs/x/tinker_offline")
    training = service.create_lora_training_client("Qwen/Qwen3-8B", rank=32, seed=0).result()
    teacher = service.create_sampling_client(base_model="Qwen/Qwen3-8B").result()
    backend = TinkerBackend("Qwen/Qwen3-8B", tokenizer, service_client=service, ...)

Implemented, with the semantics Tinker documents:
  service   create_lora_training_client(base_model, rank, seed, train_mlp, train_attn, train_unembed),
            create_training_client_from_state[_with_optimizer](path), create_sampling_client(model_path |
            base_model), create_rest_client().get_server_capabilities()
  training  forward / forward_backward(data, loss_fn): "cross_entropy" (target_tokens and weights of shape
            [N] or [N, K]; loss = -sum(weights * log p(target_tokens))) and "importance_sampling"
            (target_tokens, logprobs, advantages [N]; loss = -sum(exp(log p - logprobs) * advantages)), where
            row i of a datum is predicted from model_input[:i + 1] and log p is the full-vocabulary
            log-softmax at temperature 1; loss_fn_outputs[i]["logprobs"] has the shape of target_tokens.
            forward_backward_custom(data, fn): fn(data, logprobs) -> (loss, metrics), differentiated through
            the log-probs. Gradients add up over calls until optim_step(AdamParams), which is torch AdamW
            (learning_rate, beta1, beta2, eps, weight_decay; grad_clip_norm > 0 clips the global norm).
            save_state / load_state[_with_optimizer], save_weights_for_sampler, create_sampling_client,
            save_weights_and_get_sampling_client, save_weights_external (a PEFT adapter folder:
            adapter_config.json + adapter_model.safetensors), get_info, get_tokenizer.
  sampling  sample(prompt, num_samples, SamplingParams(max_tokens, temperature, top_p, top_k in {-1, 1},
            seed, stop as token ids), include_prompt_logprobs, topk_prompt_logprobs, prompt_logprobs_last_n),
            compute_logprobs. topk_prompt_logprobs[p] is the top-K of the distribution that predicts prompt
            token p (entry 0, and entries before the last n, are None); fewer than K entries exist only
            when the vocabulary is smaller than K.
  rest      get_server_capabilities, get_external_weights_urls (file:// URLs of an external-weights
            folder), delete_checkpoint_from_tinker_path.

Where it differs from the real service:
- Requests run eagerly, one at a time, when submitted: the futures it returns are already done.
- LoRA alpha and dropout are this object's constructor arguments (on Tinker the server picks them); the
  adapter's layers are the model's attention (train_attn), MLP (train_mlp) and output (train_unembed)
  linear layers; the LoRA init is peft's, drawn from the CPU RNG seeded with `seed`, exactly as
  `LocalBackend` draws it, so both start from the same adapter.
- `SamplingParams.seed` is the stream seed of the request's first sample (the others' are drawn from a
  generator seeded with it) and completions are decoded by `sdft.sampling.native.decode_batch`, so a
  prompt sampled with seed s gives the same completion here as `LocalBackend.sample(..., seeds=[s])`.
- Saved weights are kept in memory (the last few by path; a sampling client keeps its own snapshot) and,
  when `root` is given, save_state writes its adapter + optimizer state to root/<run id>/weights/<name>/
  together with the snapshots live sampling clients use (root/<run id>/sampler_weights/<name>/, e.g. a
  sync teacher), so that another process with the same root resumes from the paths of a checkpoint.
  Sampler snapshots are not otherwise written: one per optimizer step would fill the disk.
"""
from __future__ import annotations

import copy
import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from sdft.lm import check_plain_output_head, hidden_states
from sdft.sampling.base import padding_token_id, stop_token_ids
from sdft.sampling.draw import counter_uniforms, draw_seeds, draw_tokens, greedy_tokens
from sdft.sampling.native import decode_batch
from sdft.checkpoint import check_state_tensors

try:  # the SDK is an optional dependency: `pip install sdft[tinker]`
    from tinker import types
    from tinker.lib.public_interfaces.api_future import AwaitableConcurrentFuture
    from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("sdft.backends.tinker_offline needs the Tinker SDK: pip install 'sdft[tinker]' "
                      "(or pip install tinker)") from error

__all__ = ["OfflineServiceClient", "OfflineTrainingClient", "OfflineSamplingClient"]

_LOSS_FNS = ("cross_entropy", "importance_sampling")
_PATH_KINDS = ("weights", "sampler_weights", "external_weights")
_ADAPTER_CONFIG, _ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
_KEPT_IN_MEMORY = 4  # payloads kept by path; live sampling clients hold their own


def _future(fn: Callable[[], Any]) -> AwaitableConcurrentFuture:
    """Run `fn` now; return an SDK future holding its result or its exception."""
    future: Future = Future()
    try:
        future.set_result(fn())
    except Exception as error:  # noqa: BLE001 - delivered through .result(), as the SDK does
        future.set_exception(error)
    return AwaitableConcurrentFuture(future)


class _Engine:
    """The model, its LoRA adapters (one peft adapter per training run and per snapshot config), the
    checkpoint store and the lock that serializes every request."""

    def __init__(self, model: nn.Module, tokenizer, *, base_model: str, root, lora_alpha: float,
                 lora_dropout: float, seed: int, eos_token_ids, forward_batch_size: int):
        if not isinstance(base_model, str) or not base_model.strip():
            raise ValueError(f"base_model must be a non-empty model name, got {base_model!r}")
        if not (isinstance(lora_alpha, (int, float)) and lora_alpha > 0):
            raise ValueError(f"lora_alpha must be a float > 0, got {lora_alpha!r}")
        if not (isinstance(lora_dropout, (int, float)) and 0 <= lora_dropout < 1):
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        if not isinstance(forward_batch_size, int) or forward_batch_size < 1:
            raise ValueError(f"forward_batch_size must be an int >= 1, got {forward_batch_size!r}")
        check_plain_output_head(model)  # log-probs are log_softmax(head(hidden)), computed in row chunks
        self.model = model
        self.model.eval()
        self.tokenizer = tokenizer
        self.base_model = base_model
        self.root = Path(root) if root is not None else None
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.forward_batch_size = forward_batch_size
        self.device = next(model.parameters()).device
        self.eos = stop_token_ids(tokenizer, getattr(model, "generation_config", None), eos_token_ids)
        self.pad = padding_token_id(tokenizer, self.eos)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.lock = threading.RLock()
        self.peft = None
        self.store: OrderedDict[str, dict] = OrderedDict()  # recently saved or loaded payloads by path
        self.live: weakref.WeakSet = weakref.WeakSet()  # sampling clients on snapshots
        self.snapshot_adapters: dict[str, str | None] = {}  # adapter name -> path of the snapshot loaded in it
        self.runs = 0
        self.sequences = 0
        self.layer_names = _linear_layer_names(model)

    # ------------------------------------------------------------------------------------- adapters
    def causal_lm(self) -> nn.Module:
        return self.peft.get_base_model() if self.peft is not None else self.model

    def lora_config(self, rank: int, train_mlp: bool, train_attn: bool, train_unembed: bool) -> dict:
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        targets = sorted((self.layer_names["mlp"] if train_mlp else set())
                         | (self.layer_names["attn"] if train_attn else set())
                         | (self.layer_names["unembed"] if train_unembed else set()))
        if not targets:
            raise ValueError("at least one of train_mlp, train_attn, train_unembed must select a layer of the model")
        return {"rank": rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout, "targets": targets}

    def add_adapter(self, name: str, lora: dict, seed: int) -> None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                            target_modules=list(lora["targets"]), bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if self.peft is None:
                self.peft = get_peft_model(self.model, config, adapter_name=name)
            else:
                self.peft.add_adapter(name, config)
        self.peft.eval()

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's parameters keyed by their name with the adapter name removed (sorted)."""
        tag = f".{name}."
        params = {n.replace(tag, "."): p for n, p in self.peft.named_parameters() if tag in n}
        return dict(sorted(params.items()))

    def copy_into(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        params = self.adapter_params(name)
        check_state_tensors(f"saved LoRA weights for adapter {name!r}", params, tensors)
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key])

    def snapshot_adapter(self, path: str, payload: dict) -> str:
        """The adapter holding the snapshot `payload` saved at `path` (copied into a per-config adapter)."""
        lora = payload["lora"]
        name = f"snapshot_r{lora['rank']}_" + "_".join(t.replace(".", "_") for t in lora["targets"])
        if name not in self.snapshot_adapters:
            self.add_adapter(name, lora, seed=0)
            self.snapshot_adapters[name] = None
        if self.snapshot_adapters[name] != path:
            self.copy_into(name, payload["tensors"])
            self.snapshot_adapters[name] = path
        return name

    @contextmanager
    def using(self, adapter: str | None, *, train: bool):
        """The causal LM computing with `adapter` active (None: the base model, adapters disabled)."""
        module = self.peft if self.peft is not None else self.model
        was_training = module.training
        module.train(train)
        try:
            if adapter is None:
                with (self.peft.disable_adapter() if self.peft is not None else nullcontext()):
                    yield self.causal_lm()
            else:
                self.peft.set_adapter(adapter)
                yield self.causal_lm()
        finally:
            module.train(was_training)

    # ------------------------------------------------------------------------------------ checkpoints
    def new_run_id(self) -> str:
        taken = set()
        if self.root is not None and self.root.is_dir():
            taken = {p.name for p in self.root.iterdir()}
        while True:
            run_id = f"run-{self.runs:04d}"
            self.runs += 1
            if run_id not in taken:
                return run_id

    def save(self, run_id: str, kind: str, name: str, payload: dict, overwrite: bool) -> str:
        """Keep `payload` under tinker://<run id>/<kind>/<name>. Training states (kind "weights") are also
        written under root, together with the snapshots that live sampling clients use (a sync teacher's
        path is part of a run's checkpoint); sampler snapshots otherwise stay in memory only."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"checkpoint name must be a non-empty string without '/', got {name!r}")
        path = f"tinker://{run_id}/{kind}/{name}"
        existing = self._folder(path)
        if not overwrite and (path in self.store or existing is not None and (existing / "meta.json").is_file()):
            raise ValueError(f"checkpoint {path} exists; pass overwrite=True or pick another name")
        self._remember(path, payload)
        if kind == "weights" and self.root is not None:
            self._write(path, payload)
            for client in list(self.live):
                folder = self._folder(client.model_path)
                if not (folder / "meta.json").is_file():
                    self._write(client.model_path, client.payload)
        return path

    def _remember(self, path: str, payload: dict) -> None:
        self.store[path] = payload
        self.store.move_to_end(path)
        while len(self.store) > _KEPT_IN_MEMORY:
            self.store.popitem(last=False)

    def _folder(self, path: str) -> Path | None:
        parts = path[len("tinker://"):].split("/") if isinstance(path, str) and path.startswith("tinker://") else []
        if len(parts) != 3 or parts[1] not in _PATH_KINDS:
            raise ValueError(f"{path!r} is not a checkpoint path of the form tinker://<run id>/<kind>/<name> with "
                             f"<kind> one of {', '.join(_PATH_KINDS)}")
        return self.root / parts[0] / parts[1] / parts[2] if self.root is not None else None

    def _write(self, path: str, payload: dict) -> None:
        from safetensors.torch import save_file

        folder = self._folder(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in payload["tensors"].items()}, str(folder / "adapter.safetensors"))
        if payload.get("optimizer") is not None:
            torch.save(payload["optimizer"], folder / "optimizer.pt")
        meta = {key: value for key, value in payload.items() if key not in ("tensors", "optimizer")}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")  # written last

    def load(self, path: str) -> dict:
        if path in self.store:
            self.store.move_to_end(path)
            return self.store[path]
        folder = self._folder(path)
        if folder is None or not (folder / "meta.json").is_file():
            where = f"in {self.root}" if self.root is not None else "in memory (no root folder was given)"
            raise ValueError(f"unknown checkpoint {path}: nothing was saved under that path {where}")
        from safetensors.torch import load_file

        payload = json.loads((folder / "meta.json").read_text())
        payload["tensors"] = load_file(str(folder / "adapter.safetensors"), device="cpu")
        optimizer = folder / "optimizer.pt"
        payload["optimizer"] = torch.load(optimizer, map_location="cpu", weights_only=True) if optimizer.is_file() else None
        self._remember(path, payload)
        return payload

    def save_external(self, run_id: str, name: str, payload: dict) -> str:
        """The adapter of `payload` as a PEFT folder (adapter_config.json + adapter_model.safetensors) under
        root/<run id>/external_weights/<name>; returns its tinker:// path."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        if self.root is None:
            raise ValueError("save_weights_external writes files: create the OfflineServiceClient with a root folder")
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"checkpoint name must be a non-empty string without '/', got {name!r}")
        path = f"tinker://{run_id}/external_weights/{name}"
        folder = self._folder(path)
        if folder.exists():
            raise ValueError(f"checkpoint {path} exists; pick another name")
        folder.mkdir(parents=True)
        lora = payload["lora"]
        LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                   target_modules=list(lora["targets"]), bias="none", task_type="CAUSAL_LM",
                   base_model_name_or_path=self.base_model).save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in payload["tensors"].items()}, str(folder / _ADAPTER_WEIGHTS))
        return path

    def external_files(self, path: str) -> dict[str, Path]:
        folder = self._folder(path)
        if folder is None or folder.parent.name != "external_weights" or not folder.is_dir():
            raise ValueError(f"unknown external weights checkpoint {path}: nothing was saved under that path")
        return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def delete(self, path: str) -> None:
        import shutil

        self.store.pop(path, None)
        folder = self._folder(path)
        if folder is None or not folder.exists():
            raise ValueError(f"unknown checkpoint {path}: nothing to delete")
        shutil.rmtree(folder)

    def check_base_model(self, base_model: str | None) -> None:
        if base_model is not None and base_model != self.base_model:
            raise ValueError(f"base model {base_model!r} is not served by this offline service; available: "
                             f"{self.base_model!r}")

    # ------------------------------------------------------------------------------------- compute
    def compute_dtype(self) -> torch.dtype:
        return torch.float64 if next(self.model.parameters()).dtype == torch.float64 else torch.float32

    def hidden(self, causal_lm: nn.Module, tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """Final-norm hidden states [B, L_max, H] of right-padded token lists (position p sees tokens <= p)."""
        return hidden_states(causal_lm, tokens, self.pad)

    def head_logprobs(self, causal_lm: nn.Module, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                      *, chunk_rows: int = 256) -> torch.Tensor:
        """log_softmax(head(hidden)) [N, V] (targets None), or gathered at targets [N, K'] -> [N, K'],
        `chunk_rows` rows at a time; with grad enabled each chunk is recomputed in the backward pass, so
        no [N, V] tensor is kept (the output layer may carry a LoRA adapter)."""
        head, dtype = causal_lm.get_output_embeddings(), self.compute_dtype()

        def chunk(h, t):
            logp = torch.log_softmax(head(h).to(dtype), dim=-1)
            return logp if t is None else logp.gather(-1, t)

        out = []
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            t = None if targets is None else targets[start:start + chunk_rows]
            if torch.is_grad_enabled() and t is not None:
                out.append(torch.utils.checkpoint.checkpoint(chunk, h, t, use_reentrant=False))
            else:
                out.append(chunk(h, t))
        return torch.cat(out) if out else hidden.new_zeros((0, 0), dtype=dtype)

    def datum_logprobs(self, adapter: str, data: Sequence[types.Datum], *, train: bool,
                       loss_of: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """log p(target_tokens) of every datum, shaped like its target_tokens ([L] or [L, K]).

        With `loss_of(i, logprobs_i) -> scalar`, the summed loss is back-propagated into the adapter, one
        group of `forward_batch_size` datums at a time (gradients accumulate)."""
        inputs = [_datum_tokens(datum, i) for i, datum in enumerate(data)]
        out: list[torch.Tensor] = []
        with self.using(adapter, train=train) as causal_lm:
            vocab = causal_lm.get_output_embeddings().weight.shape[0]
            for start in range(0, len(data), self.forward_batch_size):
                group = list(range(start, min(len(data), start + self.forward_batch_size)))
                targets = [_datum_targets(data[i], i, len(inputs[i]), vocab) for i in group]
                context = torch.enable_grad() if loss_of is not None else torch.no_grad()
                with context:
                    hidden = self.hidden(causal_lm, [inputs[i] for i in group])
                    total = None
                    for row, (i, target) in enumerate(zip(group, targets)):
                        length = target.shape[0]
                        flat = target.reshape(length, -1).to(self.device)
                        lp = self.head_logprobs(causal_lm, hidden[row, :length], flat).reshape(target.shape)
                        if loss_of is not None:
                            loss = loss_of(i, lp)
                            total = loss if total is None else total + loss
                        out.append(lp.detach())
                    if total is not None and total.requires_grad:
                        total.backward()
        return out


class OfflineSamplingClient:
    """`tinker.SamplingClient` on the offline engine: the base model (model_path None) or a snapshot."""

    def __init__(self, engine: _Engine, model_path: str | None, payload: dict | None = None):
        self._engine = engine
        self.model_path = model_path
        self.payload = payload
        if model_path is not None:
            engine.live.add(self)

    def _adapter(self) -> str | None:
        return None if self.model_path is None else self._engine.snapshot_adapter(self.model_path, self.payload)

    def get_base_model(self) -> str:
        return self._engine.base_model

    def get_tokenizer(self):
        return self._engine.tokenizer

    def sample(self, prompt: types.ModelInput, num_samples: int, sampling_params: types.SamplingParams,
               include_prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0, topk_sample_logprobs: int = 0,
               target_prompt_logprobs: types.TensorData | None = None, prompt_alt_tokens_k: int = 0,
               prompt_logprobs_last_n: int | None = None):
        """A future of `types.SampleResponse`; see the module docstring for what is supported."""
        def run():
            if topk_sample_logprobs or target_prompt_logprobs is not None or prompt_alt_tokens_k:
                raise ValueError("the offline service does not implement topk_sample_logprobs, "
                                 "target_prompt_logprobs or prompt_alt_tokens_k")
            with self._engine.lock:
                return self._sample(prompt, num_samples, sampling_params, include_prompt_logprobs,
                                    topk_prompt_logprobs, prompt_logprobs_last_n)
        return _future(run)

    def compute_logprobs(self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None):
        """A future of [None, log p(token 1 | token 0), ...] for the prompt's tokens."""
        def run():
            with self._engine.lock:
                tokens = _prompt_tokens(prompt)
                _check_last_n(prompt_logprobs_last_n, len(tokens))
                lp = self._prompt_scores(tokens, 0, prompt_logprobs_last_n)[0]
                return [None if np.isnan(x) else float(x) for x in lp]
        return _future(run)

    def _prompt_scores(self, tokens, topk, last_n):
        """(prompt log-probs [L] float64, NaN where not scored; TopkLogprobs [L, topk] or None; the log-probs
        [V] of the token after the prompt). Positions first .. L - 1 are scored (first = 1, or L - last_n);
        only the rows first - 1 .. L - 1 of the output layer are computed."""
        engine = self._engine
        length = len(tokens)
        first = 1 if last_n is None else length - last_n
        with torch.no_grad(), engine.using(self._adapter(), train=False) as causal_lm:
            hidden = engine.hidden(causal_lm, [tokens])[0]
            rows = engine.head_logprobs(causal_lm, hidden[first - 1:])  # row r predicts token first + r
        scored = rows[:-1]
        prompt_lp = np.full(length, np.nan, dtype=np.float64)
        if length > first:
            next_ids = torch.tensor(tokens[first:], device=rows.device)[:, None]
            prompt_lp[first:] = scored.gather(-1, next_ids)[:, 0].double().cpu().numpy()
        top = None
        if topk:
            width = min(int(topk), rows.shape[-1])
            ids = np.zeros((length, int(topk)), dtype=np.int32)
            lps = np.full((length, int(topk)), MASK_LOGPROB, dtype=np.float32)
            if length > first:
                values, indices = scored.topk(width, dim=-1)
                ids[first:, :width] = indices.cpu().numpy()
                lps[first:, :width] = values.float().cpu().numpy()
            top = TopkLogprobs(token_ids=ids, logprobs=lps)
        return prompt_lp, top, rows[-1]

    def _sample(self, prompt, num_samples, params, include_prompt_logprobs, topk, last_n):
        engine = self._engine
        tokens = _prompt_tokens(prompt)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not isinstance(params, types.SamplingParams):
            raise ValueError(f"sampling_params must be a tinker.types.SamplingParams, got {type(params).__name__}")
        if params.max_tokens is None or params.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {params.max_tokens!r}")
        if params.top_k not in (-1, 0, 1):
            raise ValueError(f"the offline service supports top_k -1 or 0 (off) or 1 (greedy), got {params.top_k}")
        if not isinstance(topk, int) or topk < 0:
            raise ValueError(f"topk_prompt_logprobs must be an int >= 0, got {topk!r}")
        if (topk or last_n is not None) and not include_prompt_logprobs:
            raise ValueError("topk_prompt_logprobs and prompt_logprobs_last_n need include_prompt_logprobs=True")
        _check_last_n(last_n, len(tokens))
        greedy = params.top_k == 1 or params.temperature == 0
        stop = _stop_ids(params.stop, engine.eos)
        seeds = None if greedy else _sample_seeds(params.seed, num_samples, engine.generator)
        prompt_lp = top = None
        last_row = None
        if include_prompt_logprobs:
            prompt_lp, top, last_row = self._prompt_scores(tokens, topk, last_n)
        if last_row is not None and params.max_tokens == 1:  # one token from the prompt pass already made
            drawn = _one_token(last_row, greedy, params, seeds, stop, num_samples)
        else:
            with torch.no_grad(), engine.using(self._adapter(), train=False) as causal_lm:
                drawn = decode_batch(
                    causal_lm, [tokens] * num_samples, max_new_tokens=params.max_tokens,
                    temperature=params.temperature or 1.0, top_p=params.top_p, greedy=greedy,
                    pad_token_id=engine.pad, eos_token_ids=stop, seeds=seeds)
        sequences = []
        for ids, lps, finished in drawn:
            engine.sequences += 1
            sequences.append(types.SampledSequence(
                stop_reason="stop" if finished else "length", sequence_id=f"offline-{engine.sequences}",
                tokens_np=np.asarray(ids, dtype=np.int32), logprobs_np=np.asarray(lps, dtype=np.float32)))
        return types.SampleResponse(
            sequences=sequences,
            prompt_logprobs_np=None if prompt_lp is None else prompt_lp.astype(np.float32),
            topk_prompt_logprobs_np=top)


class OfflineTrainingClient:
    """`tinker.TrainingClient` on the offline engine: one LoRA adapter and its AdamW state."""

    def __init__(self, engine: _Engine, run_id: str, lora: dict):
        self._engine = engine
        self.model_id = run_id
        self._lora = lora
        self._adapter = run_id.replace("-", "_")
        self._optimizer: torch.optim.AdamW | None = None

    # -------------------------------------------------------------------------------- info
    def get_info(self) -> types.GetInfoResponse:
        return types.GetInfoResponse(model_data=types.ModelData(model_name=self._engine.base_model),
                                     model_id=self.model_id, is_lora=True, lora_rank=self._lora["rank"])

    def get_tokenizer(self):
        return self._engine.tokenizer

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """Copies of the adapter's current weights, keyed by parameter name without the adapter name."""
        with self._engine.lock:
            return {k: p.detach().clone() for k, p in self._engine.adapter_params(self._adapter).items()}

    # ---------------------------------------------------------------------------- training
    def forward(self, data: list[types.Datum], loss_fn: str, loss_fn_config: dict | None = None):
        return _future(lambda: self._forward_backward(data, loss_fn, loss_fn_config, backward=False))

    def forward_backward(self, data: list[types.Datum], loss_fn: str, loss_fn_config: dict | None = None):
        return _future(lambda: self._forward_backward(data, loss_fn, loss_fn_config, backward=True))

    def forward_backward_custom(self, data: list[types.Datum], loss_fn, *, loss_type_input=None):
        """fn(data, logprobs) -> (loss, metrics) on the log-probs of every datum's target_tokens (leaf tensors);
        the parameters receive d loss / d theta through those log-probs, as on Tinker."""
        def run():
            with self._engine.lock:
                if not data:
                    raise ValueError("No data provided")
                logprobs = self._engine.datum_logprobs(self._adapter, data, train=True)
                leaves = [lp.clone().requires_grad_(True) for lp in logprobs]
                loss, metrics = loss_fn(data, leaves)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise ValueError(f"a custom loss must return a scalar tensor, got {loss!r}")
                loss.backward()
                grads = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.detach() for leaf in leaves]
                self._engine.datum_logprobs(self._adapter, data, train=True,
                                            loss_of=lambda i, lp: (grads[i].to(lp.dtype) * lp).sum())
                return types.ForwardBackwardOutput(
                    loss_fn_output_type="custom",
                    loss_fn_outputs=[{"logprobs": _tensor_data(lp)} for lp in logprobs],
                    metrics={**{k: float(v) for k, v in dict(metrics or {}).items()},
                             "loss:sum": float(loss.detach())})
        return _future(run)

    def _forward_backward(self, data, loss_fn, loss_fn_config, *, backward: bool):
        if loss_fn not in _LOSS_FNS:
            raise ValueError(f"loss_fn {loss_fn!r} is not implemented by the offline service; allowed: "
                             f"{', '.join(_LOSS_FNS)} (or forward_backward_custom)")
        if loss_fn_config:
            raise ValueError(f"the offline service takes no loss_fn_config, got {loss_fn_config!r}")
        if not data:
            raise ValueError("No data provided")
        engine = self._engine
        with engine.lock:
            inputs = [_loss_inputs(datum, i, loss_fn) for i, datum in enumerate(data)]
            total = [0.0]

            def loss_of(i, lp):
                extra = {k: v.to(device=lp.device, dtype=lp.dtype) for k, v in inputs[i].items()}
                if loss_fn == "cross_entropy":
                    if extra["weights"].shape != lp.shape:
                        raise ValueError(f"data[{i}]: weights has shape {tuple(extra['weights'].shape)}, "
                                         f"target_tokens {tuple(lp.shape)}; they must match")
                    loss = -(extra["weights"] * lp).sum()
                else:
                    for key in ("logprobs", "advantages"):
                        if extra[key].shape != lp.shape:
                            raise ValueError(f"data[{i}]: {key} has shape {tuple(extra[key].shape)}, "
                                             f"target_tokens {tuple(lp.shape)}; they must match")
                    loss = -(torch.exp(lp - extra["logprobs"]) * extra["advantages"]).sum()
                total[0] += float(loss.detach())
                return loss

            if backward:
                logprobs = engine.datum_logprobs(self._adapter, data, train=True, loss_of=loss_of)
            else:
                logprobs = engine.datum_logprobs(self._adapter, data, train=False)
                for i, lp in enumerate(logprobs):
                    loss_of(i, lp)
        return types.ForwardBackwardOutput(loss_fn_output_type=loss_fn,
                                           loss_fn_outputs=[{"logprobs": _tensor_data(lp)} for lp in logprobs],
                                           metrics={"loss:sum": total[0]})

    def optim_step(self, optim_params: types.AdamParams | None = None, *, adam_params: types.AdamParams | None = None):
        """torch AdamW over the adapter with the given hyper-parameters; grads are then cleared."""
        def run():
            params = optim_params if optim_params is not None else adam_params
            if not isinstance(params, types.AdamParams):
                raise ValueError(f"the offline service implements Adam only: pass tinker.types.AdamParams, got "
                                 f"{type(params).__name__}")
            with self._engine.lock:
                weights = list(self._engine.adapter_params(self._adapter).values())
                optimizer = self._ensure_optimizer(weights)
                for group in optimizer.param_groups:
                    group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                                 weight_decay=params.weight_decay)
                max_norm = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
                with_grad = [p for p in weights if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm)) if with_grad else 0.0
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return types.OptimStepResponse(metrics={"grad_norm": grad_norm})
        return _future(run)

    def _ensure_optimizer(self, weights) -> torch.optim.AdamW:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(weights, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
        return self._optimizer

    # ---------------------------------------------------------------------------- weights
    def _payload(self, with_optimizer: bool) -> dict:
        tensors = {k: p.detach().to("cpu", copy=True) for k, p in self._engine.adapter_params(self._adapter).items()}
        optimizer = None
        if with_optimizer and self._optimizer is not None:
            optimizer = _cpu_copy(self._optimizer.state_dict())
        return {"base_model": self._engine.base_model, "lora": dict(self._lora), "tensors": tensors,
                "optimizer": optimizer}

    def save_state(self, name: str, ttl_seconds: int | None = None, overwrite: bool = False,
                   user_metadata: dict | None = None):
        """Adapter weights and AdamW state under tinker://<run id>/weights/<name>."""
        def run():
            with self._engine.lock:
                path = self._engine.save(self.model_id, "weights", name, self._payload(True), overwrite)
            return types.SaveWeightsResponse(path=path)
        return _future(run)

    def save_weights_for_sampler(self, name: str, ttl_seconds: int | None = None, user_metadata: dict | None = None):
        """A snapshot of the adapter weights under tinker://<run id>/sampler_weights/<name>."""
        def run():
            with self._engine.lock:
                path = self._engine.save(self.model_id, "sampler_weights", name, self._payload(False), False)
            return types.SaveWeightsForSamplerResponse(path=path)
        return _future(run)

    def save_weights_external(self, name: str, ttl_seconds: int | None = None,
                              age_encryption_recipients: list[str] | None = None):
        """The adapter as a PEFT folder under tinker://<run id>/external_weights/<name> (needs the service's
        root folder); its files are listed by the rest client's get_external_weights_urls."""
        if age_encryption_recipients:
            raise ValueError("the offline service does not encrypt exported weights")

        def run():
            with self._engine.lock:
                path = self._engine.save_external(self.model_id, name, self._payload(False))
            return types.SaveWeightsExternalResponse(path=path)
        return _future(run)

    def create_sampling_client(self, model_path: str, retry_config=None, record_stability_info: bool = False):
        def run():
            with self._engine.lock:
                return OfflineSamplingClient(self._engine, model_path, self._engine.load(model_path))
        return _future(run)

    def save_weights_and_get_sampling_client(self, name: str | None = None, retry_config=None,
                                             record_stability_info: bool = False, kind: str = "snapshot"):
        def run():
            with self._engine.lock:
                self._engine.sequences += 1
                payload = self._payload(False)
                path = self._engine.save(self.model_id, "sampler_weights", f"ephemeral-{self._engine.sequences}",
                                         payload, False)
                return OfflineSamplingClient(self._engine, path, payload)
        return _future(run)

    def load_state(self, path: str, weights_access_token: str | None = None):
        return _future(lambda: self._load(path, with_optimizer=False))

    def load_state_with_optimizer(self, path: str, weights_access_token: str | None = None):
        return _future(lambda: self._load(path, with_optimizer=True))

    def _load(self, path: str, *, with_optimizer: bool) -> types.LoadWeightsResponse:
        engine = self._engine
        with engine.lock:
            payload = engine.load(path)
            engine.check_base_model(payload["base_model"])
            if payload["lora"]["rank"] != self._lora["rank"] or payload["lora"]["targets"] != self._lora["targets"]:
                raise ValueError(f"checkpoint {path} has LoRA rank {payload['lora']['rank']} on "
                                 f"{payload['lora']['targets']}; this training client has rank {self._lora['rank']} "
                                 f"on {self._lora['targets']}")
            engine.copy_into(self._adapter, payload["tensors"])
            self._optimizer = None
            if with_optimizer:
                if payload.get("optimizer") is None:
                    raise ValueError(f"checkpoint {path} holds no optimizer state (saved by save_weights_for_sampler?)")
                optimizer = self._ensure_optimizer(list(engine.adapter_params(self._adapter).values()))
                optimizer.load_state_dict(copy.deepcopy(payload["optimizer"]))
        return types.LoadWeightsResponse(path=path, model_id=self.model_id)


class _OfflineRestClient:
    def __init__(self, engine: _Engine):
        self._engine = engine

    def get_server_capabilities(self):
        engine = self._engine
        context = getattr(getattr(engine.model, "config", None), "max_position_embeddings", None)
        return _future(lambda: types.GetServerCapabilitiesResponse(supported_models=[types.SupportedModel(
            model_name=engine.base_model, max_context_length=context, trainable=True, sampleable=True)]))

    def get_external_weights_urls(self, tinker_path: str):
        """file:// URLs of the files of an external weights checkpoint, keyed by their path in it."""
        import datetime

        def run():
            with self._engine.lock:
                files = self._engine.external_files(tinker_path)
            expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
            return types.ExternalWeightsUrlsResponse(urls={k: p.resolve().as_uri() for k, p in files.items()},
                                                     expires=expires)
        return _future(run)

    def delete_checkpoint_from_tinker_path(self, tinker_path: str):
        def run():
            with self._engine.lock:
                self._engine.delete(tinker_path)
        return _future(run)


class OfflineServiceClient:
    """`tinker.ServiceClient` serving the local `model` (a Hugging Face causal LM, owned from now on:
    LoRA adapters are injected into it) under the name `base_model`. See the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, *, base_model: str, root: str | Path | None = None,
                 lora_alpha: float = 32.0, lora_dropout: float = 0.0, seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None, forward_batch_size: int = 4):
        self._engine = _Engine(model, tokenizer, base_model=base_model, root=root, lora_alpha=lora_alpha,
                               lora_dropout=lora_dropout, seed=seed, eos_token_ids=eos_token_ids,
                               forward_batch_size=forward_batch_size)

    @property
    def base_model(self) -> str:
        return self._engine.base_model

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release (the SDK's close ends a session)."""

    def create_rest_client(self) -> _OfflineRestClient:
        return _OfflineRestClient(self._engine)

    def get_server_capabilities(self) -> types.GetServerCapabilitiesResponse:
        return self.create_rest_client().get_server_capabilities().result()

    def create_lora_training_client(self, base_model: str, rank: int = 32, seed: int | None = None,
                                    train_mlp: bool = True, train_attn: bool = True, train_unembed: bool = True,
                                    user_metadata: dict | None = None, optimizer=None):
        """A future of a training client with a fresh LoRA adapter (B = 0, A from peft's init under `seed`)."""
        def run():
            engine = self._engine
            with engine.lock:
                engine.check_base_model(base_model)
                lora = engine.lora_config(rank, train_mlp, train_attn, train_unembed)
                run_id = engine.new_run_id()
                client = OfflineTrainingClient(engine, run_id, lora)
                engine.add_adapter(client._adapter, lora, seed if seed is not None else int(
                    torch.randint(0, 2**31 - 1, (1,), generator=engine.generator)))
                return client
        return _future(run)

    def create_training_client_from_state(self, path: str, base_model: str | None = None,
                                          user_metadata: dict | None = None, weights_access_token: str | None = None,
                                          optimizer=None):
        return self._from_state(path, base_model, with_optimizer=False)

    def create_training_client_from_state_with_optimizer(self, path: str, base_model: str | None = None,
                                                         user_metadata: dict | None = None,
                                                         weights_access_token: str | None = None):
        return self._from_state(path, base_model, with_optimizer=True)

    def _from_state(self, path, base_model, *, with_optimizer):
        def run():
            engine = self._engine
            with engine.lock:
                payload = engine.load(path)
                engine.check_base_model(base_model)
                engine.check_base_model(payload["base_model"])
                run_id = engine.new_run_id()
                client = OfflineTrainingClient(engine, run_id, dict(payload["lora"]))
                engine.add_adapter(client._adapter, client._lora, seed=0)
                client._load(path, with_optimizer=with_optimizer)
                return client
        return _future(run)

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None,
                               retry_config=None, record_stability_info: bool = False):
        """A future of a sampling client on saved weights (`model_path`) or on the base model."""
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")

        def run():
            with self._engine.lock:
                if model_path is None:
                    self._engine.check_base_model(base_model)
                    return OfflineSamplingClient(self._engine, None)
                return OfflineSamplingClient(self._engine, model_path, self._engine.load(model_path))
        return _future(run)


# ------------------------------------------------------------------------------------------- helpers
def _linear_layer_names(model: nn.Module) -> dict[str, set[str]]:
    """Leaf names of the linear layers a LoRA adapter may target: attention, MLP and the output layer."""
    head = model.get_output_embeddings()
    names = {"attn": set(), "mlp": set(), "unembed": set()}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf, parts = name.rsplit(".", 1)[-1], name.lower().split(".")
        if module is head:
            names["unembed"].add(leaf)
        elif any("mlp" in part or "feed_forward" in part for part in parts):
            names["mlp"].add(leaf)
        elif any("attn" in part or "attention" in part for part in parts):
            names["attn"].add(leaf)
    return names


def _prompt_tokens(prompt) -> list[int]:
    if not isinstance(prompt, types.ModelInput):
        raise ValueError(f"prompt must be a tinker.types.ModelInput, got {type(prompt).__name__}")
    tokens = prompt.to_ints()
    if not tokens:
        raise ValueError("prompt must hold at least one token")
    return tokens


def _check_last_n(last_n, length: int) -> None:
    if last_n is not None and (not isinstance(last_n, int) or not 1 <= last_n <= length - 1):
        raise ValueError(f"prompt_logprobs_last_n must be between 1 and len(prompt) - 1 = {length - 1}, got {last_n!r}")


def _stop_ids(stop, eos: list[int]) -> list[int]:
    if stop is None:
        return list(eos)
    if isinstance(stop, str) or any(not isinstance(s, int) for s in stop):
        raise ValueError(f"the offline service takes stop as a list of token ids, got {stop!r}")
    return [int(s) for s in stop]


def _sample_seeds(seed: int | None, num_samples: int, generator: torch.Generator) -> list[int]:
    """The stream seed of each of the num_samples samples of one request: `seed` for the first (as a local
    sample with that seed), then seeds drawn from a generator seeded with it; without a seed, all drawn
    from the service's generator."""
    if seed is None:
        return draw_seeds(generator, num_samples)
    return [int(seed)] + draw_seeds(torch.Generator().manual_seed(int(seed)), num_samples - 1)


def _one_token(last_row: torch.Tensor, greedy: bool, params, seeds, stop,
               num_samples: int) -> list[tuple[list[int], list[float], bool]]:
    """One token per sample drawn from the last prompt position's log-probs [V] (as decode_batch would)."""
    logits = last_row.float()[None].expand(num_samples, -1)  # log-probs differ from logits by a constant per row
    if greedy:
        drawn, drawn_lp = greedy_tokens(logits)
    else:
        drawn, drawn_lp = draw_tokens(logits, counter_uniforms(seeds, 1)[:, 0], params.temperature, params.top_p)
    return [([int(token)], [float(lp)], int(token) in stop) for token, lp in zip(drawn, drawn_lp)]


def _datum_tokens(datum, i: int) -> list[int]:
    if not isinstance(datum, types.Datum):
        raise ValueError(f"data[{i}] must be a tinker.types.Datum, got {type(datum).__name__}")
    tokens = datum.model_input.to_ints()
    if not tokens:
        raise ValueError(f"data[{i}].model_input is empty")
    return tokens


def _datum_targets(datum, i: int, length: int, vocab: int) -> torch.Tensor:
    if "target_tokens" not in datum.loss_fn_inputs:
        raise ValueError(f"data[{i}].loss_fn_inputs has no target_tokens")
    targets = datum.loss_fn_inputs["target_tokens"].to_torch().long()
    if targets.dim() not in (1, 2) or targets.shape[0] != length:
        raise ValueError(f"data[{i}].loss_fn_inputs['target_tokens'] has shape {tuple(targets.shape)}; expected "
                         f"[{length}] or [{length}, K] (one row per model_input position)")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"data[{i}].loss_fn_inputs['target_tokens'] holds ids outside [0, {vocab})")
    return targets


def _loss_inputs(datum, i: int, loss_fn: str) -> dict[str, torch.Tensor]:
    inputs = datum.loss_fn_inputs
    if loss_fn == "cross_entropy":
        if "weights" in inputs:
            return {"weights": inputs["weights"].to_torch().double()}
        return {"weights": torch.ones(inputs["target_tokens"].to_torch().shape, dtype=torch.float64)}
    missing = [key for key in ("logprobs", "advantages") if key not in inputs]
    if missing:
        raise ValueError(f"data[{i}]: loss_fn 'importance_sampling' needs loss_fn_inputs {missing}")
    return {"logprobs": inputs["logprobs"].to_torch().double(), "advantages": inputs["advantages"].to_torch().double()}


def _tensor_data(tensor: torch.Tensor) -> types.TensorData:
    return types.TensorData.from_torch(tensor.detach().to("cpu", torch.float32))


def _cpu_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_cpu_copy(v) for v in value)
    return value
