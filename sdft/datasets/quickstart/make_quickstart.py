"""Build the animal-young data and the retention set shipped with sdft, deterministically, and optionally measure it.

Skill taught: naming the young of an animal ("What is a baby deer called?" -> "A baby deer is called
a fawn."). SmolLM2-135M-Instruct knows many of these words but, asked directly, describes the animal
instead of naming its young; shown a demonstration in the teacher prompt, it answers with the name.
The checkable word comes after the first few completion tokens ("A baby deer is called a ..."), so it
survives the loss's skip_first_n_tokens=3.

Files written next to this script:
- train.jsonl: rows {"id", "inputs": {"question"}, "expected": [accepted names], "demonstration"},
  two phrasings per training animal;
- heldout.jsonl: the same format, one phrasing per held-out animal; no held-out animal is trained on;
- heldout/tasks.jsonl: the held-out rows as an evsys benchmark (verifier "contains" with the accepted
  names, case-insensitive);
- retention/tasks.jsonl: facts the base model already answers (capitals, languages, simple facts),
  to watch for forgetting.

Held-out animals are chosen by hand: common animals whose accepted names are not substrings of words
an answer is likely to contain anyway (so no "chick", which "chicken" contains, and no "kit", which
"kitchen" contains).

    python -m sdft.datasets.quickstart.make_quickstart            # (re)write the files
    python -m sdft.datasets.quickstart.make_quickstart --measure  # + greedy pass rates with the packaged model

Measured with `--measure` (packaged model, greedy, 48 new tokens, CPU float32), on the 36 held-out animals:
- student (bare question):                                   4/36 = 11.1%  (Wilson 95%: 4.4-25.3%)
- teacher, official template (demonstration quoted):         33/36 = 91.7%  (78.2-97.1%)
- teacher, template "turns" (demonstration as an answer):    30/36 = 83.3%  (68.1-92.1%)
- few-shot, 1 / 3 other animals as earlier turns:            9/36 = 25.0% (13.8-41.1%) / 12/36 = 33.3% (20.2-49.7%)
- retention, base model:                                     30/38 = 78.9%  (63.7-88.9%)
The teacher scores include copying the answer from its own demonstration; the few-shot scores are what the
model knows of animals it was not shown. The skill was the quickstart's until the quickstart moved to JSON
extraction (sdft/datasets/laptop/make_laptop.py); configs/laptop_young.yaml trains on it, and docs/results.md
has SDFT and SFT over three seeds. The retention set is still the quickstart's.
"""
from __future__ import annotations

import random
from pathlib import Path

from sdft.datasets.measure import generator_main, write_files

HERE = Path(__file__).resolve().parent
SEED = 1234

# (animal, accepted names of its young; the first is the one the demonstration uses)
HELDOUT_ANIMALS = (
    ("dog", ("puppy", "pup")), ("sheep", ("lamb",)), ("horse", ("foal", "colt", "filly")),
    ("kangaroo", ("joey",)), ("frog", ("tadpole", "froglet")), ("duck", ("duckling",)), ("deer", ("fawn",)),
    ("goose", ("gosling",)), ("owl", ("owlet",)), ("pig", ("piglet",)), ("bear", ("cub",)),
    ("tiger", ("cub",)), ("wolf", ("pup", "cub")), ("elephant", ("calf", "calves")),
    ("whale", ("calf", "calves")), ("eagle", ("eaglet",)), ("seal", ("pup",)), ("koala", ("joey",)),
    ("zebra", ("foal",)), ("dolphin", ("calf", "calves")), ("panda", ("cub",)),
    ("butterfly", ("caterpillar", "larva")), ("swan", ("cygnet",)), ("giraffe", ("calf", "calves")),
    ("leopard", ("cub",)), ("donkey", ("foal",)), ("moose", ("calf", "calves")), ("bison", ("calf", "calves")),
    ("shark", ("pup",)), ("spider", ("spiderling",)), ("gorilla", ("infant",)), ("toad", ("tadpole", "toadlet")),
    ("otter", ("pup",)), ("hyena", ("cub",)), ("camel", ("calf", "calves")), ("reindeer", ("calf", "calves")),
)
TRAIN_ANIMALS = (
    ("cat", ("kitten",)), ("cow", ("calf", "calves")), ("lion", ("cub",)), ("goat", ("kid",)),
    ("hen", ("chick",)), ("chicken", ("chick",)), ("rabbit", ("kit", "kitten", "bunny")), ("fox", ("kit", "cub")),
    ("hippopotamus", ("calf", "calves")), ("rhinoceros", ("calf", "calves")), ("cheetah", ("cub",)),
    ("fish", ("fry", "fingerling")), ("turkey", ("poult", "chick")), ("hare", ("leveret",)), ("llama", ("cria",)),
    ("alpaca", ("cria",)), ("pigeon", ("squab",)), ("beaver", ("kit",)), ("rat", ("pup",)), ("mouse", ("pup",)),
    ("hamster", ("pup",)), ("squirrel", ("kit", "kitten")), ("skunk", ("kit",)), ("ferret", ("kit",)),
    ("buffalo", ("calf", "calves")), ("yak", ("calf", "calves")), ("walrus", ("calf", "calves")),
    ("penguin", ("chick",)), ("ostrich", ("chick",)), ("eel", ("elver",)), ("oyster", ("spat",)),
    ("mosquito", ("larva", "wriggler")), ("fly", ("maggot",)), ("wallaby", ("joey",)), ("platypus", ("puggle",)),
    ("echidna", ("puggle",)), ("hawk", ("eyas",)), ("falcon", ("eyas",)), ("peacock", ("peachick",)),
    ("turtle", ("hatchling",)), ("crocodile", ("hatchling",)), ("monkey", ("infant",)),
    ("chimpanzee", ("infant",)), ("jellyfish", ("ephyra",)), ("cockroach", ("nymph",)),
    ("grasshopper", ("nymph",)), ("snake", ("snakelet", "hatchling")), ("ant", ("larva",)), ("bee", ("larva",)),
    ("lobster", ("larva",)), ("badger", ("cub", "kit")), ("raccoon", ("kit", "cub")), ("coyote", ("pup",)),
    ("jaguar", ("cub",)), ("antelope", ("calf", "calves")), ("elk", ("calf", "calves")), ("mole", ("pup",)),
    ("hedgehog", ("hoglet",)), ("porcupine", ("porcupette",)), ("dove", ("squab",)), ("salmon", ("fry", "alevin")),
    ("sea lion", ("pup",)), ("manatee", ("calf", "calves")), ("emu", ("chick",)), ("quail", ("chick",)),
)
# Question phrasings: (template, the word the demonstration uses for "young").
PHRASINGS = (
    ("What is a baby {animal} called?", "baby"),
    ("What do you call a young {animal}?", "young"),
    ("What is the name for a baby {animal}?", "baby"),
    ("What is a young {animal} called?", "young"),
)
TRAIN_PHRASINGS_PER_ANIMAL = 2

