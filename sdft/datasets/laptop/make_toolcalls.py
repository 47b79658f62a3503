"""Build a tool-call skill for SmolLM2-135M (sdft/datasets/laptop/toolcalls), deterministically, and optionally
measure it. The laptop experiment presets do not use it: in 16 SDFT steps the 135M student learns to name the
right tool but not the call format (configs/laptop_toolcalls.yaml has the measurement).

Skill taught: calling a tool. The prompt lists four tools with their arguments and ends with a request
("Request: Set a 12 minute timer."); the answer is the call in the ToolAlpaca format of the paper's tool-use
benchmark, scored by the official strict rule (`sdft.verifiers.score_tool_calls`)::

    Action: set_timer
    Action Input: {"minutes": "12"}

Why this skill (beside the quickstart's, naming the young of an animal): SDFT teaches what the model can
already do when it is shown a demonstration, and the student only keeps what generalizes to prompts it
has not seen. SmolLM2-135M knows few names of animal young: shown three examples of other animals it
names 12 of the 36 held-out animals (33%), so the held-out score measures knowledge the model lacks, and
a student trained on them learns the frequent answer words instead ("pup", "calf"). A tool call needs
no knowledge beyond the prompt: pick the listed tool that fits the request and copy its arguments from
the request. Asked directly, the base model describes the tool or answers the request in prose (0%);
shown examples, it writes calls.

Files written to sdft/datasets/laptop/toolcalls/:
- train.jsonl: PromptExample rows {"id", "inputs": {"question"}, "expected": golden answer, "demonstration",
  "task": "tooluse"}: TRAIN_PER_TOOL requests per tool;
- heldout.jsonl: the same format, HELDOUT_PER_TOOL requests per tool, with argument values and a request
  phrasing that no training row uses (every value pool and every tool's phrasings are split in two);
- heldout/tasks.jsonl: the held-out rows as an evsys benchmark (verifier tool_calls_match).
The prior abilities watched for forgetting are the quickstart's retention set (sdft/datasets/quickstart/retention).

    python -m sdft.datasets.laptop.make_toolcalls            # (re)write the files
    python -m sdft.datasets.laptop.make_toolcalls --measure  # + what the base model does with them

`--measure` (`sdft.datasets.measure`) reports, greedy, on the held-out rows: the bare prompt (the
student before training), the teacher prompt (the demonstration of that very row in context: the
teacher's view during training), and few-shot prompts (k training rows as earlier chat turns: the skill
the model can show in context, the ceiling a student can reach); and the retention set.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from sdft.datasets.measure import generator_main, write_files

HERE = Path(__file__).resolve().parent / "toolcalls"
RETENTION_SET = Path(__file__).resolve().parents[1] / "quickstart" / "retention"  # the prior abilities watched
SEED = 1234
TRAIN_PER_TOOL = 12
HELDOUT_PER_TOOL = 4
TOOLS_SHOWN = 4

_CITIES = ("Lyon", "Oslo", "Cairo", "Lima", "Tokyo", "Denver", "Madrid", "Perth", "Dublin", "Seoul", "Quito",
           "Nairobi", "Boston", "Vienna", "Prague", "Austin", "Milan", "Porto", "Delhi", "Hanoi", "Bogota", "Accra",
           "Zurich", "Munich", "Athens", "Havana", "Dakar", "Kyoto", "Sydney", "Toronto", "Lisbon", "Warsaw")
_NAMES = ("Anna", "Tom", "Mia", "Leo", "Sara", "Omar", "Lucas", "Emma", "Raj", "Olga", "Pedro", "Chen", "Aisha",
          "Ivan", "Noah", "Elena", "Kenji", "Sofia", "Liam", "Maria", "Ben", "Nina", "Hugo", "Zoe")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ARTISTS = ("Adele", "Queen", "Coldplay", "Shakira", "Drake", "Madonna", "Beyonce", "Metallica", "Rihanna",
            "Eminem", "Abba", "Nirvana", "Oasis", "Blur", "Muse", "Prince")
_TEXTS = ("I am late", "see you soon", "call me back", "happy birthday", "dinner is ready", "I miss you",
          "good luck", "on my way", "thank you", "the meeting moved", "bring milk", "well done")
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Japanese", "Dutch", "Greek", "Polish")
_WORDS = ("hello", "thank you", "good night", "water", "friend", "cheese", "book", "apple", "train", "house",
          "music", "coffee")
_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK")
_DISHES = ("lasagna", "pancakes", "curry", "paella", "risotto", "sushi", "tacos", "goulash", "falafel", "ramen",
           "omelette", "chili")
_CUISINES = ("Italian", "Thai", "Mexican", "Indian", "Greek", "Chinese", "French", "Korean")
_TIMES = ("6:30", "7:00", "7:15", "8:45", "9:00", "10:30", "5:45", "6:15", "11:00", "12:30")
_MINUTES = ("2", "3", "5", "8", "10", "12", "15", "20", "25", "30", "40", "45", "50", "60", "75", "90")
_AMOUNTS = ("5", "10", "20", "50", "75", "100", "250", "500", "1000", "40")
_TASKS = ("pay the rent", "call mom", "water the plants", "buy bread", "feed the cat", "renew my passport",
          "book a dentist", "return the books")

# name, {argument: value pool}, description, request phrasings (the last one is held out)
TOOLS = (
    ("get_weather", {"city": _CITIES, "day": _DAYS}, "the weather forecast for a city",
     ("What will the weather be like in {city} on {day}?", "Tell me the forecast for {city} for {day}.",
      "Is it going to rain in {city} on {day}?")),
    ("set_timer", {"minutes": _MINUTES}, "start a countdown timer",
     ("Please start a timer for {minutes} minutes.", "Count down {minutes} minutes for me.",
      "Set a {minutes} minute timer.")),
    ("send_message", {"to": _NAMES, "text": _TEXTS}, "send a text message to a contact",
     ("Send {to} a message saying \"{text}\".", "Text {to}: \"{text}\".", "Tell {to} \"{text}\" by message.")),
    ("play_music", {"artist": _ARTISTS}, "play songs by an artist",
     ("Play some {artist}.", "Put on music by {artist}.", "I want to listen to {artist}.")),
    ("convert_currency", {"amount": _AMOUNTS, "source": _CURRENCIES, "target": _CURRENCIES},
     "convert an amount of money",
     ("Convert {amount} {source} to {target}.", "What are {amount} {source} worth in {target}?",
      "How much is {amount} {source} in {target}?")),
    ("translate", {"text": _WORDS, "language": _LANGUAGES}, "translate a word or phrase",
     ("Translate \"{text}\" into {language}.", "What is \"{text}\" in {language}?",
      "How do you say \"{text}\" in {language}?")),
    ("set_alarm", {"time": _TIMES}, "set an alarm clock",
     ("Set an alarm for {time}.", "I need an alarm at {time}.", "Wake me up at {time}.")),
    ("call_contact", {"name": _NAMES}, "start a phone call",
     ("Call {name}.", "Ring {name} for me.", "Phone {name} please.")),
    ("find_recipe", {"dish": _DISHES}, "find a recipe for a dish",
     ("Find me a recipe for {dish}.", "I want to cook {dish} tonight.", "How do I make {dish}?")),
    ("find_restaurant", {"cuisine": _CUISINES, "city": _CITIES}, "find a restaurant",
     ("Find a {cuisine} restaurant in {city}.", "Any good {cuisine} places in {city}?",
      "Where can I eat {cuisine} food in {city}?")),
    ("add_reminder", {"task": _TASKS, "day": _DAYS}, "add a reminder",
     ("Remind me to {task} on {day}.", "Add a reminder for {day}: {task}.",
      "Don't let me forget to {task} on {day}.")),
    ("book_taxi", {"destination": _CITIES, "time": _TIMES}, "book a taxi ride",
     ("Book a taxi to {destination} at {time}.", "Get me a taxi to {destination} for {time}.",
      "I need a cab to {destination} at {time}.")),
)

def tool_line(tool) -> str:
    """'- get_weather(city, day): the weather forecast for a city'."""
    name, arguments, description, _ = tool
    return f"- {name}({', '.join(arguments)}): {description}"


def demonstration(name: str, arguments: dict) -> str:
    """The gold call in the ToolAlpaca format."""
    return f"Action: {name}\nAction Input: {json.dumps(arguments)}"


def _split_pool(pool: tuple, rng: random.Random) -> tuple[list, list]:
    """A value pool cut in two disjoint halves (train, held out), at random."""
    values = list(pool)
    rng.shuffle(values)
    half = len(values) // 2
    return values[:half], values[half:]


def _draw(arguments: dict, pools: dict, rng: random.Random) -> dict:
    """Argument values from the given pools; distinct values for arguments that share a pool."""
    values = {}
    for argument, pool in arguments.items():
        choices = [v for v in pools[id(pool)] if v not in values.values()]
        values[argument] = rng.choice(choices)
    return values


def _rows(part: str, per_tool: int, pools: dict, phrasings: slice, rng: random.Random) -> list[dict]:
    rows = []
    for tool in TOOLS:
        name, arguments, _, templates = tool
        seen = set()
        for index in range(per_tool):
            for _ in range(100):   # distinct requests within a part
                values = _draw(arguments, pools, rng)
                template = rng.choice(templates[phrasings])
                request = template.format(**values)
                if request not in seen:
                    break
            seen.add(request)
            shown = rng.sample([t for t in TOOLS if t[0] != name], TOOLS_SHOWN - 1) + [tool]
            rng.shuffle(shown)
            question = "Tools:\n" + "\n".join(tool_line(t) for t in shown) + f"\nRequest: {request}"
            golden = [{"Action": name, "Action_Input": json.dumps(values)}]
            rows.append({"id": f"{part}/{name}/{index}", "inputs": {"question": question}, "expected": golden,
                         "demonstration": demonstration(name, values), "task": "tooluse"})
    return rows


def build() -> dict[str, list[dict]]:
    """All rows, keyed by the file they go to (relative to this folder)."""
    rng = random.Random(SEED)
    halves = {}   # every value pool is split once, so a value shared by several tools is on one side only
    for tool in TOOLS:
        for pool in tool[1].values():
            if id(pool) not in halves:
                halves[id(pool)] = _split_pool(pool, rng)
    train = _rows("train", TRAIN_PER_TOOL, {k: v[0] for k, v in halves.items()}, slice(0, 2), rng)
    heldout = _rows("heldout", HELDOUT_PER_TOOL, {k: v[1] for k, v in halves.items()}, slice(2, 3), rng)
    rng.shuffle(train)
    heldout_tasks = [{"task_id": row["id"], "instruction": row["inputs"]["question"],
                      "verifier": {"kind": "in_process", "fn_name": "tool_calls_match", "expected": row["expected"]}}
                     for row in heldout]
    return {"train.jsonl": train, "heldout.jsonl": heldout, "heldout/tasks.jsonl": heldout_tasks}


def write(folder: Path = HERE) -> None:
    write_files(build(), folder)


def main(argv=None) -> None:
    generator_main(argv, description=__doc__.splitlines()[0], build=build, folder=HERE, train=HERE / "train.jsonl",
                   heldout=HERE / "heldout.jsonl", retention=RETENTION_SET)


if __name__ == "__main__":
    main()
