#!/usr/bin/env python
"""Run the ablation grid of an experiment spec (methods x seeds), then write its table and bar chart.

  python scripts/run_ablation.py --config configs/ablation_tooluse.yaml                 (default preset)
  python scripts/run_ablation.py --config configs/ablation_tooluse.yaml --preset paper methods=full_ema,sft seeds=0,1

Every cell is its own resumable run folder under results/<name>/cells/; rerunning skips finished cells.
Extra key=value arguments: methods=a,b  seeds=0,1  results_dir=DIR.
"""
import sys

from sdft.experiments.ablation import run_ablation
from sdft.experiments.cli import run_experiment_script, typed
from sdft.experiments.spec import select


def run(spec, chosen, command):
    return run_ablation(spec, results_dir=chosen.get("results_dir", ["results"])[0], command=command,
                        methods=select(spec, "methods", chosen.get("methods"), list(spec.methods)),
                        seeds=typed(chosen, "seeds", int))


if __name__ == "__main__":
    sys.exit(run_experiment_script(__doc__, script="scripts/run_ablation.py",
                                   default_config="configs/ablation_tooluse.yaml",
                                   keys=("methods", "seeds", "results_dir"), run=run))
