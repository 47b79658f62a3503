"""Typed configuration sections: frozen dataclasses read from YAML plus `key=value` overrides.

The schema is declarative: a field's type gives its parser (`Literal[...]` lists the allowed values,
`Optional[...]` allows `null`), and `setting(default, ge=..., gt=..., le=..., lt=..., check=...)` gives its
range or a custom check, so adding a setting is one line. A section may define `check(self) -> str | None`
for rules between its own fields; it runs once, when the section is built. Every error is a ValueError that
names the dotted key, where it came from (`file:line` for YAML, the override text for `key=value`), the
value received and what is allowed. Floats must be finite.

This module knows nothing about sdft's sections: `sdft.config` declares them and `sdft.objectives` the
objective sections; `load_tree` builds any root section class from YAML and overrides.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import yaml

__all__ = ["Section", "setting", "subsection", "load_tree", "override_tree", "section_to_dict", "describe_type",
           "schema_rows"]

KeyPath = tuple  # a dotted key as a tuple of names (str) and list indices (int)


def setting(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    """A dataclass field with range bounds (applied to non-null values), an optional check that returns an
    error text (or None when the value is fine), and a one-line description (`doc`, shown by `schema_rows`)."""
    meta = {key: value for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("check", check))
            if value is not None}
    if doc:
        meta["doc"] = doc
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def subsection(cls: type, doc: str = "") -> Any:
    return field(default_factory=cls, metadata={"doc": doc} if doc else {})


class Section:
    """Base of the config dataclasses: `from_dict` builds and checks one from plain data, `to_dict` the reverse.
    Subclasses may define `check(self) -> str | None` for rules between their own fields."""

    def check(self) -> str | None:
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return _Builder(cls, {}, {}).build(cls, data, ())

    def to_dict(self) -> dict[str, Any]:
        return section_to_dict(self)


def section_to_dict(section: Any) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML- and JSON-serializable)."""
    return dataclasses.asdict(section)


def load_tree(root: type, path: str | os.PathLike | None, overrides: Sequence[str] = (), *,
              moved: Mapping[str, str] | None = None) -> Any:
    """Read the YAML file at `path` (None: all defaults), apply `key=value` overrides in order and build the
    `root` section, type-checking every field. `moved` maps old dotted keys to their new names: an old key
    gives an error naming the new one."""
    data: dict[str, Any] = {}
    sources: dict[KeyPath, str] = {}
    if path is not None:
        data, sources = _read_yaml(os.fspath(path))
    builder = _Builder(root, sources, moved or {})
    data = builder.apply_overrides(data, overrides)
    return builder.build(root, data, ())


def override_tree(section: Any, overrides: Sequence[str], *, moved: Mapping[str, str] | None = None) -> Any:
    """A copy of `section` with `key=value` overrides applied and type-checked."""
    root = type(section)
    builder = _Builder(root, {}, moved or {})
    data = builder.apply_overrides(section_to_dict(section), overrides)
    return builder.build(root, data, ())


