"""Build the second skill of the laptop experiments (stage 2 of continual learning), deterministically.

Skill: extracting a person and a city from a sentence into a fixed JSON object::

    Extract the person and the city as JSON: Noah lives in Jakarta.
    {"name": "Noah", "city": "Jakarta"}

It is the quickstart's skill (configs/quickstart.yaml) and stage 2 of the laptop continual-learning preset
(stage 1: the young of an animal, sdft/datasets/quickstart). It needs no knowledge beyond the prompt, so
SmolLM2-135M does it when shown examples, while asked directly it invents its own keys or nests the
object. The held-out rows use names and cities that no training row uses, and one of the seven sentence
patterns appears only in held-out rows.
The prior abilities watched for forgetting are the quickstart's retention set (capitals, languages,
simple facts).

Files written next to this script, in folder `extract/`:
- train.jsonl, heldout.jsonl: PromptExample rows {"id", "inputs": {"question"}, "expected": [the JSON
  object, also without spaces] (verifier contains), "demonstration"};
- heldout/tasks.jsonl: the held-out rows as an evsys benchmark.

    python -m sdft.datasets.laptop.make_laptop            # (re)write the files
    python -m sdft.datasets.laptop.make_laptop --measure  # + student / teacher / few-shot scores of the base model

Measured (packaged model, greedy, 32 new tokens, CPU float32), on the 48 held-out rows:
- student (bare prompt):                                  0/48 =  0.0%  (Wilson 95%: 0.0-7.4%)
- teacher, official template (demonstration quoted):      9/48 = 18.8%  (10.2-31.9%)
- teacher, template "turns" (demonstration as an answer): 44/48 = 91.7%  (80.4-96.7%)
- few-shot, 1 / 3 training rows as earlier turns:         33/48 = 68.8% (54.7-80.1%) / 43/48 = 89.6% (77.8-95.5%)
The quickstart (SDFT on this data, seed 0) moves held-out from 0% to 70.8% (34/48) and the retention set from
78.9% to 81.6%; README "The quickstart" has three seeds with SFT beside them.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from sdft.datasets.measure import generator_main, write_files

HERE = Path(__file__).resolve().parent
SEED = 4321
N_TRAIN = 96
N_HELDOUT = 48
PROMPT = "Extract the person and the city as JSON: {sentence}"

_NAMES = ("Anna", "Tom", "Mia", "Leo", "Sara", "Omar", "Lucas", "Emma", "Raj", "Olga", "Pedro", "Chen", "Aisha",
          "Ivan", "Noah", "Elena", "Kenji", "Sofia", "Liam", "Maria", "Ben", "Nina", "Hugo", "Zoe", "Adam", "Lena",
          "Max", "Ida", "Sam", "Eva", "Finn", "Rosa", "Jan", "Lea", "Tim", "Amy", "Paul", "Iris", "Dan", "Maya")
_CITIES = ("Rome", "Osaka", "Boston", "Lisbon", "Cairo", "Madrid", "Berlin", "Lagos", "Paris", "Moscow", "Shanghai",
           "Sydney", "Mumbai", "Kyiv", "Lima", "Oslo", "Jakarta", "Perth", "Quito", "Vienna", "Prague", "Milan",
           "Porto", "Delhi", "Hanoi", "Accra", "Zurich", "Munich", "Athens", "Havana", "Dakar", "Kyoto",
           "Toronto", "Warsaw", "Bergen", "Geneva", "Seattle", "Chicago", "Manila", "Riga")
# sentence patterns; the last one is held out
PATTERNS = ("{name} moved to {city} last year.", "{name} lives in {city}.", "{name} was born in {city}.",
            "{name} works in {city}.", "Last summer {name} visited {city}.", "{name} studied in {city}.",
            "In {city}, {name} opened a small bakery.")


def answer(name: str, city: str) -> str:
    return json.dumps({"name": name, "city": city})


def _rows(part: str, n: int, names: list, cities: list, patterns: tuple, rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    while len(rows) < n:
        name, city = rng.choice(names), rng.choice(cities)
        sentence = rng.choice(patterns).format(name=name, city=city)
        if sentence in seen:
            continue
        seen.add(sentence)
        gold = answer(name, city)
        rows.append({"id": f"{part}/{len(rows)}", "inputs": {"question": PROMPT.format(sentence=sentence)},
                     "expected": [gold, gold.replace(" ", "")], "demonstration": gold})
    return rows


def build() -> dict[str, list[dict]]:
    """All rows, keyed by the file they go to (relative to this folder)."""
    rng = random.Random(SEED)
    names, cities = list(_NAMES), list(_CITIES)
    rng.shuffle(names)
    rng.shuffle(cities)
    train = _rows("train", N_TRAIN, names[:24], cities[:24], PATTERNS[:-1], rng)
    heldout = _rows("heldout", N_HELDOUT, names[24:], cities[24:], PATTERNS, rng)
    tasks = [{"task_id": row["id"], "instruction": row["inputs"]["question"],
              "verifier": {"kind": "in_process", "fn_name": "contains", "expected": row["expected"]}}
             for row in heldout]
    return {"extract/train.jsonl": train, "extract/heldout.jsonl": heldout, "extract/heldout/tasks.jsonl": tasks}


def write(folder: Path = HERE) -> None:
    write_files(build(), folder)


def main(argv=None) -> None:
    generator_main(argv, description=__doc__.splitlines()[0], build=build, folder=HERE, train=HERE / "extract" / "train.jsonl",
                   heldout=HERE / "extract" / "heldout.jsonl")


if __name__ == "__main__":
    main()
