#!/usr/bin/env python
"""Benchmark one SDFT training step on CPU, side by side with an SFT step and TRL's SDFTTrainer
(the method: `sdft.bench.step_bench`).

Columns, each a worker process with its own copy of the model: sdft (sample, teacher forward, student
forward+backward, optimizer), sft (SFT on the demonstrations), sft_len (SFT with targets as long as the SDFT
step's completions), trl (TRL's SDFTTrainer at the same settings; pip install 'sdft[bench]'). The columns
run in lockstep, --warmup untimed and --repeats timed rounds; the table shows medians of the phase times,
throughputs and the rise of each worker's peak RSS over its loaded model.

  python scripts/bench_step.py                                  # 8 prompts, 128 new tokens, 3 repeats
  python scripts/bench_step.py --prompts 2 --new-tokens 16 --repeats 1 --skip-trl
  python scripts/bench_step.py --targets topk --teacher ema --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdft.bench.settings import StepSettings  # noqa: E402
from sdft.bench.step_report import COLUMNS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct",
                        help="the packaged model's name or a local save_pretrained folder")
    parser.add_argument("--data", default=None,
                        help="a JSONL file of prompts (default: the packaged quickstart train.jsonl if present, "
                             "else 8 built-in prompts)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (one completion each)")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per completion")
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="prompts per forward/backward (default: all prompts at once, as TRL does)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per column (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones, per column")
    parser.add_argument("--targets", choices=("full", "topk"), default="full",
                        help="full-vocabulary forward KL, or the teacher's top-K (K = --topk)")
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--teacher", choices=("static", "ema"), default="static")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--columns", default=",".join(COLUMNS), help=f"a subset of {','.join(COLUMNS)}")
    parser.add_argument("--skip-trl", action="store_true", help="leave out the TRL column")
    parser.add_argument("--in-process", action="store_true",
                        help="run every column in this process (no subprocesses; peak memory is then shared)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("prompts", "new_tokens", "repeats", "lora_rank", "topk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.micro_batch_size is not None and (args.micro_batch_size < 1 or args.prompts % args.micro_batch_size):
        parser.error("--micro-batch-size must be >= 1 and divide --prompts")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown or not columns:
        parser.error(f"--columns must name some of {', '.join(COLUMNS)}; got {args.columns!r}")
    args.columns = [c for c in COLUMNS if c in columns and not (c == "trl" and args.skip_trl)]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from sdft.bench.step_bench import run_benchmark

    settings = StepSettings(model=args.model, data=args.data, prompts=args.prompts, new_tokens=args.new_tokens,
                            micro_batch_size=args.micro_batch_size, targets=args.targets, topk=args.topk,
                            teacher=args.teacher, lora_rank=args.lora_rank, seed=args.seed)
    return run_benchmark(settings, columns=args.columns, repeats=args.repeats, warmup=args.warmup,
                         threads=args.threads, in_process=args.in_process, json_path=args.json)


if __name__ == "__main__":
    main()
