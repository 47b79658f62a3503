#!/usr/bin/env python
"""Accuracy of the fused losses at real shapes: chunked and Triton paths against float64 truth, beside naive
PyTorch that materializes the logits in the input dtype (the method: `sdft.bench.loss_accuracy`).

A fused path passes when none of its errors (per-token losses, dL/dh, dL/dW; teacher top-K log-probs and
ids) is larger than naive's; the exit status is 1 when one is.

  python scripts/check_losses_gpu.py --device cuda                      # N=8192, H=4096, V=151936, bf16
  python scripts/check_losses_gpu.py --device cuda --cases h2048,llama8b --json out.json
  TRITON_INTERPRET=1 python scripts/check_losses_gpu.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdft.bench import loss_accuracy as acc  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test; Triton needs "
                                                       "TRITON_INTERPRET=1 on CPU)")
    p.add_argument("--cases", default="qwen7b", help=f"comma list from {', '.join(acc.CASES)}")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--impls", default="chunked,triton", help="fused paths to check: chunked, triton")
    p.add_argument("--rows", type=int, default=512, help="rows per float64 truth chunk")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the real shapes are GPU-sized)")
    args.cases = list(acc.TINY_CASES) if args.tiny else [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(acc.CASES) - set(acc.TINY_CASES))
    if unknown:
        p.error(f"--cases: unknown {unknown}; allowed: {', '.join(acc.CASES)}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if not set(args.impls) <= set(acc.FUSED_IMPLS):
        p.error(f"--impls must name chunked and/or triton, got {args.impls}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from sdft.bench.availability import triton_unavailable_reason

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if "triton" in args.impls and triton_unavailable_reason(device):
        print(f"note: the Triton path is left out ({triton_unavailable_reason(device)})")
        args.impls = [i for i in args.impls if i != "triton"]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"check_losses_gpu: {what}, torch {torch.__version__}, inputs {args.dtype}, paths naive + "
          f"{', '.join(args.impls)}; relative errors against float64 truth", flush=True)
    print(acc.TABLE_HEADER)
    rows, start = [], time.perf_counter()
    for case in args.cases:
        n, h, v = (acc.TINY_CASES if args.tiny else acc.CASES)[case]
        rows += acc.check_case(case, n, h, v, dtype=dtype, device=device, impls=args.impls, chunk_rows=args.rows,
                               seed=args.seed, log=lambda line: print(line, flush=True))
    print(acc.summary_line(rows, time.perf_counter() - start))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": what, "dtype": args.dtype, "rows": rows}, indent=2))
    return 1 if acc.failed_rows(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
