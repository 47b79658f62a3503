"""PromptExample, the unit of SDFT data, and its loaders: evsys-style JSONL, the chat formats TRL users
have (`messages`; `prompt`/`completion`; TRL SDFT's `prompt`/`privileged_context`), question/answer
columns, the official tool-use and science folders (train and eval schemas), and deterministic splits.

Where rows come from (`read_rows`): a .jsonl/.json/.parquet file, a `save_to_disk` folder, a folder of data
files, or a hub dataset id with its config, split and revision (downloaded once into the Hugging Face cache).

Every loader returns a list of PromptExample in file order. Example ids:
- tool use: "<API name>/<row index>" (the API name is what `split_examples(by="api")` groups by);
- science: "science/<row index>"; chat formats and question/answer rows: "<file stem or split>/<row index>";
- evsys JSONL: the row's "id" (or "task_id") if present, else "<file stem>/<line number>".

Degenerate rows are refused when they load, with the file and line (JSONL) or the row index and column
(folders and datasets): a null or blank expected answer or demonstration (a demonstration of "" or
"null" teaches the teacher nothing), a tool-use golden answer with no calls, and a blank question (a
user turn whose row fields are all blank). A field of the wrong type (a chat-message list where text is
formatted, a message whose content is not text) is an error naming the row and column, never turned into
text. Files that are not UTF-8 are errors naming the line.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

from sdft.io import read_text
from sdft.verifiers import parse_golden_answer

TASKS = ("tooluse", "science", "generic")
QUICKSTART_DIR = Path(__file__).resolve().parent / "datasets" / "quickstart"

# Used by load_science(thinking_format=True) in place of the stored system message, whose
# <reasoning>/<answer> format instruction would contradict the thinking-format demonstration.
THINKING_SYSTEM_PROMPT = (
    "You are given a chemistry question with four options labelled A, B, C and D. Think it through "
    "step by step, then end your reply with one final line of the form \"The answer is X.\", where X "
    "is the letter of the correct option."
)

_SCIENCE_OUTPUT = re.compile(r"^\s*<reasoning>\s*(.*?)\s*</reasoning>\s*<answer>\s*([A-Da-d])\s*</answer>\s*$",
                             re.DOTALL)


@dataclass(frozen=True)
class PromptExample:
    """One SDFT prompt.

    messages: the student's chat messages (an optional system message, then the user turn last).
    demonstration: the gold response shown to the teacher in context.
    answer: what the task's scorer checks: tool-use golden_answer (list of {"Action", "Action_Input"}),
        a science MCQ letter, or an expected string.
    task: "tooluse" | "science" | "generic"; selects the scorer.
    sft_target: the SFT baseline's target completion when it differs from the demonstration
        (science with thinking_format); None means the demonstration.
    """

    id: str
    messages: tuple[dict, ...]
    demonstration: str
    answer: Any = None
    task: str = "generic"
    sft_target: str | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"example {self.id!r}: task {self.task!r} is not one of {list(TASKS)}")
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ValueError(f"example {self.id!r}: messages must end with a user turn, got {self.messages!r}")
        require_text(self.messages[-1].get("content"), f"example {self.id!r}: the user turn")
        require_text(self.demonstration, f"example {self.id!r}: demonstration")

    @property
    def target(self) -> str:
        """The SFT baseline's target completion."""
        return self.demonstration if self.sft_target is None else self.sft_target


def require_text(value: Any, what: str) -> str:
    """`value` if it is a string with at least one non-space character, else a ValueError that starts
    with `what` (the file and line or row, and the field) and says what is allowed."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {'null' if value is None else type(value).__name__} "
                         f"{value!r:.80}; allowed: a string with at least one non-space character")
    if not value.strip():
        raise ValueError(f"{what} is blank ({value!r:.20}); allowed: a string with at least one non-space "
                         "character")
    return value


def iter_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a UTF-8 text file (a byte-order mark is dropped); a line that is not
    UTF-8 is a ValueError naming the file, the line and the column of the first bad byte."""
    path = Path(path)
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                 f"{error.start + 1}); save the file as UTF-8") from None


# ----------------------------------------------------------------------------------------------- JSONL

