#!/usr/bin/env python
"""Train with SDFT (or the SFT baseline) from a YAML config plus key=value overrides.

  python scripts/train.py --config configs/quickstart.yaml
  accelerate launch scripts/train.py --config configs/tooluse.yaml teacher.mode=static objective.targets=topk
  python scripts/train.py --config configs/quickstart.yaml --validate      # offline checks, no training
"""
import argparse
import sys

from sdft.config import load_config
from sdft.parallel import setup_parallel
from sdft.runner import train_from_config, validate_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--validate", action="store_true", help="check config, data and model offline; no training")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective.full.kind=reverse teacher.mode=ema")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.validate:
            for line in validate_run(config):
                print(line)
            return 0
        parallel = setup_parallel()
        result = train_from_config(config, parallel=parallel)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if parallel.is_main:
        print(f"run folder: {result.run_dir} (summary.md, metrics.jsonl, predictions/, learning_curves.png)")
        for name, after in result.scores_after.items():
            before = result.scores_before.get(name)
            change = f"{before.pass_at_1:.3f} -> " if before is not None else ""
            print(f"  {name}: pass@1 {change}{after.pass_at_1:.3f} (n={after.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
