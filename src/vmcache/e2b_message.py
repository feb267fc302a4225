"""Reading envd's protobuf-JSON messages safely: every field a handler reads is checked here.

Messages arrive as the dicts E2B's clients send (protobuf's JSON mapping: camelCase names,
bytes as base64, enums by name or number, 64-bit integers as strings or numbers, absent
fields meaning their default). A field of the wrong shape is ConnectError(INVALID_ARGUMENT)
naming the field; nothing here trusts the client.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from vmcache.e2b_connect import Code, ConnectError

#: Longest string field accepted (paths, commands, tags, env values).
MAX_STRING = 64 * 1024
UINT32_MAX = 2**32 - 1


class NotJsonObject(ValueError):
    """Bytes a client sent that are not one JSON object; the message says what they were meant
    to be and why not, for the caller to answer in its own protocol (Connect's
    ``invalid_argument``, HTTP 400)."""


def parse_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """``data`` as a JSON object, or :class:`NotJsonObject` saying why ``what`` ("the request
    body") is not one. Nesting too deep for the parser (``[[[[...``: a RecursionError) is bad
    input like any other, not a daemon error."""
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError) as error:
        raise NotJsonObject(f"{what} is not JSON: {error}") from None
    except RecursionError:
        raise NotJsonObject(f"{what} is not JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise NotJsonObject(f"{what} must be a JSON object")
    return value


def invalid(field: str, why: str) -> ConnectError:
    return ConnectError(Code.INVALID_ARGUMENT, f"field {field}: {why}")


def message(value: Any, field: str) -> dict[str, Any]:
    """A sub-message: a JSON object, or {} when absent or null."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(field, "not an object")
    return value


def get_message(msg: Mapping[str, Any], name: str, field: str | None = None) -> dict[str, Any]:
    return message(msg.get(name), field or name)


def has(msg: Mapping[str, Any], name: str) -> bool:
    return msg.get(name) is not None


def get_str(msg: Mapping[str, Any], name: str, field: str | None = None, default: str = "") -> str:
    value = msg.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise invalid(field or name, "not a string")
    if len(value) > MAX_STRING:
        raise invalid(field or name, f"longer than {MAX_STRING} characters")
    if "\0" in value:
        raise invalid(field or name, "contains a NUL character")
    return value


def get_optional_str(msg: Mapping[str, Any], name: str, field: str | None = None) -> str | None:
    return get_str(msg, name, field) if msg.get(name) is not None else None


def get_bool(msg: Mapping[str, Any], name: str, field: str | None = None, default: bool = False) -> bool:
    value = msg.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(field or name, "not a boolean")
    return value


def get_int(msg: Mapping[str, Any], name: str, field: str | None = None, *, low: int = 0,
            high: int = UINT32_MAX, default: int = 0) -> int:
    """An integer field (a JSON number, or a decimal string as protobuf writes 64-bit ones)."""
    value = msg.get(name)
    shown = field or name
    if value is None:
        return default
    if isinstance(value, bool):
        raise invalid(shown, "not an integer")
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit() or len(value) > 24:
            raise invalid(shown, "not an integer")
        value = int(value)
    elif isinstance(value, float):
        if not value.is_integer():
            raise invalid(shown, "not an integer")
        value = int(value)
    elif not isinstance(value, int):
        raise invalid(shown, "not an integer")
    if not low <= value <= high:
        raise invalid(shown, f"out of range ({low} to {high})")
    return value


def get_bytes(msg: Mapping[str, Any], name: str, field: str | None = None, *, max_size: int) -> bytes:
    """A bytes field: standard or URL-safe base64, padded or not."""
    value = msg.get(name)
    shown = field or name
    if value is None:
        return b""
    if not isinstance(value, str):
        raise invalid(shown, "not a base64 string")
    if len(value) > (max_size * 4) // 3 + 8:
        raise invalid(shown, f"more than {max_size} bytes")
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(shown, "not valid base64") from None


def get_str_map(msg: Mapping[str, Any], name: str, field: str | None = None, *,
                max_items: int = 1024) -> dict[str, str]:
    value = msg.get(name)
    shown = field or name
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(shown, "not an object")
    if len(value) > max_items:
        raise invalid(shown, f"more than {max_items} entries")
    result: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > MAX_STRING or len(item) > MAX_STRING:
            raise invalid(f"{shown}[{key[:64]!r}]", "not a string")
        if "\0" in key or "\0" in item:
            raise invalid(f"{shown}[{key[:64]!r}]", "contains a NUL character")
        result[key] = item
    return result


def get_enum(msg: Mapping[str, Any], name: str, values: Mapping[str, int], field: str | None = None) -> int:
    """An enum field by name (``SIGNAL_SIGKILL``) or number; unknown numbers are returned as
    they are (proto3 keeps them), unknown names are INVALID_ARGUMENT."""
    value = msg.get(name)
    shown = field or name
    if value is None:
        return 0
    if isinstance(value, str):
        if value in values:
            return values[value]
        raise invalid(shown, f"unknown value {value[:64]!r}")
    return get_int(msg, name, field, low=-(2**31), high=2**31 - 1)


def b64(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(data).decode("ascii")