def _format_user(template: str, fields: dict, where: str, describe: Callable[[str], str]) -> str:
    """`template.format(**fields)`; refuses a field that is missing or null, and a user turn to which the
    row contributes nothing (every field it uses is blank). `describe(name)` names a field for errors."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    roots = []
    for name in names:
        if name == "" or name.isdigit():
            raise ValueError(f"user_template {template!r} has a positional field; use named fields such as "
                             "{question}")
        root = name.split(".")[0].split("[")[0]
        if root not in fields:
            raise ValueError(f"{where}: user_template field {{{name}}} is not among the row's inputs "
                             f"{sorted(fields)}")
        if fields[root] is None:
            raise ValueError(f"{where}: {describe(root)} is null; allowed: text with at least one non-space "
                             f"character (the user turn is rendered by user_template {template!r})")
        if isinstance(fields[root], (list, tuple, dict)):
            shape = "a list (a conversation?)" if isinstance(fields[root], (list, tuple)) else "a mapping"
            raise ValueError(f"{where}: {describe(root)} is {shape}, not text: user_template {template!r} formats "
                             "text fields only; for prompts given as chat messages use data.kind=prompt_completion, "
                             "messages or privileged_context")
        roots.append(root)
    text = template.format(**fields)
    used = list(dict.fromkeys(roots))
    blank = [root for root in used if isinstance(fields[root], str) and not fields[root].strip()]
    if not text.strip() or (used and len(blank) == len(used)):
        shown = ", ".join(describe(root) for root in blank) or "the user turn"
        raise ValueError(f"{where}: {shown} is blank, so the user turn rendered by user_template {template!r} "
                         "holds no question; allowed: text with at least one non-space character")
    return text


def _chat(user: str, system_prompt: str | None) -> tuple[dict, ...]:
    user_turn = {"role": "user", "content": user}
    if system_prompt is None:
        return (user_turn,)
    return ({"role": "system", "content": system_prompt}, user_turn)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _require_answer(value: Any, what: str) -> Any:
    """An expected answer that is both the scorer's reference and (JSON-encoded if not a string) the
    demonstration: not null, not blank, not an empty list or object, no blank string in a list."""
    allowed = ("allowed: a string with at least one non-space character, a non-empty list of such strings, "
               "or another non-empty JSON value")
    if value is None:
        raise ValueError(f"{what} is null (the demonstration would be the text 'null'); {allowed}")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{what} is blank ({value!r:.20}); {allowed}")
    elif isinstance(value, (list, dict)) and not value:
        raise ValueError(f"{what} is an empty {type(value).__name__}; {allowed}")
    elif isinstance(value, list):
        for index, option in enumerate(value):
            if option is None or (isinstance(option, str) and not option.strip()):
                raise ValueError(f"{what}[{index}] is {'null' if option is None else 'blank'}; {allowed}")
    return value


def load_jsonl_examples(path: str | Path, user_template: str = "{question}",
                        system_prompt: str | None = None) -> list[PromptExample]:
    """Read evsys PromptExample rows `{"inputs": {"question": ...}, "expected": ...}`.

    The user turn is `user_template.format(**inputs)`; `expected` is both the demonstration and the
    answer (a non-string expected is JSON-encoded for the demonstration). Optional row keys:
    "demonstration" (overrides the demonstration), "id" or "task_id", "task". Blank lines are skipped.
    Refused, naming the file, line and field: a null or blank "expected" or "demonstration" (or an empty
    list or object, or a blank string in a list), and a question that renders to nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {str(path)!r} does not exist")
    examples = []
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        inputs = row.get("inputs")
        if not isinstance(inputs, dict):
            raise ValueError(f"{where}: missing or non-object field 'inputs' (got {inputs!r}); "
                             "expected {\"inputs\": {\"question\": ...}, \"expected\": ...}")
        if "expected" not in row:
            raise ValueError(f"{where}: missing field 'expected'; "
                             "expected {\"inputs\": {\"question\": ...}, \"expected\": ...}")
        _require_answer(row["expected"], f"{where}: field 'expected'")
        shown = row["demonstration"] if "demonstration" in row else row["expected"]
        demonstration = _as_text(_require_answer(shown, f"{where}: field 'demonstration'"))
        task = row.get("task", "generic")
        if task not in TASKS:
            raise ValueError(f"{where}: task {task!r} is not one of {list(TASKS)}")
        example_id = str(row.get("id", row.get("task_id", f"{path.stem}/{lineno}")))
        user = _format_user(user_template, inputs, where, lambda name: f"field 'inputs.{name}'")
        examples.append(PromptExample(id=example_id, messages=_chat(user, system_prompt),
                                      demonstration=demonstration, answer=row["expected"], task=task))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