def schema_rows(root: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type and allowed values, default, description) for every setting under `root`; the
    fields of a list of sections are listed under `<key>[i].` after the list itself."""
    rows = []
    hints = typing.get_type_hints(root)
    defaults = root()
    for f in dataclasses.fields(root):
        key = f"{prefix}{f.name}"
        tp = _strip_optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, key + "."))
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        meta = f.metadata
        bounds = [f"{op} {meta[name]}" for name, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                  if name in meta]
        kind = describe_type(hints[f.name]) + (f" ({', '.join(bounds)})" if bounds else "")
        value = getattr(defaults, f.name)
        default = "[]" if value == [] else "{}" if value == {} else ("null" if value is None else
                                            yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
                                            .removesuffix("...").strip())
        rows.append((key, kind, default, meta.get("doc", "")))
        if _is_section(item):
            rows.extend(schema_rows(item, key + "[i]."))
    return rows


# ------------------------------------------------------------------------------------------ reading YAML
def _read_yaml(filename: str) -> tuple[dict[str, Any], dict[KeyPath, str]]:
    try:
        with open(filename, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"cannot read config file {filename}: not UTF-8 text ({error.reason} at byte "
                         f"{error.start})") from None
    except OSError as error:
        raise ValueError(f"cannot read config file {filename}: {error.strerror or error}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark is not None else filename
        problem = getattr(error, "problem", None) or str(error)
        raise ValueError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ValueError(f"{filename}:{line}: the top level of a config must be a mapping of sections, "
                         f"got {type(data).__name__}")
    sources: dict[KeyPath, str] = {}
    _record_lines(node, (), filename, sources)
    return data, sources


def _record_lines(node: yaml.Node, path: KeyPath, filename: str, sources: dict[KeyPath, str]) -> None:
    """Map every dotted key of the composed YAML tree to `file:line`; duplicate keys are errors."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in seen:
                raise ValueError(f"{filename}:{line}: duplicate key {_format_path(path + (key_node.value,))!r} "
                                 f"(first given at line {seen[key_node.value]})")
            seen[key_node.value] = line
            sources[path + (key_node.value,)] = f"{filename}:{line}"
            _record_lines(value_node, path + (key_node.value,), filename, sources)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            sources[path + (index,)] = f"{filename}:{item.start_mark.line + 1}"
            _record_lines(item, path + (index,), filename, sources)