# Retention: (task id, instruction, accepted answers) the base model already gets right mostly.
RETENTION = (
    *((f"capital_{country.lower().replace(' ', '_')}",
       f"What is the capital of {country}? Answer with just the city name.", (city,)) for country, city in (
        ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
        ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("England", "London"),
        ("China", "Beijing"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
        ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Thailand", "Bangkok"),
        ("Argentina", "Buenos Aires"), ("South Korea", "Seoul"), ("Canada", "Ottawa"))),
    *((f"language_{country.lower()}", f"What is the official language of {country}?", (language,))
      for country, language in (("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Japan", "Japanese"),
                                ("Germany", "German"), ("Italy", "Italian"), ("Greece", "Greek"),
                                ("Netherlands", "Dutch"), ("Poland", "Polish"))),
    ("fact_sky", "What color is the sky on a clear day?", ("blue",)),
    ("fact_grass", "What color is grass?", ("green",)),
    ("fact_spider_legs", "How many legs does a spider have?", ("eight", "8")),
    ("fact_week", "How many days are there in a week?", ("seven", "7")),
    ("fact_water_freezes", "At what temperature in degrees Celsius does water freeze?", ("0", "zero")),
    ("fact_largest_planet", "What is the largest planet in our solar system?", ("Jupiter",)),
    ("fact_red_planet", "Which planet is known as the Red Planet?", ("Mars",)),
    ("fact_romeo", "Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("fact_water_formula", "What is the chemical formula of water?", ("H2O",)),
    ("fact_sun", "What is the star at the center of our solar system called?", ("Sun",)),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def demonstration(animal: str, young_word: str, name: str) -> str:
    """The gold answer shown to the teacher, e.g. "A baby deer is called a fawn."."""
    return f"A {young_word} {animal} is called {_article(name)} {name}."


def _rows(animals, phrasings_per_animal: int, rng: random.Random, prefix: str) -> list[dict]:
    rows = []
    for animal, names in animals:
        for template, young_word in rng.sample(PHRASINGS, phrasings_per_animal):
            phrasing = PHRASINGS.index((template, young_word))
            rows.append({"id": f"{prefix}/{animal.replace(' ', '_')}/q{phrasing}",
                         "inputs": {"question": template.format(animal=animal)}, "expected": list(names),
                         "demonstration": demonstration(animal, young_word, names[0])})
    return rows


def build() -> dict[str, list[dict]]:
    """All rows, keyed by the file they go to (relative to this folder)."""
    held = {animal for animal, _ in HELDOUT_ANIMALS}
    overlap = held & {animal for animal, _ in TRAIN_ANIMALS}
    if overlap:
        raise ValueError(f"animals both trained on and held out: {sorted(overlap)}")
    rng = random.Random(SEED)
    train = _rows(TRAIN_ANIMALS, TRAIN_PHRASINGS_PER_ANIMAL, rng, "train")
    rng.shuffle(train)
    heldout = _rows(HELDOUT_ANIMALS, 1, rng, "heldout")
    heldout_tasks = [{"task_id": row["id"], "instruction": row["inputs"]["question"],
                      "verifier": {"kind": "in_process", "fn_name": "contains", "expected": row["expected"]}}
                     for row in heldout]
    retention_tasks = [{"task_id": task_id, "instruction": instruction,
                        "verifier": {"kind": "in_process", "fn_name": "contains", "expected": list(answers)}}
                       for task_id, instruction, answers in RETENTION]
    return {"train.jsonl": train, "heldout.jsonl": heldout, "heldout/tasks.jsonl": heldout_tasks,
            "retention/tasks.jsonl": retention_tasks}


def write(folder: Path = HERE) -> None:
    write_files(build(), folder)


def main(argv=None) -> None:
    generator_main(argv, description=__doc__.splitlines()[0], build=build, folder=HERE, train=HERE / "train.jsonl",
                   heldout=HERE / "heldout.jsonl", retention=HERE / "retention", max_new_tokens=48)


if __name__ == "__main__":
    main()
