"""Checks of the vLLM sampler that need a running engine, run as a script (vLLM starts worker processes,
so an engine is created only under `if __name__ == "__main__":`); tests/test_sampling_vllm.py runs it in a
subprocess and asserts on the JSON it writes.

  python tests/vllm_checks.py model FOLDER          a tiny random Llama that vLLM can run, saved to FOLDER
  python tests/vllm_checks.py sync FOLDER OUT.json  LoRA and full fine-tuning students decoded by vLLM and by the
                                                    native sampler after each of 3 optimizer steps
  python tests/vllm_checks.py run KEY=VALUE ...     train_from_config(load_config(None, overrides))
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = [("What is 2 plus 2?", "2 plus 2 is 4."), ("Name the capital of France.", "The capital is Paris."),
             ("What is 3 plus 4?", "3 plus 4 is 7."), ("Say the answer A.", "The answer is A.")]


def save_model(folder: str) -> None:
    """A tiny Llama with head size 64 (vLLM's CPU attention needs a supported head size), its matrices
    scaled up so that its outputs depend on the prompt and greedy choices are far from ties."""
    from tests.tiny import build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), hidden_size=256, num_layers=2, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(4.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _prompts(tokenizer):
    from sdft.prompts import render_prompt_ids

    student = [list(render_prompt_ids(tokenizer, [{"role": "user", "content": q}])) for q, _ in QUESTIONS]
    teacher = [list(render_prompt_ids(tokenizer, [{"role": "user", "content": f"{q}\nAn example: {a}\nNow answer."}]))
               for q, a in QUESTIONS]
    return student, teacher


def _nucleus_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """log softmax(z / T) [T, V] in float64 within the top-p nucleus (smallest most-likely set reaching top_p)."""
    lp = torch.log_softmax(logits.double() / temperature, -1)
    sorted_lp, order = lp.sort(-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()
    drop = torch.zeros_like(lp, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
    return torch.log_softmax(lp.masked_fill(drop, float("-inf")), -1)


def sync_checks(folder: str, out: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdft.backends.local import LocalBackend
    from sdft.config import GenerationConfig, StudentConfig, TeacherConfig
    from sdft.sampling import NativeSampler, SamplingParams
    from tests.builders import objective, optim

    tokenizer = AutoTokenizer.from_pretrained(folder)
    student_prompts, teacher_prompts = _prompts(tokenizer)
    spec = objective("full", skip_first_n_tokens=1)
    temperature, top_p = 0.8, 0.9
    results = {}
    for mode in ("lora", "full"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        backend = LocalBackend(
            model, tokenizer, student=StudentConfig(mode=mode, lora_rank=8, lora_alpha=16.0),
            teacher=TeacherConfig(mode="static"), optim=optim(lr=0.05 if mode == "lora" else 5e-3),
            generation=GenerationConfig(engine="vllm", vllm_cpu_kv_cache_gib=0.25, vllm_max_model_len=256),
            steps=3, model_path=folder)
        native = NativeSampler(backend.module, tokenizer)
        rounds = []
        for step in range(4):
            if step:
                rollouts = backend.sample(student_prompts, SamplingParams(12), seeds=[step * 10 + i for i in range(4)])
                backend.train_step(rollouts, backend.teacher_targets(teacher_prompts, rollouts, spec), spec)
            vllm_greedy = backend.generate_greedy(student_prompts, 12)
            native_greedy = native.greedy(student_prompts, 12)
            sampled = backend.sample(student_prompts, SamplingParams(12, temperature=temperature, top_p=top_p),
                                     seeds=[100 + i for i in range(4)])
            differences = []
            with torch.no_grad():
                for r in sampled:
                    ids = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)])
                    logits = backend.module(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1]
                    expected = _nucleus_logprobs(logits, temperature, top_p).gather(
                        -1, torch.tensor(r.completion_ids)[:, None])[:, 0]
                    differences.append(float((torch.tensor(r.sampler_logprobs, dtype=torch.float64)
                                              - expected).abs().max()))
            rounds.append({"vllm_greedy": vllm_greedy, "native_greedy": native_greedy,
                           "max_logprob_difference": max(differences),
                           "sampled": [list(r.completion_ids) for r in sampled],
                           "finite": all(math.isfinite(x) for r in sampled for x in r.sampler_logprobs)})
        results[mode] = {"rounds": rounds, "weight_loads": backend.sampler.weight_loads}
        backend.sampler.close()
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "model":
        save_model(sys.argv[2])
    elif command == "sync":
        sync_checks(sys.argv[2], sys.argv[3])
    elif command == "run":
        from sdft.config import load_config
        from sdft.runner import train_from_config

        train_from_config(load_config(None, sys.argv[2:]))
    else:
        raise SystemExit(f"unknown command {command!r}; allowed: model, sync, run")
