#!/usr/bin/env python
"""Two-stage continual learning (train on task A, then on task B from each stage-1 model): `sdft continual`.

  python scripts/run_continual_learning.py methods=sft,sdft_topk,sdft_full,sdft_is learning_rates=5e-4 stages=1,2
  python scripts/run_continual_learning.py --config configs/continual_learning.yaml --preset paper seeds=0,1
"""
import sys

from sdft.cli import main

if __name__ == "__main__":
    sys.exit(main(["continual", *sys.argv[1:]], script=["python", "scripts/run_continual_learning.py"]))