# ------------------------------------------------------------------------------------------ type helpers
def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def describe_type(tp: Any) -> str:
    """A reader's description of a field type: "one of 'a', 'b'", "an int or null", ..."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return " or ".join(describe_type(arg) for arg in inner) + " or null"
    if origin is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of names to values"
    if _is_section(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])*)*$")


class _Builder:
    """Applies overrides to and builds one root section class, knowing where every key came from."""

    def __init__(self, root: type, sources: dict[KeyPath, str], moved: Mapping[str, str]):
        self.root, self.sources, self.moved = root, sources, moved

    # -------------------------------------------------------------------------------------- overrides
    def apply_overrides(self, data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
        if isinstance(overrides, str):
            raise ValueError(f"overrides must be a sequence of 'key=value' strings, got the string {overrides!r}")
        data = _copy_tree(data)
        for text in overrides:
            if not isinstance(text, str) or "=" not in text:
                raise ValueError(f"override {text!r} is not of the form key=value (e.g. objective.targets=topk)")
            key, raw = text.split("=", 1)
            path = self._parse_key(key.strip(), text)
            self._check_override_path(path, text)
            target = self._type_at(path)
            stripped = raw.strip()
            if target in (str, Optional[str]) and not (len(stripped) >= 2 and stripped[0] == stripped[-1]
                                                       and stripped[0] in "'\""):
                # String fields take the text verbatim ({question}, "a: b", 2024); `null` where optional.
                value = None if target is Optional[str] and stripped in ("", "null", "~") else raw
            else:
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError as error:
                    raise ValueError(f"override {text!r}: the value is not valid YAML: "
                                     f"{getattr(error, 'problem', None) or error}") from None
            self._set_path(data, path, value, text)
            for known in [p for p in self.sources if p[:len(path)] == path]:
                del self.sources[known]
            self.sources[path] = f"override {text!r}"
        return data

    def _parse_key(self, key: str, text: str) -> KeyPath:
        if not _OVERRIDE_KEY.match(key):
            raise ValueError(f"override {text!r}: malformed key {key!r}; expected dotted names with optional "
                             "list indices, e.g. objective.targets=topk or eval.benchmarks[0].max_items=10")
        path: list[Any] = []
        for part in key.split("."):
            name, *indices = re.split(r"\[", part)
            path.append(name)
            path.extend(int(index.rstrip("]")) for index in indices)
        return tuple(path)

    def _check_override_path(self, path: KeyPath, text: str) -> None:
        """Reject a moved key, and a key that descends into a plain value (e.g. objective.targets.inner)."""
        self._check_moved(path, f"override {text!r}")
        for end in range(1, len(path)):
            declared = self._type_at(path[:end])
            if declared is None:
                return  # an unknown key: the build names it with the allowed keys
            tp = _strip_optional(declared)
            if not _is_section(tp) and typing.get_origin(tp) is not list:
                raise ValueError(f"override {text!r}: {_format_path(path[:end])} is a single value "
                                 f"({describe_type(declared)}), not a section or a list")

    def _check_moved(self, path: KeyPath, where: str) -> None:
        dotted = _format_path(tuple(p for p in path if not isinstance(p, int)))
        for old, new in self.moved.items():
            if dotted == old or dotted.startswith(old + "."):
                raise ValueError(f"{where}: the key {dotted!r} has moved: use {new + dotted[len(old):]!r} instead")

    def _check_moved_section(self, path: KeyPath, value: Any) -> None:
        """An unknown key that moved: name the new key, or for a moved section the new key of each entry."""
        where = self._where(path)
        if isinstance(value, Mapping):
            moves = []
            for child in value:
                try:
                    self._check_moved(path + (str(child),), "")
                except ValueError as error:
                    moves.append(str(error).split("has moved: use ")[-1].removesuffix(" instead").join(
                        (f"{_format_path(path + (str(child),))} -> ", "")))
            if moves:
                raise ValueError(f"{_format_path(path)}{where}: this section has moved: " + "; ".join(moves))
        self._check_moved(path, f"{_format_path(path)}{where}")

    def _set_path(self, data: dict[str, Any], path: KeyPath, value: Any, text: str) -> None:
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            nxt = path[depth + 1]
            where = _format_path(path[:depth + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    raise ValueError(f"override {text!r}: index {part} is out of range for "
                                     f"{_format_path(path[:depth])} ({size} entries)")
                if not isinstance(node[part], dict):
                    raise ValueError(f"override {text!r}: {where} is not a mapping")
                node = node[part]
                continue
            if part not in node or node[part] is None:
                if isinstance(nxt, int):
                    default = self._default_at(path[:depth + 1])
                    node[part] = [section_to_dict(item) if dataclasses.is_dataclass(item) else item
                                  for item in default or []]
                else:
                    node[part] = {}
            child = node[part]
            if isinstance(nxt, int) and not isinstance(child, list):
                raise ValueError(f"override {text!r}: {where} is not a list")
            if isinstance(nxt, str) and not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {where} is not a mapping")
            node = child
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ValueError(f"override {text!r}: index {last} is out of range for {_format_path(path[:-1])} "
                                 f"({size} entries)")
        node[last] = value

    def _type_at(self, path: KeyPath) -> Any:
        """The declared type at a dotted key, or None when the key is not in the schema."""
        tp: Any = self.root
        for part in path:
            tp = _strip_optional(tp)
            if isinstance(part, int):
                if typing.get_origin(tp) is not list:
                    return None
                tp = typing.get_args(tp)[0]
            else:
                if not _is_section(tp):
                    return None
                hints = typing.get_type_hints(tp)
                if part not in hints:
                    return None
                tp = hints[part]
        return tp

    def _default_at(self, path: KeyPath) -> Any:
        value: Any = self.root()
        for part in path:
            try:
                value = value[part] if isinstance(part, int) else getattr(value, part)
            except (AttributeError, IndexError, TypeError):
                return None
        return value

    # ------------------------------------------------------------------------------------------ build
    def _where(self, path: KeyPath) -> str:
        for end in range(len(path), 0, -1):
            if path[:end] in self.sources:
                return f" ({self.sources[path[:end]]})"
        return ""

    def build(self, cls: type, data: Any, path: KeyPath) -> Any:
        name = _format_path(path) or "the config"
        if dataclasses.is_dataclass(data) and isinstance(data, cls):
            data = section_to_dict(data)
        if data is None and path:
            data = {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{name}{self._where(path)}: expected {describe_type(cls)}, got {data!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in data:
            if key not in fields:
                self._check_moved_section(path + (str(key),), data[key])
                dotted = _format_path(path + (str(key),))
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean {_format_path(path + (close[0],))!r}?" if close else ""
                scope = f"in {name}" if path else "at the top level"
                raise ValueError(f"unknown key {dotted!r}{self._where(path + (key,))}{hint} "
                                 f"Allowed keys {scope}: {', '.join(fields)}")
        values = {key: self._coerce(value, hints[key], path + (key,), fields[key].metadata)
                  for key, value in data.items()}
        for key in fields:  # sections left out are built from their defaults, so their own checks run too
            if key not in values and _is_section(_strip_optional(hints[key])):
                values[key] = self.build(_strip_optional(hints[key]), {}, path + (key,))
        section = cls(**values)
        problem = section.check() if isinstance(section, Section) else None
        if problem:
            where = f"{name}{self._where(path)}" if path else "invalid config"
            raise ValueError(f"{where}: {problem}")
        return section

    def _coerce(self, value: Any, tp: Any, path: KeyPath, meta: Mapping[str, Any]) -> Any:
        key = _format_path(path)
        where = self._where(path)
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            if value is None:
                return None
            tp = _strip_optional(tp)
            origin = typing.get_origin(tp)
        if _is_section(tp):
            return self.build(tp, value, path)

        def fail(problem: str) -> ValueError:
            return ValueError(f"{key}{where}: {problem}")

        if origin is Literal:
            allowed = typing.get_args(tp)
            if value not in allowed or isinstance(value, bool):
                close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise fail(f"got {value!r}; allowed values: {', '.join(map(repr, allowed))}{hint}")
            return value
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise fail(f"got {value!r}; expected {describe_type(tp)}")
            (item_type,) = typing.get_args(tp)
            return [self._coerce(item, item_type, path + (index,), {}) for index, item in enumerate(value)]
        if origin is dict:
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise fail(f"got {value!r}; expected a mapping with string keys")
            return dict(value)
        if tp is bool:
            if not isinstance(value, bool):
                raise fail(f"got {value!r}; expected a bool (true or false)")
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(f"got {value!r}; expected an int")
        elif tp is float:
            if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    raise fail(f"got {value!r}; expected a float") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise fail(f"got {value!r}; expected a float")
            value = float(value)
            if not math.isfinite(value):
                raise fail(f"got {value!r}; expected a finite number")
        elif tp is str:
            if not isinstance(value, str):
                raise fail(f"got {value!r}; expected a string")
        else:  # pragma: no cover - a schema error, not a user error
            raise TypeError(f"unsupported config type {tp!r} for {key}")
        _check_range(value, meta, fail)
        check = meta.get("check")
        if check is not None:
            problem = check(value)
            if problem:
                raise fail(f"got {value!r}; {problem}")
        return value


def _copy_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _copy_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_tree(item) for item in value]
    return value


def _check_range(value: float, meta: Mapping[str, Any], fail: Callable[[str], ValueError]) -> None:
    ge, gt, le, lt = (meta.get(name) for name in ("ge", "gt", "le", "lt"))
    low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
    high_ok = (le is None or value <= le) and (lt is None or value < lt)
    if low_ok and high_ok:
        return
    low = f"[{ge}" if ge is not None else (f"({gt}" if gt is not None else "")
    high = f"{le}]" if le is not None else (f"{lt})" if lt is not None else "")
    if low and high:
        allowed = f"a value in {low}, {high}"
    elif low:
        allowed = f"a value {'>=' if ge is not None else '>'} {low[1:]}"
    else:
        allowed = f"a value {'<=' if le is not None else '<'} {high[:-1]}"
    raise fail(f"got {value!r}, out of range; allowed: {allowed}")
