#!/usr/bin/env python
"""Evaluate a model, or a finished (or interrupted) local run's student: `sdft evaluate`.

  python scripts/evaluate.py --config configs/tooluse.yaml                            # model.name, untrained
  python scripts/evaluate.py --config configs/tooluse.yaml model.name=runs/x/export   # an exported student
  python scripts/evaluate.py --run runs/quickstart                                    # latest checkpoint
  python scripts/evaluate.py --run runs/quickstart --checkpoint step_00000002 eval.batch_size=4
"""
import sys

from sdft.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]], script=["python", "scripts/evaluate.py"]))
