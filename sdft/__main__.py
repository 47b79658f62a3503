"""`python -m sdft ...` and `accelerate launch -m sdft ...`: the `sdft` command (`sdft.cli`)."""
import sys

from sdft.cli import main

if __name__ == "__main__":
    sys.exit(main())
