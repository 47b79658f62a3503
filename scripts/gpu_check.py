#!/usr/bin/env python
"""The prepared GPU check (the method: `sdft.bench.gpu_check`): in about 8 minutes on one H200,
  1. accuracy of the fused losses at N=8192, H=4096, V=151936 bf16 against float64 truth, beside naive PyTorch;
  2. the loss benchmark (forward KL without and with the weight gradient, JSD, top-K=20): naive, chunked,
     Triton and Liger-Kernel (when importable), time, extra memory, matmul-rate fraction, against the goals;
  3. one SDFT step and one SFT step on the same token counts for a random Qwen2.5-1.5B-shaped model, bf16,
     LoRA and full fine-tuning.
Each part has a time budget (what does not fit is skipped, saying so); a failing part or item is recorded
and the run goes on. Writes gpu_check.md, gpu_check.json and gpu_check.log to --out; exit status 1 when a
fused path is less accurate than naive PyTorch or anything failed.

  python scripts/gpu_check.py --out results/gpu_check                      # on the GPU machine
  TRITON_INTERPRET=1 python scripts/gpu_check.py --tiny --out /tmp/check   # the same code on a CPU, seconds
  python scripts/gpu_check.py --out DIR --parts losses --budgets losses=300 --total-budget 320
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdft.bench import gpu_check  # noqa: E402


def _budgets(text: str) -> dict[str, float]:
    budgets = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        part, sep, seconds = item.partition("=")
        try:
            budgets[part.strip()] = float(seconds)
        except ValueError:
            sep = ""
        if not sep or part.strip() not in gpu_check.PARTS or budgets[part.strip()] < 0:
            raise argparse.ArgumentTypeError(f"expected PART=SECONDS with PART in {', '.join(gpu_check.PARTS)} "
                                             f"and SECONDS >= 0, got {item!r}")
    return budgets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_check.md, gpu_check.json and gpu_check.log")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and model on the CPU (the CI smoke test; "
                                                       "the Triton path needs TRITON_INTERPRET=1)")
    p.add_argument("--parts", default=",".join(gpu_check.PARTS), help=f"comma list from {', '.join(gpu_check.PARTS)}")
    p.add_argument("--budgets", type=_budgets, default={},
                   help="seconds per part, e.g. accuracy=130,losses=150,steps=150 (the defaults)")
    p.add_argument("--total-budget", type=float, default=None, help="seconds for the whole run (default 450)")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(args.parts) - set(gpu_check.PARTS))
    if unknown or not args.parts:
        p.error(f"--parts must name some of {', '.join(gpu_check.PARTS)}; got {unknown or 'none'}")
    if args.total_budget is not None and args.total_budget < 0:
        p.error("--total-budget must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device is visible; run on the GPU machine, or the CPU smoke test with --tiny",
              file=sys.stderr)
        return 2
    plan = gpu_check.tiny_plan() if args.tiny else gpu_check.full_plan()
    plan = gpu_check.with_budgets(plan, args.budgets, args.total_budget)
    return gpu_check.run_check(plan, args.out, parts=args.parts)


if __name__ == "__main__":
    sys.exit(main())
