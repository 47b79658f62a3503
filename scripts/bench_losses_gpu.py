#!/usr/bin/env python
"""GPU benchmark of the fused distillation losses: naive PyTorch, torch.compile, chunked, Triton, Liger
(the method: `sdft.bench.loss_speed`).

For each case (N tokens, hidden size H, vocabulary V, bf16) and each path: forward+backward median time
(CUDA events), peak extra memory over the inputs, and the fraction of the matmul floor (the GEMMs the loss
needs, each timed as one [N,H] x [H,V] bf16 matmul in the same run). Modes: "lora" = gradient for the
hidden states only, "full" = also the output-layer weight. The exit status is 1 when a path failed.

  python scripts/bench_losses_gpu.py --device cuda                     # the three H100 cases
  python scripts/bench_losses_gpu.py --device cuda --cases qwen7b --json out.json
  TRITON_INTERPRET=1 python scripts/bench_losses_gpu.py --device cpu --tiny   # smoke test of the logic
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdft.bench import loss_speed as speed  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only with --tiny (smoke test)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke test; Triton needs "
                                                       "TRITON_INTERPRET=1 on CPU)")
    p.add_argument("--cases", default=None, help=f"comma list from {', '.join(speed.CASES)} (default: all)")
    p.add_argument("--losses", default="kl,topk,teacher_topk", help="comma list of kl, topk, teacher_topk")
    p.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    p.add_argument("--impls", default=",".join(speed.IMPLS), help=f"comma list from {', '.join(speed.IMPLS)}")
    p.add_argument("--kind", default="forward", choices=("forward", "reverse", "jsd"), help="KL kind")
    p.add_argument("--topk", type=int, default=20, help="K of the top-K losses")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rotate", type=int, default=3, help="number of hidden-state sets cycled through")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu needs --tiny (the full cases are GPU-sized)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or smoke-test with --device cpu --tiny", file=sys.stderr)
        return 2
    impls = [s for s in args.impls.split(",") if s]
    table = speed.TINY_CASES if args.tiny else speed.CASES
    names = list(table) if args.cases is None else [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in table]
    if unknown:
        print(f"unknown case(s) {unknown}; allowed: {', '.join(table)}", file=sys.stderr)
        return 2
    specs = speed.script_specs([s for s in args.losses.split(",") if s], [s for s in args.modes.split(",") if s],
                               args.kind)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "kind": args.kind, "topk": args.topk}
    if importlib.util.find_spec("triton") is not None:
        import triton
        info["triton"] = triton.__version__
    print(f"# {info}")
    results = {"info": info, "matmul": {}, "rows": []}
    print(speed.TABLE_HEADER)
    for name in names:
        matmul, rows = speed.run_case(name, *table[name], specs, impls, device=device, topk=args.topk,
                                      warmup=args.warmup, iters=args.iters, rotate=args.rotate,
                                      log=lambda line: print(line, flush=True))
        results["matmul"][name] = matmul
        results["rows"] += rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"# wrote {args.json}")
    return 1 if speed.failed_rows(results["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
