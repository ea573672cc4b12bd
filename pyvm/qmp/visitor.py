"""Argument validation from the schema, with the texts of QEMU's input visitor.

(qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c.)  Members are visited in schema
order, so the first missing or mistyped member in declaration order is reported; unknown
members are reported when an object has been visited completely.  Names are printed as
QEMU prints them:

- full paths (``capabilities[0].state``, ``channels[0].addr.port``) for missing,
  unexpected and mistyped members, and for ``expects uint64``;
- the bare member name, or ``null`` for a list element, for enum values and for
  integers outside a narrower type (``expects uint8_t``).

Negative integers are accepted for unsigned types and wrap modulo 2**64, as QEMU does.
When several members are unexpected, pyvm names the first in input order (QEMU's choice
depends on GLib's hash table layout).
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp.errors import ArgumentError
from pyvm.qmp.schema import (Alternate, Array, Builtin, Enum, ObjectType, QType, Struct,
                             Union, alternate_kind, value_kind)

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_MISSING = object()


class _Frame:
    __slots__ = ("name", "is_list", "index", "unvisited", "items")

    def __init__(self, name: str | None, container: Any) -> None:
        self.name = name
        self.is_list = isinstance(container, list)
        self.index = -1
        if self.is_list:
            self.items = iter(container)
            self.unvisited: dict[str, None] = {}
        else:
            self.items = iter(())
            self.unvisited = dict.fromkeys(container)


class _InputVisitor:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.stack: list[_Frame] = []
        self.containers: list[Any] = []

    # -- names (qobject-input-visitor.c full_name_nth) ------------------------------------
    def full_name(self, name: str | None) -> str:
        text = ""
        for frame in reversed(self.stack):
            if frame.is_list:
                text = f"[{frame.index}]" + text
            else:
                text = "." + (name if name is not None else "<anonymous>") + text
            name = frame.name
        if name is not None:
            return name + text
        if text.startswith("."):
            return text[1:]
        return text or "<anonymous>"

    # -- access ------------------------------------------------------------------------------
    def peek(self, name: str | None) -> Any:
        if not self.stack:
            return self.root
        frame = self.stack[-1]
        if frame.is_list:
            raise AssertionError("peek is for object members")
        container = self.containers[-1]
        return container.get(name, _MISSING) if name is not None else _MISSING

    def take(self, name: str | None) -> Any:
        if not self.stack:
            return self.root
        frame = self.stack[-1]
        if frame.is_list:
            frame.index += 1
            value = next(frame.items, _MISSING)
        else:
            value = self.containers[-1].get(name, _MISSING) if name is not None else _MISSING
            if value is not _MISSING:
                frame.unvisited.pop(name, None)  # type: ignore[arg-type]
        if value is _MISSING:
            raise ArgumentError(f"Parameter '{self.full_name(name)}' is missing")
        return value

    def type_error(self, name: str | None, expected: str) -> ArgumentError:
        return ArgumentError(
            f"Invalid parameter type for '{self.full_name(name)}', expected: {expected}")

    # -- visiting ----------------------------------------------------------------------------
    def visit(self, t: QType, name: str | None) -> Any:
        if isinstance(t, Alternate):
            return self.visit_alternate(t, name)
        value = self.take(name)
        if isinstance(t, Builtin):
            return self.visit_builtin(t, name, value)
        if isinstance(t, Enum):
            if not isinstance(value, str):
                raise self.type_error(name, "string")
            if value not in t.values:
                bare = name if name is not None else "null"
                raise ArgumentError(f"Parameter '{bare}' does not accept value '{value}'")
            return value
        if isinstance(t, Array):
            if not isinstance(value, list):
                raise self.type_error(name, "array")
            self.push(name, value)
            out = [self.visit(t.element, None) for _ in range(len(value))]
            self.pop()
            return out
        if isinstance(t, ObjectType):
            if not isinstance(value, dict):
                raise self.type_error(name, "object")
            self.push(name, value)
            result: dict[str, Any] = {}
            self.visit_members(t, result)
            frame = self.stack[-1]
            if frame.unvisited:
                extra = next(iter(frame.unvisited))
                raise ArgumentError(f"Parameter '{self.full_name(extra)}' is unexpected")
            self.pop()
            return result
        raise AssertionError(f"unknown schema type {t!r}")

    def push(self, name: str | None, container: Any) -> None:
        self.stack.append(_Frame(name, container))
        self.containers.append(container)

    def pop(self) -> None:
        self.stack.pop()
        self.containers.pop()

    def visit_members(self, t: ObjectType, out: dict[str, Any]) -> None:
        members = t.members if isinstance(t, Struct) else t.base  # type: ignore[attr-defined]
        for m in members:
            if m.optional and self.peek(m.name) is _MISSING:
                continue
            out[m.name] = self.visit(m.type, m.name)
        if isinstance(t, Union):
            variant = t.variants.get(out[t.discriminator])
            if variant is not None:
                self.visit_members(variant, out)

    def visit_alternate(self, t: Alternate, name: str | None) -> Any:
        value = self.peek(name)
        if value is _MISSING:
            raise ArgumentError(f"Parameter '{self.full_name(name)}' is missing")
        kind = value_kind(value)
        for branch in t.branches:
            if alternate_kind(branch) == kind:
                return self.visit(branch, name)
        bare = name if name is not None else "null"
        raise ArgumentError(f"Invalid parameter type for '{bare}', expected: {t.name}")

    def visit_builtin(self, t: Builtin, name: str | None, value: Any) -> Any:
        json = t.json
        if json == "string":
            if not isinstance(value, str):
                raise self.type_error(name, "string")
            return value
        if json == "boolean":
            if not isinstance(value, bool):
                raise self.type_error(name, "boolean")
            return value
        if json == "value":
            return value
        if json == "null":
            if value is not None:
                raise self.type_error(name, "null")
            return None
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if json == "number":
            if not (is_int or isinstance(value, float)) or isinstance(value, bool):
                raise self.type_error(name, "number")
            return float(value)
        bare = name if name is not None else "null"
        if t.signed:
            if not is_int or not _INT64_MIN <= value <= _INT64_MAX:
                raise self.type_error(name, "integer")
            low, high = -(1 << (t.bits - 1)), (1 << (t.bits - 1)) - 1
            if not low <= value <= high:
                raise ArgumentError(f"Parameter '{bare}' expects int{t.bits}_t")
            return value
        if is_int and 0 <= value <= _UINT64_MAX:
            result = value
        elif is_int and _INT64_MIN <= value < 0:
            result = value + (1 << 64)          # "accept negative values for compatibility"
        else:
            raise ArgumentError(f"Parameter '{self.full_name(name)}' expects uint64")
        if t.bits < 64 and result > (1 << t.bits) - 1:
            raise ArgumentError(f"Parameter '{bare}' expects uint{t.bits}_t")
        return result


def validate(t: QType, value: Any) -> Any:
    """Check ``value`` against ``t`` at the top level; returns the converted value.

    Raises :class:`~pyvm.qmp.errors.ArgumentError` with QEMU's text.
    """
    return _InputVisitor(value).visit(t, None)


def conform(t: QType, value: Any) -> Any:
    """Rebuild a command result with object members in schema order.

    QEMU's output visitor inserts members in declaration order, which decides the key
    order of equal QDict buckets; handlers may build dicts in any order.  Keys the schema
    does not know are kept, after the known ones.
    """
    if isinstance(t, ObjectType) and isinstance(value, dict):
        out: dict[str, Any] = {}
        _conform_members(t, value, out)
        for key, item in value.items():
            if key not in out:
                out[key] = item
        return out
    if isinstance(t, Array) and isinstance(value, list):
        return [conform(t.element, item) for item in value]
    if isinstance(t, Alternate):
        kind = value_kind(value)
        for branch in t.branches:
            if alternate_kind(branch) == kind:
                return conform(branch, value)
    return value


def _conform_members(t: ObjectType, value: dict[str, Any], out: dict[str, Any]) -> None:
    members = t.members if isinstance(t, Struct) else t.base  # type: ignore[attr-defined]
    for m in members:
        if m.name in value:
            out[m.name] = conform(m.type, value[m.name])
    if isinstance(t, Union):
        variant = t.variants.get(value.get(t.discriminator))  # type: ignore[arg-type]
        if variant is not None:
            _conform_members(variant, value, out)
