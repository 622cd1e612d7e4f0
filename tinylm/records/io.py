"""Writing and reading records: the JSON files one stage hands to the next, each a frozen dataclass.

A record type is a frozen dataclass whose fields hold int, float, str, bool, None, other record
types, `list[X]`, `dict[str, X]` or unions of those (`X | None`); a generic record is used bound
(`Splits[CleanSplit]`), and `dict[str, Record]` may also be a whole file. The producer writes it
with `write_record` (sorted keys, so the same values give the same bytes and DVC sees an
unchanged output); every consumer reads it back with `read_record`, which checks every key and
type against the dataclass. A stage and its reader that disagree (a renamed field, a file from
an older run) fail with one line naming the file, the key and the stage to rerun, not with a
KeyError deep inside a later stage.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

from tinylm.errors import PipelineError
from tinylm.files import atomic_open, write_json

R = TypeVar("R")


def stage_error(path: str | os.PathLike, stage: str, problem: str) -> PipelineError:
    """What is wrong with a file that `stage` writes, and the command that writes it again."""
    return PipelineError(f"{path}: {problem}. It is written by the {stage} stage; fix: run `dvc repro {stage}`")


def plain(record: Any) -> Any:
    """A record (or a dict of records) as the JSON data it is written as."""
    if dataclasses.is_dataclass(record):
        return dataclasses.asdict(record)
    if isinstance(record, dict):
        return {key: plain(value) for key, value in record.items()}
    return record


def write_record(path: str | os.PathLike, record: Any) -> None:
    write_json(path, plain(record))


def write_records(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """JSON lines: one record per line, keys sorted."""
    with atomic_open(path) as f:
        f.writelines(json.dumps(plain(record), ensure_ascii=False, sort_keys=True) + "\n" for record in records)


class _Mismatch(Exception):
    """The JSON does not fit the record type; the message says which key and how."""


def read_record(path: str | os.PathLike, kind: type[R], stage: str, ignore_other_keys: bool = False) -> R:
    """The record of type `kind` in the JSON file at `path`, which `stage` writes.

    ignore_other_keys: for a file another tool writes (dvclive's metrics), where the record
    declares only the keys its reader uses."""
    return _parse(_read_text(path, stage), kind, path, stage, ignore_other_keys)


def read_records(path: str | os.PathLike, kind: type[R], stage: str) -> list[R]:
    """Every line of a JSON lines file as a record of type `kind` (blank lines are skipped)."""
    lines = _read_text(path, stage).splitlines()
    return [_parse(line, kind, f"{path}:{number}", stage, False)
            for number, line in enumerate(lines, start=1) if line.strip()]


def _read_text(path: str | os.PathLike, stage: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise stage_error(path, stage, "missing") from None
    except UnicodeDecodeError as exc:
        raise stage_error(path, stage, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _parse(text: str, kind: type[R], where: str | os.PathLike, stage: str, ignore_other_keys: bool) -> R:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise stage_error(where, stage, f"not valid JSON ({exc})") from None
    try:
        return _decode(data, kind, "", ignore_other_keys)
    except _Mismatch as exc:
        raise stage_error(where, stage, str(exc)) from None


def _record_type(kind: Any) -> type | None:
    """The dataclass of a record type (of `Splits[CleanSplit]` too), or None when it is not one."""
    record_type = typing.get_origin(kind) or kind
    return record_type if dataclasses.is_dataclass(record_type) else None


@functools.cache
def _field_types(kind: Any) -> dict[str, Any]:
    """A record type's field names and their types, with a generic one's type parameters bound
    (annotations are strings under `from __future__ import annotations`: get_type_hints reads them)."""
    record_type = _record_type(kind)
    hints = typing.get_type_hints(record_type)
    bound = dict(zip(getattr(record_type, "__parameters__", ()), typing.get_args(kind)))
    return {field.name: bound.get(hints[field.name], hints[field.name]) for field in dataclasses.fields(record_type)}


def _key(parent: str, name: str) -> str:
    """Where a value sits in the file, as DVC names nested metrics: `baselines.unigram.ppl`."""
    return f"{parent}.{name}" if parent else name


def _decode(value: Any, kind: Any, key: str, ignore_other_keys: bool) -> Any:
    """`value` (parsed JSON) as an instance of `kind`, or _Mismatch naming `key` and the problem."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    record_type = _record_type(kind)
    if record_type is not None:
        if type(value) is not dict:
            raise _mistyped(value, kind, key)
        fields = _field_types(kind)
        missing = [name for name in fields if name not in value]
        if missing:
            raise _Mismatch(f"has no key {_key(key, missing[0])!r} (written by an older or different version of "
                            "the stage)")
        unknown = [name for name in value if name not in fields]
        if unknown and not ignore_other_keys:
            raise _Mismatch(f"has an unknown key {_key(key, unknown[0])!r} (written by a newer or different "
                            "version of the stage)")
        return record_type(**{name: _decode(value[name], field_type, _key(key, name), ignore_other_keys)
                              for name, field_type in fields.items()})
    if origin is dict:
        if type(value) is not dict:
            raise _mistyped(value, kind, key)
        return {name: _decode(item, args[1], _key(key, name), ignore_other_keys) for name, item in value.items()}
    if origin is list:
        if type(value) is not list:
            raise _mistyped(value, kind, key)
        return [_decode(item, args[0], f"{key}[{index}]", ignore_other_keys) for index, item in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return _decode_union(value, kind, key, ignore_other_keys)
    if kind is float and type(value) in (int, float):
        return float(value)  # JSON does not tell 2 from 2.0
    if kind in (int, str, bool, type(None)) and type(value) is kind:
        return value
    if kind in (int, float, str, bool, type(None)):
        raise _mistyped(value, kind, key)
    raise TypeError(f"a record field cannot be of type {kind!r}")


def _decode_union(value: Any, kind: Any, key: str, ignore_other_keys: bool) -> Any:
    options = typing.get_args(kind)
    if value is None and type(None) in options:
        return None
    present = [option for option in options if option is not type(None)]
    if len(present) == 1:  # `X | None` holding a value: X's own error says exactly what is wrong
        return _decode(value, present[0], key, ignore_other_keys)
    for option in present:
        try:
            return _decode(value, option, key, ignore_other_keys)
        except _Mismatch:
            continue
    raise _mistyped(value, kind, key)


def _type_name(kind: Any) -> str:
    if _record_type(kind) is not None or typing.get_origin(kind) is dict:
        return "an object"
    if typing.get_origin(kind) is list:
        return "a list"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(kind))
    return {type(None): "null", bool: "true or false"}.get(kind, kind.__name__)


def _mistyped(value: Any, kind: Any, key: str) -> _Mismatch:
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 40 else shown[:39] + "…"
    where = f"key {key!r}" if key else "the top level"
    return _Mismatch(f"{where} holds {shown}, not {_type_name(kind)}")