# ------------------------------------------------------------------------------------ save_to_disk

def _load_disk(path: str | Path, split: str | None):
    """A datasets.Dataset from a save_to_disk folder: `split` selects from a DatasetDict and is ignored
    for a folder holding a single Dataset."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset folder {str(path)!r} does not exist "
                                "(expected a folder written by datasets' save_to_disk)")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path}: split {split!r} is not in the folder; available: {sorted(loaded)}")
        return loaded[split]
    return loaded


def _require_columns(dataset, path, required: Sequence[str], schema: str):
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} for the {schema} schema; "
                         f"columns present: {dataset.column_names}")


def _messages_from(value: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: expected a non-empty list of chat messages, got {value!r:.200}")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: each message needs 'role' and 'content', got {message!r:.200}")
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise ValueError(f"{where}[{index}]: '{key}' must be text, got "
                                 f"{type(message[key]).__name__} {message[key]!r:.120}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user turn, got role {messages[-1]['role']!r}")
    require_text(messages[-1]["content"], f"{where}: the user turn's content (the question)")
    return tuple(messages)


def tool_calls_demonstration(golden_answer: Sequence[dict]) -> str:
    """A demonstration built from golden_answer alone (eval rows carry no golden_response): one
    "Action: <name>" line and one "Action Input: <json>" line per call, in order."""
    lines = []
    for call in golden_answer:
        lines.append(f"Action: {call['Action']}")
        lines.append(f"Action Input: {call['Action_Input']}")
    return "\n".join(lines)


def load_tooluse(path: str | Path, split: str | None = None) -> list[PromptExample]:
    """Tool-use rows (ToolAlpaca-derived) from a save_to_disk folder, in either schema:

    - train: prompt, name, golden_answer, golden_response (list of lines); demonstration = the lines
      joined with "\\n";
    - eval (no golden_response): demonstration = `tool_calls_demonstration(golden_answer)`.

    The student message is the single user turn `prompt` (tool documentation, format instructions and
    the question). answer = golden_answer as a list of {"Action", "Action_Input"}. Ids are
    "<name>/<row index>".
    """
    dataset = _load_disk(path, split)
    _require_columns(dataset, path, ["prompt", "name", "golden_answer"], "tool-use")
    has_response = "golden_response" in dataset.column_names
    examples = []
    for index, row in enumerate(dataset):
        where = f"{path} row {index}"
        require_text(row["prompt"], f"{where}: column 'prompt' (the question)")
        calls = row["golden_answer"]
        if not isinstance(calls, list) or not all(
                isinstance(c, dict) and "Action" in c and "Action_Input" in c for c in calls):
            raise ValueError(f"{where}: 'golden_answer' must be a list of {{'Action', 'Action_Input'}}, "
                             f"got {calls!r:.200}")
        try:
            parse_golden_answer(calls)
        except ValueError as error:
            raise ValueError(f"{where}: column 'golden_answer': {error}") from None
        answer = [{"Action": c["Action"], "Action_Input": c["Action_Input"]} for c in calls]
        response = row["golden_response"] if has_response else None
        if response is None:
            demonstration = tool_calls_demonstration(answer)
        elif isinstance(response, str):
            demonstration = response
        elif isinstance(response, list) and all(isinstance(line, str) for line in response):
            demonstration = "\n".join(response)
        else:
            raise ValueError(f"{where}: 'golden_response' must be a list of lines, got {response!r:.200}")
        require_text(demonstration, f"{where}: column 'golden_response' (the demonstration)")
        examples.append(PromptExample(
            id=f"{row['name']}/{index}", messages=({"role": "user", "content": row["prompt"]},),
            demonstration=demonstration, answer=answer, task="tooluse"))
    return examples


def _thinking_messages(messages: tuple[dict, ...]) -> tuple[dict, ...]:
    rest = [m for m in messages if m["role"] != "system"]
    return ({"role": "system", "content": THINKING_SYSTEM_PROMPT}, *rest)


def load_science(path: str | Path, thinking_format: bool = False,
                 split: str | None = None) -> list[PromptExample]:
    """Science MCQ rows (SciKnowEval Chemistry L3) from a save_to_disk folder, in either schema:

    - train: messages = [system, user], output_text = "<reasoning>\\n...\\n</reasoning>\\n<answer>\\nX\\n</answer>";
      demonstration = output_text, answer = its letter;
    - eval: prompt = [system, user], answer = letter; these rows have no reasoning, so the
      demonstration is the answer block alone: "<answer>\\nX\\n</answer>".

    thinking_format=True (cookbook, for thinking models): the demonstration becomes
    "{reasoning}\\n\\nThe answer is X." (eval rows: "The answer is X."), the SFT target
    "<think>\\n{reasoning}\\n</think>\\n\\nThe answer is X.", and the stored system message is replaced
    by THINKING_SYSTEM_PROMPT. Ids are "science/<row index>".
    """
    dataset = _load_disk(path, split)
    columns = dataset.column_names
    if "messages" in columns and "output_text" in columns:
        schema = "train"
    elif "prompt" in columns and "answer" in columns:
        schema = "eval"
    else:
        raise ValueError(f"{path}: not a science folder: expected columns messages + output_text (train) "
                         f"or prompt + answer (eval), got {columns}")
    examples = []
    for index, row in enumerate(dataset):
        where = f"{path} row {index}"
        sft_target = None
        if schema == "train":
            messages = _messages_from(row["messages"], f"{where} 'messages'")
            output_text = row["output_text"]
            if not isinstance(output_text, str):
                raise ValueError(f"{where}: 'output_text' must be a string, got {output_text!r:.200}")
            require_text(output_text, f"{where}: column 'output_text' (the demonstration)")
            letter = output_text.split("<answer>")[-1].split("</answer>")[0].strip().upper()
            answer = letter if letter in ("A", "B", "C", "D") else None
            demonstration = output_text
            if thinking_format:
                match = _SCIENCE_OUTPUT.match(output_text)
                if match is None:
                    raise ValueError(f"{where}: thinking_format needs output_text of the form "
                                     f"<reasoning>...</reasoning><answer>X</answer>, got {output_text!r:.200}")
                reasoning, answer = match.group(1), match.group(2).upper()
                demonstration = f"{reasoning}\n\nThe answer is {answer}."
                sft_target = f"<think>\n{reasoning}\n</think>\n\nThe answer is {answer}."
        else:
            messages = _messages_from(row["prompt"], f"{where} 'prompt'")
            answer = str(row["answer"]).strip().upper()
            if answer not in ("A", "B", "C", "D"):
                raise ValueError(f"{where}: 'answer' must be one of A, B, C, D, got {row['answer']!r}")
            demonstration = f"<answer>\n{answer}\n</answer>"
            if thinking_format:
                demonstration = f"The answer is {answer}."
        if thinking_format:
            messages = _thinking_messages(messages)
        examples.append(PromptExample(id=f"science/{index}", messages=messages, demonstration=demonstration,
                                      answer=answer, task="science", sft_target=sft_target))
    return examples


# ------------------------------------------------------------------------------------------ sources

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk


@dataclass(frozen=True)
class Rows:
    """The rows of a dataset as plain dicts, each with `where` it came from ("<file>:<line>" or
    "<source> row <i>") for error messages; `label` prefixes example ids ("<label>/<index>")."""
    source: str
    label: str
    rows: tuple[tuple[str, dict], ...]

    @property
    def columns(self) -> list[str]:
        return sorted({key for _, row in self.rows for key in row})


def read_rows(path_or_name: str | Path, *, split: str | None = "train", config: str | None = None,
              revision: str | None = None) -> Rows:
    """Read a dataset's rows from:

    - a data file: `.jsonl` (one JSON object per line; errors name the line), `.json` (a list of objects)
      or `.parquet`;
    - a folder written by `save_to_disk` (`split` picks from a DatasetDict and is ignored for a single
      Dataset), or a folder of data files laid out like a hub dataset repository (`config`, `split`);
    - a hub dataset id (`config`, `split`, `revision`), loaded with `datasets.load_dataset`: downloaded on first
      use into the Hugging Face cache, then read from it; HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are honoured,
      and a repository already in the hub cache (e.g. fetched with `hf download --repo-type dataset`) is read
      from there when the hub cannot be reached.
    """
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        if config is not None:
            raise ValueError(f"{path}: data.hf_config={config!r} applies to hub datasets and data folders, not to "
                             "a single file")
        return _file_rows(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _DISK_MARKERS):
            if config is not None:
                raise ValueError(f"{path}: data.hf_config={config!r} does not apply to a save_to_disk folder "
                                 "(it has splits, not configs)")
            return _dataset_rows(_load_disk(path, split), str(path), split)
        return _dataset_rows(_load_folder(path, config, split), str(path), split)
    if path.suffix in DATA_FILE_SUFFIXES or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"data file or folder {text!r} does not exist (nor is it a hub dataset id "
                                "of the form 'name' or 'owner/name')")
    return _dataset_rows(_load_hub(text, config, split, revision), text, split)


def _file_rows(path: Path) -> Rows:
    if path.suffix not in DATA_FILE_SUFFIXES:
        raise ValueError(f"{path}: unknown data file type {path.suffix or '(none)'!r}; allowed: "
                         f"{', '.join(DATA_FILE_SUFFIXES)}, or a dataset folder")
    rows: list[tuple[str, dict]] = []
    if path.suffix == ".jsonl":
        for lineno, line in iter_text_lines(path):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
            rows.append((f"{path}:{lineno}", row))
    elif path.suffix == ".json":
        try:
            data = json.loads(read_text(path, encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: malformed JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of row objects, got {type(data).__name__} "
                             "(one object per line is a .jsonl file)")
        rows = [(f"{path} row {index}", row) for index, row in enumerate(data)]
    else:
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise ValueError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
        rows = [(f"{path} row {index}", row) for index, row in enumerate(table.to_pylist())]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object (one row), got {type(row).__name__}")
    if not rows:
        raise ValueError(f"{path}: no rows (the file is empty)")
    return Rows(source=str(path), label=path.stem, rows=tuple(rows))


def _dataset_rows(dataset, source: str, split: str | None) -> Rows:
    rows = tuple((f"{source} row {index}", dict(row)) for index, row in enumerate(dataset))
    if not rows:
        raise ValueError(f"dataset {source!r} split {split!r} has no rows")
    return Rows(source=source, label=split or "data", rows=rows)


def _load_folder(path: Path, config: str | None, split: str | None, what: str | None = None):
    """A folder of data files (the layout of a hub dataset repository) through `datasets.load_dataset`;
    `what` names it in errors (default: "dataset folder '<path>'")."""
    import datasets

    what = what or f"dataset folder {str(path)!r}"
    if split is None:
        raise ValueError(f"{what}: a split is needed (data.hf_split)")
    try:
        return datasets.load_dataset(str(path), config, split=split)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{what} (config {config!r}, split {split!r}): {error}") from None


def _load_hub(name: str, config: str | None, split: str | None, revision: str | None):
    """A hub dataset through `datasets.load_dataset`; when the hub cannot be reached (offline), the copy of
    the repository in the hub cache, if any."""
    import datasets

    if split is None:
        raise ValueError(f"dataset {name!r}: a hub dataset needs a split (data.hf_split)")
    try:
        return datasets.load_dataset(name, config, split=split, revision=revision)
    except ConnectionError as error:
        unreachable = error
    except (ValueError, FileNotFoundError) as error:  # unknown config or split, no such dataset
        raise ValueError(f"dataset {name!r} (config {config!r}, split {split!r}): {error}") from None
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(repo_id=name, repo_type="dataset", revision=revision, local_files_only=True)
    except Exception as error:  # huggingface_hub raises several types for "not cached" and "bad id"
        raise FileNotFoundError(
            f"dataset {name!r} could not be loaded from the hub ({unreachable}) and is not in the local Hugging "
            f"Face cache ({error.__class__.__name__}). Load it once on a machine with network access (or "
            f"`hf download --repo-type dataset {name}`) and copy the cache (HF_HOME) here, or pass a local "
            "data file or folder") from None
    return _load_folder(Path(local), config, split, what=f"dataset {name!r} (from the hub cache {local})")


# ---------------------------------------------------------------------------------------- HF datasets

def load_hf_dataset(path_or_name: str, split: str | None, question_field: str, answer_field: str,
                    user_template: str = "{question}", system_prompt: str | None = None,
                    config: str | None = None, revision: str | None = None) -> list[PromptExample]:
    """Question/answer rows from any `read_rows` source (a file, a dataset folder or a hub id).

    The user turn is user_template formatted with the row's columns plus `question` = the
    question_field column; the answer_field column is both answer and demonstration (JSON-encoded
    if not a string). task = "generic".
    """
    rows = read_rows(path_or_name, split=split, config=config, revision=revision)
    missing = [name for name in (question_field, answer_field) if name not in rows.columns]
    if missing:
        raise ValueError(f"{path_or_name}: missing column(s) {missing} for the question/answer schema; "
                         f"columns present: {rows.columns}")
    examples = []

    def describe(name: str) -> str:
        return f"column {(question_field if name == 'question' else name)!r}"

    for index, (where, row) in enumerate(rows.rows):
        fields = {**row, "question": row.get(question_field)}
        answer = _require_answer(row.get(answer_field), f"{where}: column {answer_field!r} (the answer)")
        user = _format_user(user_template, fields, where, describe)
        examples.append(PromptExample(id=f"{rows.label}/{index}", messages=_chat(user, system_prompt),
                                      demonstration=_as_text(answer), answer=answer, task="generic"))
    return examples


# ------------------------------------------------------------------------------ conversational rows

def _content(message: Any, where: str) -> tuple[str, str]:
    """(role, content) of a chat message whose role and content are text."""
    if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
        raise ValueError(f"{where}: expected a chat message {{'role': ..., 'content': ...}}, got {message!r:.160}")
    role, content = message["role"], message["content"]
    if not isinstance(role, str):
        raise ValueError(f"{where}: 'role' must be text, got {type(role).__name__} {role!r:.80}")
    if not isinstance(content, str):
        raise ValueError(f"{where}: 'content' must be text, got {type(content).__name__} {content!r:.120}; "
                         "allowed: a string (messages with content parts are not supported)")
    return role, content


def _prompt_messages(value: Any, where: str) -> tuple[dict, ...]:
    """A prompt column: a string (one user turn) or a list of chat messages ending with the user turn."""
    if isinstance(value, str):
        require_text(value, where)
        return ({"role": "user", "content": value},)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be text or a non-empty list of chat messages, got "
                         f"{'null' if value is None else type(value).__name__} {value!r:.120}")
    messages = tuple(dict(zip(("role", "content"), _content(m, f"{where}[{i}]"))) for i, m in enumerate(value))
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user turn, got role {messages[-1]['role']!r}")
    require_text(messages[-1]["content"], f"{where}[{len(messages) - 1}]: the user turn's content")
    return messages


def _assistant_text(value: Any, where: str) -> str:
    """A completion column: a string, or a list holding exactly one assistant message."""
    if isinstance(value, str):
        return require_text(value, where)
    if not isinstance(value, (list, tuple)) or len(value) != 1:
        raise ValueError(f"{where} must be text or a list of exactly one assistant message, got "
                         f"{'null' if value is None else type(value).__name__} {value!r:.120}")
    role, content = _content(value[0], f"{where}[0]")
    if role != "assistant":
        raise ValueError(f"{where}[0]: the completion must be an assistant message, got role {role!r}")
    return require_text(content, f"{where}[0]: the assistant's content")


def _context_text(value: Any, where: str) -> str:
    """A privileged_context column: a string, or chat messages whose contents are joined by newlines."""
    if isinstance(value, str):
        return require_text(value, where)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be text or a non-empty list of chat messages, got "
                         f"{'null' if value is None else type(value).__name__} {value!r:.120}")
    text = "\n".join(_content(m, f"{where}[{i}]")[1] for i, m in enumerate(value))
    return require_text(text, f"{where} (the messages' contents)")


def _messages_row(row: dict, where: str) -> tuple[tuple[dict, ...], str]:
    value = row.get("messages")
    column = f"{where}: column 'messages'"
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise ValueError(f"{column} must be a list of chat messages ending with the assistant's answer, got "
                         f"{'null' if value is None else type(value).__name__} {value!r:.120}")
    role, answer = _content(value[-1], f"{column}[{len(value) - 1}]")
    if role != "assistant":
        raise ValueError(f"{column}[{len(value) - 1}]: the last message must be the assistant's answer (the "
                         f"demonstration), got role {role!r}")
    require_text(answer, f"{column}[{len(value) - 1}]: the assistant's content (the demonstration)")
    return _prompt_messages(list(value[:-1]), column), answer


def _prompt_completion_row(row: dict, where: str) -> tuple[tuple[dict, ...], str]:
    return (_prompt_messages(row.get("prompt"), f"{where}: column 'prompt'"),
            _assistant_text(row.get("completion"), f"{where}: column 'completion'"))


def _privileged_context_row(row: dict, where: str) -> tuple[tuple[dict, ...], str]:
    return (_prompt_messages(row.get("prompt"), f"{where}: column 'prompt'"),
            _context_text(row.get("privileged_context"), f"{where}: column 'privileged_context'"))


CONVERSATIONAL_KINDS: Mapping[str, tuple[tuple[str, ...], Callable[[dict, str], tuple[tuple[dict, ...], str]]]] = \
    MappingProxyType({"messages": (("messages",), _messages_row),
                      "prompt_completion": (("prompt", "completion"), _prompt_completion_row),
                      "privileged_context": (("prompt", "privileged_context"), _privileged_context_row)})
"""kind -> (required columns, row -> (student messages, demonstration))."""


def _load_conversational(kind: str, path_or_name: str | Path, split: str | None, config: str | None,
                         revision: str | None, answer_field: str) -> list[PromptExample]:
    columns, convert = CONVERSATIONAL_KINDS[kind]
    rows = read_rows(path_or_name, split=split, config=config, revision=revision)
    missing = [name for name in columns if name not in rows.columns]
    if missing:
        fitting = [other for other, (needed, _) in CONVERSATIONAL_KINDS.items() if set(needed) <= set(rows.columns)]
        hint = f"; these columns fit data.kind={' or '.join(fitting)}" if fitting else ""
        raise ValueError(f"{rows.source}: data.kind={kind} needs the column(s) {', '.join(columns)}; missing "
                         f"{', '.join(missing)} (columns present: {', '.join(rows.columns)}){hint}")
    examples = []
    for index, (where, row) in enumerate(rows.rows):
        messages, demonstration = convert(row, where)
        answer = demonstration
        if row.get(answer_field) is not None:
            answer = _require_answer(row[answer_field], f"{where}: column {answer_field!r} (the reference answer)")
        examples.append(PromptExample(id=f"{rows.label}/{index}", messages=messages, demonstration=demonstration,
                                      answer=answer, task="generic"))
    return examples


def load_messages(path_or_name: str | Path, split: str | None = "train", config: str | None = None,
                  revision: str | None = None, answer_field: str = "answer") -> list[PromptExample]:
    """Rows `{"messages": [..., {"role": "user", ...}, {"role": "assistant", "content": demonstration}]}`: the
    last assistant turn is the demonstration, the messages before it (ending with the user turn) the prompt.
    The held-out reference is the `answer_field` column when the row has one, else the demonstration."""
    return _load_conversational("messages", path_or_name, split, config, revision, answer_field)


def load_prompt_completion(path_or_name: str | Path, split: str | None = "train", config: str | None = None,
                           revision: str | None = None, answer_field: str = "answer") -> list[PromptExample]:
    """Rows `{"prompt": text or messages, "completion": text or [one assistant message]}` (TRL's
    prompt-completion format, standard or conversational): the completion is the demonstration."""
    return _load_conversational("prompt_completion", path_or_name, split, config, revision, answer_field)


def load_privileged_context(path_or_name: str | Path, split: str | None = "train", config: str | None = None,
                            revision: str | None = None, answer_field: str = "answer") -> list[PromptExample]:
    """Rows `{"prompt": text or messages, "privileged_context": text or messages}` (TRL's SDFT format): the
    privileged context (message contents joined by newlines) is what the teacher sees, the demonstration."""
    return _load_conversational("privileged_context", path_or_name, split, config, revision, answer_field)


def with_system_prompt(example: PromptExample, system_prompt: str | None) -> PromptExample:
    """`example` with `system_prompt` as its only system turn (first); unchanged when it is None."""
    if system_prompt is None:
        return example
    rest = tuple(message for message in example.messages if message.get("role") != "system")
    return dataclasses.replace(example, messages=({"role": "system", "content": system_prompt}, *rest))


# --------------------------------------------------------------------------------------------- splits

def example_group(example: PromptExample) -> str:
    """The group an example belongs to for split_examples(by="api"): its id up to the last "/"
    (the API name for tool-use examples)."""
    if "/" not in example.id:
        raise ValueError(f"example id {example.id!r} has no '<group>/' prefix; split by='api' needs ids "
                         "like '<API name>/<index>' (as load_tooluse writes)")
    return example.id.rsplit("/", 1)[0]


def split_examples(examples: Sequence[PromptExample], *, by: str = "random", test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[list[PromptExample], list[PromptExample]]:
    """Deterministic (train, test) split; both keep the input order.

    by="random": round(test_fraction * n) examples (at least 1, at most n - 1) drawn with
    random.Random(seed). by="api": whole groups (`example_group`, the tool-use API name) go to test:
    round(test_fraction * number of groups) of them (at least 1, at most all but one), drawn from the
    sorted group names with random.Random(seed), so that no test API appears in training.
    """
    if by not in ("random", "api"):
        raise ValueError(f"split by={by!r} is not allowed; allowed: 'random', 'api'")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    examples = list(examples)
    rng = random.Random(seed)
    if by == "random":
        if len(examples) < 2:
            raise ValueError(f"cannot split {len(examples)} example(s) into non-empty train and test parts")
        n_test = min(max(1, round(test_fraction * len(examples))), len(examples) - 1)
        test_index = set(rng.sample(range(len(examples)), n_test))
        return ([e for i, e in enumerate(examples) if i not in test_index],
                [e for i, e in enumerate(examples) if i in test_index])
    groups = sorted({example_group(e) for e in examples})
    if len(groups) < 2:
        raise ValueError(f"split by='api' needs at least 2 APIs, got {groups}")
    n_test = min(max(1, round(test_fraction * len(groups))), len(groups) - 1)
    test_groups = set(rng.sample(groups, n_test))
    return ([e for e in examples if example_group(e) not in test_groups],
            [e for e in examples if example_group(e) in test_groups])


# ------------------------------------------------------------------------------------------- dispatch

LOADERS: Mapping[str, Callable[..., list[PromptExample]]] = MappingProxyType({
    "jsonl": load_jsonl_examples,
    "tooluse": load_tooluse,
    "science": load_science,
    "hf": load_hf_dataset,
    "messages": load_messages,
    "prompt_completion": load_prompt_completion,
    "privileged_context": load_privileged_context,
})


def load_examples(kind: str, path: str | Path, **options) -> list[PromptExample]:
    """Load examples with the loader for `kind` ("jsonl", "tooluse", "science", "hf"); `options` are
    that loader's keyword arguments."""
    if kind not in LOADERS:
        raise ValueError(f"data kind {kind!r} is not allowed; allowed: {sorted(LOADERS)}")
    loader = LOADERS[kind]
    parameters = list(inspect.signature(loader).parameters.values())[1:]
    allowed = [p.name for p in parameters]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"data kind {kind!r}: unknown option(s) {unknown}; allowed: {allowed}")
    missing = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in options]
    if missing:
        raise ValueError(f"data kind {kind!r}: missing required option(s) {missing}")
    return loader(path, **options)
