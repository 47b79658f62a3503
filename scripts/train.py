#!/usr/bin/env python
"""Train with SDFT (or the SFT baseline): `sdft train` (see `sdft train --help` for every config key).

  python scripts/train.py --config configs/quickstart.yaml
  accelerate launch scripts/train.py --config configs/tooluse.yaml teacher.mode=static objective.targets=topk
  python scripts/train.py --config configs/quickstart.yaml --validate      # offline checks, no training
"""
import sys

from sdft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], script=["python", "scripts/train.py"]))
