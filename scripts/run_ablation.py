#!/usr/bin/env python
"""Run the ablation grid of an experiment spec (methods x seeds), then write its table and bar chart.

  python scripts/run_ablation.py --config configs/ablation_tooluse.yaml                 (default preset)
  python scripts/run_ablation.py --config configs/ablation_tooluse.yaml --preset paper methods=full_ema,sft seeds=0,1

Every cell is its own resumable run folder under results/<name>/cells/; rerunning skips finished cells.
Extra key=value arguments: methods=a,b  seeds=0,1  results_dir=DIR.
"""
import argparse
import shlex
import sys

from sdft.experiments.ablation import run_ablation
from sdft.experiments.cli import parse_selection
from sdft.experiments.spec import load_spec, select


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/ablation_tooluse.yaml", help="experiment spec YAML")
    parser.add_argument("--preset", default=None, help="a preset of the spec (default: its default_preset)")
    parser.add_argument("selection", nargs="*", help="methods=a,b seeds=0,1 results_dir=DIR")
    args = parser.parse_args(argv)
    try:
        chosen = parse_selection(args.selection, allowed=("methods", "seeds", "results_dir"))
        spec = load_spec(args.config, args.preset)
        methods = select(spec, "methods", chosen.get("methods"), list(spec.methods))
        seeds = [int(s) for s in chosen["seeds"]] if "seeds" in chosen else spec.seeds
        table = run_ablation(spec, results_dir=chosen.get("results_dir", ["results"])[0], methods=methods, seeds=seeds,
                             command=shlex.join(["python", "scripts/run_ablation.py", *(argv or sys.argv[1:])]))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"table: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
