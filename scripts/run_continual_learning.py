#!/usr/bin/env python
"""Two-stage continual learning: train on task A, then on task B from each stage-1 model; both tasks are
evaluated after every stage; writes the accuracy / change-vs-base / retention tables and a stage plot.

  python scripts/run_continual_learning.py methods=sft,sdft_topk,sdft_full,sdft_is learning_rates=5e-4 stages=1,2
  python scripts/run_continual_learning.py --config configs/continual_learning.yaml --preset paper seeds=0,1

Every cell is its own resumable run folder under results/<name>/cells/; rerunning skips finished cells.
Extra key=value arguments: methods=a,b  learning_rates=x,y  stages=1,2  seeds=0,1  results_dir=DIR.
"""
import sys

from sdft.experiments.cli import run_experiment_script, typed
from sdft.experiments.continual import run_continual
from sdft.experiments.spec import select


def run(spec, chosen, command):
    return run_continual(spec, results_dir=chosen.get("results_dir", ["results"])[0], command=command,
                         methods=select(spec, "methods", chosen.get("methods"), list(spec.methods)),
                         lrs=typed(chosen, "learning_rates", float), seeds=typed(chosen, "seeds", int),
                         stages=typed(chosen, "stages", int) or [1, 2])


if __name__ == "__main__":
    sys.exit(run_experiment_script(__doc__, script="scripts/run_continual_learning.py",
                                   default_config="configs/continual_learning.yaml",
                                   keys=("methods", "learning_rates", "stages", "seeds", "results_dir"), run=run))
