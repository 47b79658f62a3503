"""Command lines of the experiment scripts: `--config SPEC [--preset P] key=a,b ...`."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable, Sequence

from sdft.experiments.spec import ExperimentSpec, load_spec


def parse_selection(arguments: Sequence[str], *, allowed: Sequence[str]) -> dict[str, list[str]]:
    """{"methods": ["sft", "sdft_topk"], ...} from ["methods=sft,sdft_topk", ...]; unknown keys are errors."""
    out: dict[str, list[str]] = {}
    for text in arguments:
        key, sep, value = text.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"argument {text!r} is not of the form key=a,b (allowed keys: {', '.join(allowed)})")
        if key not in allowed:
            raise ValueError(f"argument {text!r}: unknown key {key!r}; allowed: {', '.join(allowed)}")
        out[key] = [v.strip() for v in value.split(",") if v.strip()]
    return out


def typed(chosen: dict[str, list[str]], key: str, cast: Callable) -> list | None:
    """The values of `key` converted with `cast` (int or float), None when not given."""
    if key not in chosen:
        return None
    try:
        return [cast(v) for v in chosen[key]]
    except ValueError:
        kind = {int: "an integer", float: "a number"}.get(cast, cast.__name__)
        raise ValueError(f"{key}={','.join(chosen[key])}: every value must be {kind}") from None


def run_experiment_script(doc: str, *, script: str, default_config: str, keys: Sequence[str],
                          run: Callable[[ExperimentSpec, dict[str, list[str]], str], object],
                          argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the spec, call `run(spec, selection, command)` and print the path it
    returns; bad input prints one error line and returns 2."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help="experiment spec YAML")
    parser.add_argument("--preset", default=None, help="a preset of the spec (default: its default_preset)")
    parser.add_argument("selection", nargs="*", help=" ".join(f"{k}=..." for k in keys))
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    try:
        chosen = parse_selection(args.selection, allowed=keys)
        spec = load_spec(args.config, args.preset)
        path = run(spec, chosen, shlex.join(["python", script, *arguments]))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"written: {path}")
    return 0
