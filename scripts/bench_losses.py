#!/usr/bin/env python
"""Benchmark the distillation losses: materialized reference vs chunked fused-linear path, side by side
(the method: `sdft.bench.cpu_losses`).

For every (N, H, V) of the grid and each path: forward+backward time (median of --repeats), peak extra
memory (each case in a fresh process), and the achieved matmul rate as a fraction of the plain GEMM rate
measured in the same run on the same shape.

  python scripts/bench_losses.py                       # the full CPU grid (tens of minutes)
  python scripts/bench_losses.py --quick               # a small grid (a minute)
  python scripts/bench_losses.py --grid 1024x1024x151936 --loss kl,topk
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdft.bench import cpu_losses  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid, one repeat")
    parser.add_argument("--grid", default=None, help="comma-separated NxHxV cases (default: the full grid)")
    parser.add_argument("--loss", default="kl", help="comma-separated: kl (forward KL), topk (top-K distillation)")
    parser.add_argument("--paths", default="reference,chunked")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--weight-grad", action="store_true", help="also compute the output-layer weight gradient")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--topk", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-reference-gib", type=float, default=14.0,
                        help="skip the reference path where its logits would exceed this (it would not fit)")
    parser.add_argument("--json", default=None, help="write the raw rows to this JSON file")
    args = parser.parse_args(argv)

    if args.quick:
        grid, args.repeats = cpu_losses.QUICK_GRID, 1
    elif args.grid:
        try:
            grid = [tuple(map(int, c.split("x"))) for c in args.grid.split(",")]
        except ValueError:
            parser.error(f"--grid must be comma-separated NxHxV cases of integers, got {args.grid!r}")
    else:
        grid = cpu_losses.FULL_GRID
    import torch
    print(f"# sdft loss benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}, dtype {args.dtype}, "
          f"weight grad {args.weight_grad}", flush=True)
    settings = cpu_losses.CaseSettings(dtype=args.dtype, weight_grad=args.weight_grad, repeats=args.repeats,
                                       device=args.device, topk=args.topk)
    rows = cpu_losses.run_grid(grid, args.loss.split(","), args.paths.split(","), settings,
                               max_reference_gib=args.max_reference_gib,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
    print(cpu_losses.format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
