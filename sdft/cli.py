"""The `sdft` command.

    sdft train     --config C [key=value ...]          train (SDFT or the SFT baseline); --validate only checks
    sdft validate  --config C [key=value ...]          offline checks of config, data, model and benchmarks
    sdft evaluate  (--config C | --run R [--checkpoint step_N]) [--out DIR] [key=value ...]
    sdft export    --run R [--checkpoint step_N] --format adapter|merged OUT
    sdft ablate    [--config SPEC] [--preset P] [methods=a,b seeds=0,1 results_dir=DIR]
    sdft continual [--config SPEC] [--preset P] [methods=a,b learning_rates=x,y stages=1,2 seeds=0,1]
    sdft config    [--config C] [key=value ...]        every key with its type, allowed values and default;
                                                       with --config, the resolved config as YAML

`--config` is a YAML file or the name of a shipped config (`sdft config --shipped` lists them), e.g.
`sdft train --config quickstart`. `python -m sdft ...` and `accelerate launch -m sdft train ...` run the
same command; scripts/*.py are thin wrappers around it. Bad input prints one `error: ...` line and exits
with status 2.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from typing import Sequence

__all__ = ["main", "build_parser", "keys_text"]

_RAW = argparse.RawDescriptionHelpFormatter


def keys_text(width: int = 100) -> str:
    """Every config key with its type and allowed values, default and description (`sdft.schema.schema_rows`)."""
    from sdft.config import Config
    from sdft.schema import schema_rows

    lines = []
    for key, kind, default, doc in schema_rows(Config):
        lines.append(f"  {key} = {default}    ({kind})")
        if doc:
            lines += textwrap.wrap(doc, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.lr=5e-4 teacher.mode=ema 'logging.report_to=[wandb]'")


def build_parser(prog: str = "sdft", command_prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of the command; `command_prog` names every sub-command in its usage line (a wrapper script
    that stands for one sub-command), default `<prog> <command>`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_RAW)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    keys_epilog = "config keys (key = default (type and allowed values)):\n" + keys_text()

    def add(name: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, prog=command_prog or f"{prog} {name}", formatter_class=_RAW, **options)

    train = add("train", help="train from a config", epilog=keys_epilog,
                description="Train with SDFT (or the SFT baseline) from a config plus key=value "
                                            "overrides; writes the run folder output_dir/run_name.")
    train.add_argument("--config", required=True, help="a YAML file or a shipped config name (e.g. quickstart)")
    train.add_argument("--validate", action="store_true", help="check config, data and model offline; no training")
    _overrides(train)

    validate = add("validate", help="check a config, its data, model and benchmarks offline", epilog=keys_epilog)
    validate.add_argument("--config", required=True, help="a YAML file or a shipped config name")
    _overrides(validate)

    evaluate = add(
        "evaluate", help="evaluate a model or a run's student on the config's benchmarks",
        description="Evaluate model.name (--config), or a local run's student at a checkpoint (--run), on "
                    "eval.benchmarks with greedy decoding. Writes predictions/, results.json and results.md to --out "
                    "(default: <run>/eval/<checkpoint>, or <output_dir>/eval/<model name>); key=value overrides "
                    "apply to the config (for --run, to the run's own config.yaml).")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a YAML file or shipped config name: evaluates its model.name")
    source.add_argument("--run", help="a local run folder: evaluates its student (config.yaml + checkpoint)")
    evaluate.add_argument("--checkpoint", default=None, help="with --run: a checkpoint folder name or path "
                                                             "(default: the latest)")
    evaluate.add_argument("--out", default=None, help="output folder")
    _overrides(evaluate)

    export = add(
        "export", help="write a run's student as a PEFT adapter or a merged model folder",
        description="Export the student of a run (local or Tinker) with its tokenizer, chat template and a model "
                    "card. adapter: adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained "
                    "(LoRA runs); merged: a model folder for AutoModelForCausalLM.from_pretrained.")
    export.add_argument("--run", required=True, help="the run folder")
    export.add_argument("--checkpoint", default=None, help="a checkpoint folder name or path (default: the latest)")
    export.add_argument("--format", required=True, choices=("adapter", "merged"))
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    export.add_argument("out", metavar="OUT", help="the folder to write (created; written atomically)")

    from sdft.experiments.cli import EXPERIMENTS

    for name, experiment in EXPERIMENTS.items():
        sub = add(name, help=experiment.summary, description=experiment.doc)
        sub.add_argument("--config", default=experiment.default_spec,
                         help=f"experiment spec: a YAML file or a shipped spec name (default: {experiment.default_spec})")
        sub.add_argument("--preset", default=None, help="a preset of the spec (default: its default_preset)")
        sub.add_argument("selection", nargs="*", metavar="key=a,b", help=" ".join(f"{k}=..." for k in experiment.keys))

    config = add("config", help="list the config keys, or show a resolved config", epilog=keys_epilog)
    config.add_argument("--config", default=None, help="a YAML file or shipped config name: print it resolved")
    config.add_argument("--shipped", action="store_true", help="list the shipped configs")
    _overrides(config)
    return parser


# ------------------------------------------------------------------------------------------- commands

def _train(args) -> int:
    from sdft.config import load_config
    from sdft.parallel import setup_parallel
    from sdft.runner import train_from_config

    config = load_config(args.config, args.overrides)
    if args.validate:
        return _print_validation(config)
    parallel = setup_parallel()
    result = train_from_config(config, parallel=parallel)
    parallel.close()
    if parallel.is_main:
        print(f"run folder: {result.run_dir} (summary.md, metrics.jsonl, predictions/, learning_curves.png)")
        for name, after in result.scores_after.items():
            before = result.scores_before.get(name)
            change = f"{before.pass_at_1:.3f} -> " if before is not None else ""
            print(f"  {name}: pass@1 {change}{after.pass_at_1:.3f} (n={after.n})")
    return 0


def _print_validation(config) -> int:
    from sdft.runner import validate_run

    for line in validate_run(config):
        print(line)
    return 0


def _validate(args) -> int:
    from sdft.config import load_config

    return _print_validation(load_config(args.config, args.overrides))


def _evaluate(args) -> int:
    from sdft.config import load_config
    from sdft.eval_run import evaluate_model
    from sdft.parallel import setup_parallel

    if args.checkpoint is not None and args.run is None:
        raise _UsageError("--checkpoint needs --run")
    parallel = setup_parallel()
    if args.run is not None:
        report = evaluate_model(None, run_dir=args.run, checkpoint=args.checkpoint, overrides=args.overrides,
                                out_dir=args.out, device=parallel.device, progress=True)
    else:
        report = evaluate_model(load_config(args.config, args.overrides), out_dir=args.out, device=parallel.device,
                                progress=True)
    parallel.close()
    for note in report["notes"]:  # damaged checkpoints skipped, a checkpoint without checksums
        print(f"note: {note}", file=sys.stderr)
    print(f"evaluated {report['model'] if report['run'] is None else report['run'] + ' at ' + report['checkpoint']}:"
          f" {report['out_dir']}")
    for name, row in report["benchmarks"].items():
        print(f"  {name}: pass@1 {row['pass_at_1']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']})")
    return 0


def _export(args) -> int:
    from sdft.export import export_run

    out = export_run(args.run, args.out, format=args.format, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"exported ({args.format}): {out}")
    return 0


def _experiment(args, invoked: Sequence[str]) -> int:
    from sdft.experiments.cli import run_experiment

    path = run_experiment(args.command, spec=args.config, preset=args.preset, selection=args.selection,
                          command=shlex.join(invoked))
    print(f"written: {path}")
    return 0


def _config(args) -> int:
    import yaml

    from sdft.config import config_to_dict, load_config, shipped_config_names

    if args.shipped:
        print("\n".join(shipped_config_names()))
    elif args.config is None and not args.overrides:
        print("config keys (key = default (type and allowed values)):")
        print(keys_text())
    else:
        config = load_config(args.config, args.overrides)
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True, width=100), end="")
    return 0


class _UsageError(Exception):
    """A command-line mistake argparse cannot see (reported like argparse's own usage errors)."""


_HANDLERS = {"train": _train, "validate": _validate, "evaluate": _evaluate, "export": _export, "config": _config}


def main(argv: Sequence[str] | None = None, *, script: Sequence[str] | None = None) -> int:
    """Run one command (`argv`: the command and its arguments); returns the exit status. `script` is the
    command line of a wrapper script that stands for `sdft <command>` (e.g. ["python", "scripts/run_ablation.py"]):
    its usage line names it, and the experiment commands record it in their tables."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    prog = "sdft"
    parser = build_parser(prog, command_prog=script[-1] if script else None)
    args = parser.parse_args(arguments)
    invoked = [*script, *arguments[1:]] if script is not None else [prog, *arguments]
    try:
        if args.command in _HANDLERS:
            return _HANDLERS[args.command](args)
        return _experiment(args, invoked)
    except _UsageError as error:
        print(f"{script[-1] if script else prog + ' ' + args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a failed save (sdft.checkpoint.CheckpointWriteError: full disk, ...) or other I/O
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
