"""Run by tests/test_distributed.py under `accelerate launch` (2 processes): build a local backend for the
launcher's Parallel and print, as JSON lines from rank 0, how much of the student and teacher each process
holds and the greedy completions of an evaluation shared out over the processes."""
import json
import sys

import torch

from sdft.backends.local import LocalBackend
from sdft.config import OptimConfig, StudentConfig, TeacherConfig
from sdft.parallel import setup_parallel
from tests.tiny import build_tiny_llama, build_tiny_tokenizer


def local_numel(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors)


def local_bytes(tensors) -> int:
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(backend) -> dict:
    """Bytes this process holds for the student's weights, the teacher copy's weights and AdamW's moments."""
    optimizer = [v for state in backend.optimizer.state.values() for v in state.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
    teacher = list(backend.teacher.module.parameters()) if backend.teacher.module is not None else []
    return {"student": local_bytes(backend.module.parameters()), "teacher": local_bytes(teacher),
            "optimizer": local_bytes(optimizer)}


def main(mode: str, teacher_mode: str, parallel) -> None:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    backend = LocalBackend(model, tokenizer, student=StudentConfig(mode=mode, lora_rank=4),
                           teacher=TeacherConfig(mode=teacher_mode), optim=OptimConfig(batch_size=2, micro_batch_size=1),
                           parallel=parallel)
    student = [p for p in backend.module.parameters()]
    teacher = list(backend.teacher.module.parameters()) if backend.teacher.module is not None else []
    shares = parallel.gather({"student": local_numel(student), "teacher": local_numel(teacher),
                              "student_total": sum(p.numel() for p in student),
                              "teacher_total": sum(p.numel() for p in teacher)})
    prompts = [tokenizer.encode(f"Question {k}: " + "word " * k) for k in range(7)]
    shared = parallel.share_generate(lambda p, n: backend.generate_greedy(p, n, batch_size=2))(prompts, 6)
    backend.sft_step(prompts[:2], [[5, 6, 7], [8, 9]])  # AdamW holds its moments after a step
    memory = parallel.gather(state_bytes(backend))
    if parallel.is_main:
        print(json.dumps({"shares": shares, "completions": shared, "memory": memory}))


if __name__ == "__main__":
    parallel = setup_parallel()
    main(sys.argv[1], sys.argv[2], parallel)
    parallel.close()
