#!/usr/bin/env python
"""Run the ablation grid of an experiment spec, then write its table and bar chart: `sdft ablate`.

  python scripts/run_ablation.py --config configs/ablation_tooluse.yaml                 (default preset)
  python scripts/run_ablation.py --config configs/ablation_tooluse.yaml --preset paper methods=full_ema,sft seeds=0,1
"""
import sys

from sdft.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]], script=["python", "scripts/run_ablation.py"]))
