"""TRL's `trl.experimental.sdft.SDFTTrainer` as a column of the CPU step benchmark (optional: sdft[bench]).

The trainer runs `train()` for all of the column's steps in a background thread; a TrainerCallback holds each
step at its beginning until `step()` releases it, and times it (sampling ends when the trainer's
on_self_distillation_batch_prepared event fires). Its teacher forward runs inside its loss, so it is counted
in the student forward+backward (with its gradient clip).
"""
from __future__ import annotations

import queue
import tempfile
import threading
import time

from sdft.bench.settings import StepSettings, objective
from sdft.bench.step_columns import Column


def trl_teacher_template(template: str) -> str:
    """A teacher template of sdft.prompts in TRL's `teacher_prompt_template` form ({prompt}, {privileged_context})."""
    from sdft.prompts import render_teacher_content

    return render_teacher_content("{prompt}", "{privileged_context}", template)


def trl_config(config, settings: StepSettings, steps: int, output_dir: str):
    """trl.experimental.sdft.SDFTConfig at the settings of `config`: one completion per prompt, all prompts
    in one forward, fp32 without gradient checkpointing (TRL's defaults are bf16 with checkpointing),
    forward KL (distillation_alpha 0) on the full logits or the top-K, teacher "base" (the LoRA adapter
    disabled, as sdft's static teacher) or "ema"."""
    from trl.experimental.sdft import SDFTConfig

    optim, loss, generation = config.optim, objective(config), config.generation
    return SDFTConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=settings.prompts, gradient_accumulation_steps=1, num_generations=1,
        max_steps=steps, max_completion_length=generation.max_new_tokens,
        max_prompt_length=config.data.max_prompt_tokens, temperature=generation.temperature, top_p=generation.top_p,
        top_k=0, learning_rate=optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=optim.weight_decay, adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_epsilon=optim.eps,
        optim="adamw_torch", max_grad_norm=optim.max_grad_norm or 0.0,
        teacher_model_kind="base" if config.teacher.mode == "static" else "ema",
        teacher_update_rate=config.teacher.ema_alpha, teacher_sync_steps=1,
        distillation_mode="full_logits" if loss.targets == "full" else "topk_logits",
        distillation_topk=loss.topk.k, distillation_alpha=0.0, distillation_is_clip=loss.is_clip,
        num_loss_tokens_to_skip=loss.skip_first_n_tokens,
        teacher_prompt_template=trl_teacher_template(config.teacher.template),
        shuffle_dataset=False, seed=config.seed, logging_strategy="no", save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0,
    )


class TrlColumn(Column):
    """SDFTTrainer.train() in a background thread, one step per `step()` call (CPU only)."""

    def __init__(self, settings: StepSettings, *, steps: int, device: str = "cpu", threads: int | None = None):
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl.experimental.sdft import SDFTTrainer

        super().__init__(settings, steps=steps, device=device, threads=threads)
        column, pad = self, self.tokenizer.pad_token_id
        self._threads = threads
        self._go, self._out = queue.Queue(), queue.Queue()

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.current = {}

            def on_step_begin(self, args, state, control, **kwargs):
                column._go.get()
                self.current = {"begin": time.perf_counter()}

            def on_self_distillation_batch_prepared(self, args, state, control, prompt_ids=None,
                                                    completion_ids=None, teacher_attention_mask=None, **kwargs):
                completion = int((completion_ids != pad).sum())
                self.current.update(sampled=time.perf_counter(), completion_tokens=completion,
                                    processed_tokens=int((prompt_ids != pad).sum()) + completion
                                    + int(teacher_attention_mask.sum()))

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                self.current["pre_optimizer"] = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                c, end = self.current, time.perf_counter()
                column._out.put({"sample_s": c["sampled"] - c["begin"], "teacher_s": float("nan"),
                                 "student_s": c["pre_optimizer"] - c["sampled"],
                                 "optimizer_s": end - c["pre_optimizer"], "total_s": end - c["begin"],
                                 "completion_tokens": c["completion_tokens"],
                                 "processed_tokens": c["processed_tokens"]})

        student = self.config.student
        dataset = Dataset.from_list([{"prompt": [dict(m) for m in e.messages], "privileged_context": e.demonstration}
                                     for e in self.examples])
        self._output_dir = tempfile.TemporaryDirectory(prefix="bench_step_trl_")
        peft_config = LoraConfig(r=student.lora_rank, lora_alpha=student.lora_alpha, lora_dropout=student.lora_dropout,
                                 target_modules=list(student.lora_target_modules), bias="none", task_type="CAUSAL_LM")
        self.trainer = SDFTTrainer(model=self.model, args=trl_config(self.config, settings, steps, self._output_dir.name),
                                   train_dataset=dataset, processing_class=self.tokenizer, peft_config=peft_config)
        self.trainer.add_callback(StepTimer())  # after the trainer's own callbacks: an EMA update is in the step
        self._thread = threading.Thread(target=self._train, name="trl-train", daemon=True)
        self._thread.start()

    def _train(self) -> None:
        import torch

        try:
            if self._threads:
                torch.set_num_threads(self._threads)
            self.trainer.train()
        except BaseException as error:  # noqa: BLE001 - handed to the waiting step()
            self._out.put(error)

    def run_step(self, **extra) -> dict:
        self._go.put(extra)
        result = self._out.get()
        if isinstance(result, BaseException):
            raise RuntimeError(f"TRL SDFTTrainer failed: {type(result).__name__}: {result}") from result
        return result

    def finish(self) -> dict:
        self._thread.join(timeout=600)
        self._output_dir.cleanup()
        return super().finish()
