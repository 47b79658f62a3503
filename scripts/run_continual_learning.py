#!/usr/bin/env python
"""Two-stage continual learning: train on task A, then on task B from each stage-1 model; both tasks are
evaluated after every stage; writes the accuracy / change-vs-base / retention tables and a stage plot.

  python scripts/run_continual_learning.py methods=sft,sdft_topk,sdft_full,sdft_is learning_rates=5e-4 stages=1,2
  python scripts/run_continual_learning.py --config configs/continual_learning.yaml --preset paper seeds=0,1

Every cell is its own resumable run folder under results/<name>/cells/; rerunning skips finished cells.
Extra key=value arguments: methods=a,b  learning_rates=x,y  stages=1,2  seeds=0,1  results_dir=DIR.
"""
import argparse
import shlex
import sys

from sdft.experiments.cli import parse_selection
from sdft.experiments.continual import run_continual
from sdft.experiments.spec import load_spec, select


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/continual_learning.yaml", help="experiment spec YAML")
    parser.add_argument("--preset", default=None, help="a preset of the spec (default: its default_preset)")
    parser.add_argument("selection", nargs="*", help="methods=a,b learning_rates=x,y stages=1,2 seeds=0 results_dir=DIR")
    args = parser.parse_args(argv)
    try:
        chosen = parse_selection(args.selection,
                                 allowed=("methods", "learning_rates", "stages", "seeds", "results_dir"))
        spec = load_spec(args.config, args.preset)
        methods = select(spec, "methods", chosen.get("methods"), list(spec.methods))
        lrs = [float(v) for v in chosen["learning_rates"]] if "learning_rates" in chosen else None
        seeds = [int(v) for v in chosen["seeds"]] if "seeds" in chosen else None
        stages = [int(v) for v in chosen.get("stages", ["1", "2"])]
        tables = run_continual(spec, results_dir=chosen.get("results_dir", ["results"])[0], methods=methods, lrs=lrs,
                               seeds=seeds, stages=stages,
                               command=shlex.join(["python", "scripts/run_continual_learning.py",
                                                   *(argv or sys.argv[1:])]))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"tables: {tables}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
