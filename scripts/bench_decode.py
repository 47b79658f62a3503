#!/usr/bin/env python
"""Decoding speed of the native sampler against the weight-read floor, the previous sampler and vLLM
(`sdft.bench.decode`): ms per decoding step, lockstep rounds, medians.

  python scripts/bench_decode.py                                  # SmolLM2-135M, 8 prompts x 128 tokens
  python scripts/bench_decode.py --columns old,native --rounds 5
  .venv-vllm/bin/python scripts/bench_decode.py                   # with the vLLM column
"""
from __future__ import annotations

import argparse
import sys

from sdft.bench.decode import COLUMNS, DecodeSettings, format_report, run_decode_bench


def parse_args(argv=None) -> DecodeSettings:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DecodeSettings.model, help="model name or folder (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=DecodeSettings.prompts)
    parser.add_argument("--new-tokens", type=int, default=DecodeSettings.new_tokens)
    parser.add_argument("--rounds", type=int, default=DecodeSettings.rounds)
    parser.add_argument("--warmup", type=int, default=DecodeSettings.warmup)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--columns", default=",".join(COLUMNS), help="comma-separated, of: " + ", ".join(COLUMNS))
    args = parser.parse_args(argv)
    columns = tuple(c.strip() for c in args.columns.split(",") if c.strip())
    bad = [c for c in columns if c not in COLUMNS]
    if bad:
        parser.error(f"--columns: unknown {', '.join(bad)}; allowed: {', '.join(COLUMNS)}")
    return DecodeSettings(model=args.model, prompts=args.prompts, new_tokens=args.new_tokens, rounds=args.rounds,
                          warmup=args.warmup, threads=args.threads, columns=columns)


if __name__ == "__main__":
    report = run_decode_bench(parse_args(), progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(report))
