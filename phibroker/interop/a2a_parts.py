"""Values between phibroker and A2A message parts, for `a2a serve` and `a2a-bridge`.

A string travels as a text part, anything else as a data part. A data part is a protobuf `Value`,
whose numbers are all doubles: whole numbers come back as floats, so `value_of` turns them into ints
again (a param `count: 3` stays an int through an A2A client).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from a2a.types import Part
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

EXACT = 2**53  # past this a double no longer holds every whole number


def part_of(value: Any) -> Part:
    """A text part for a string, else a data part (what JSON cannot hold becomes its text)."""
    if isinstance(value, str):
        return Part(text=value)
    plain = json.loads(json.dumps(value, default=str))
    return Part(data=ParseDict(plain, struct_pb2.Value()))


def value_of(part: Part) -> Any:
    """A part's value: its text, its data (whole numbers as ints), its URL, or its raw bytes."""
    kind = part.WhichOneof("content")
    if kind == "text":
        return part.text
    if kind == "data":
        return whole(MessageToDict(part.data))
    if kind == "url":
        return part.url
    if kind == "raw":
        return part.raw
    return None


def data_values(parts: Iterable[Part]) -> list[Any]:
    return [whole(MessageToDict(p.data)) for p in parts if p.WhichOneof("content") == "data"]


def texts(parts: Iterable[Part]) -> list[str]:
    return [p.text for p in parts if p.WhichOneof("content") == "text"]


def whole(value: Any) -> Any:
    """Floats that hold a whole number become ints, all the way down."""
    if isinstance(value, float) and value.is_integer() and abs(value) < EXACT:
        return int(value)
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole(v) for v in value]
    return value
