#!/usr/bin/env python
"""Evaluate a model, or a finished (or interrupted) local run's student, on the benchmarks of a config.

  python scripts/evaluate.py --config configs/tooluse.yaml                            # model.name, untrained
  python scripts/evaluate.py --config configs/tooluse.yaml model.name=runs/x/export   # an exported student
  python scripts/evaluate.py --run runs/quickstart                                    # latest checkpoint
  python scripts/evaluate.py --run runs/quickstart --checkpoint step_00000002 eval.batch_size=4
  python scripts/evaluate.py --run runs/quickstart 'eval.benchmarks=[{name: science, kind: science,
      path: ../shared/data/science/eval_data, max_new_tokens: 256, max_items: 50}]'

key=value overrides apply to the config (for --run, to the run's own config.yaml). Writes
predictions/<benchmark>.jsonl, results.json and results.md to --out (default: <run>/eval/<checkpoint>, or
<output_dir>/eval/<model name>) and prints pass@1 with its Wilson 95% interval per benchmark.
"""
import argparse
import sys

from sdft.config import load_config
from sdft.eval_run import evaluate_model
from sdft.parallel import setup_parallel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config: evaluates its model.name on its eval.benchmarks")
    source.add_argument("--run", help="a local run folder: evaluates its student (config.yaml + checkpoint)")
    parser.add_argument("--checkpoint", default=None, help="with --run: a checkpoint folder name or path "
                                                           "(default: the latest)")
    parser.add_argument("--out", default=None, help="output folder (default: see above)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.batch_size=4")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and args.run is None:
        parser.error("--checkpoint needs --run")
    try:
        device = setup_parallel().device
        if args.run is not None:
            report = evaluate_model(None, run_dir=args.run, checkpoint=args.checkpoint, overrides=args.overrides,
                                    out_dir=args.out, device=device, progress=True)
        else:
            report = evaluate_model(load_config(args.config, args.overrides), out_dir=args.out, device=device,
                                    progress=True)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"evaluated {report['model'] if report['run'] is None else report['run'] + ' at ' + report['checkpoint']}:"
          f" {report['out_dir']}")
    for name, row in report["benchmarks"].items():
        print(f"  {name}: pass@1 {row['pass_at_1']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
