"""QAPI-like types declared as Python data.

Every command's arguments and result, and every event's data, are described once with
these classes; argument validation (:mod:`pyvm.qmp.visitor`), ``query-qmp-schema``
(:mod:`pyvm.qmp.introspect`) and ``query-commands`` are derived from them.

Builtins mirror QAPI's: ``str``, ``int`` (int64), ``int8``..``int64``, ``uint8``..``uint64``,
``size`` (uint64 semantics), ``number``, ``bool``, ``any``, ``null``.  Composite types:

- :class:`Enum` -- a set of strings;
- :class:`Array` -- a list of one element type (write ``[T]`` in member declarations);
- :class:`Struct` -- named members, ``"*name"`` marks an optional one;
- :class:`Union` -- a flat union: base members, one of them (an enum) the discriminator,
  plus the members of the object type selected by the discriminator's value;
- :class:`Alternate` -- one of several types told apart by JSON type (``StrOrNull``).

Members are declared QAPI-style as a dict: ``{"uri": "str", "*detach": "bool",
"channels": [MIGRATION_CHANNEL]}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union as TUnion

from pyvm.qmp.errors import SchemaError


class QType:
    """Base of all schema types."""

    name: str

    @property
    def json_type(self) -> str:
        """The JSON type on the wire (introspection's ``JSONType``)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Builtin(QType):
    name: str
    json: str                    # JSONType: string number int boolean null value
    bits: int = 0                # integer width; 0 for non-integers
    signed: bool = True

    @property
    def json_type(self) -> str:
        return self.json

    @property
    def is_integer(self) -> bool:
        return self.json == "int"


def _builtins() -> dict[str, Builtin]:
    table = {
        "str": Builtin("str", "string"),
        "number": Builtin("number", "number"),
        "bool": Builtin("bool", "boolean"),
        "any": Builtin("any", "value"),
        "null": Builtin("null", "null"),
        "int": Builtin("int", "int", 64, True),
        "size": Builtin("size", "int", 64, False),
    }
    for bits in (8, 16, 32, 64):
        table[f"int{bits}"] = Builtin(f"int{bits}", "int", bits, True)
        table[f"uint{bits}"] = Builtin(f"uint{bits}", "int", bits, False)
    return table


BUILTINS: dict[str, Builtin] = _builtins()
STR = BUILTINS["str"]
INT = BUILTINS["int"]
BOOL = BUILTINS["bool"]
ANY = BUILTINS["any"]
NUMBER = BUILTINS["number"]
SIZE = BUILTINS["size"]
UINT64 = BUILTINS["uint64"]

TypeRef = TUnion[QType, str, "list[Any]"]   # a one-element list [T] means Array(T)


def resolve(ref: TypeRef) -> QType:
    """Turn a member declaration (type, builtin name, or ``[T]``) into a :class:`QType`."""
    if isinstance(ref, QType):
        return ref
    if isinstance(ref, str):
        try:
            return BUILTINS[ref]
        except KeyError:
            raise SchemaError(f"unknown builtin type '{ref}'") from None
    if isinstance(ref, list) and len(ref) == 1:
        return Array(resolve(ref[0]))
    raise SchemaError(f"bad type reference {ref!r}")


@dataclass(frozen=True, eq=False)
class Enum(QType):
    name: str
    values: tuple[str, ...]

    def __init__(self, name: str, values: list[str] | tuple[str, ...]) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "values", tuple(values))
        if len(set(self.values)) != len(self.values):
            raise SchemaError(f"enum {name} has duplicate values")

    @property
    def json_type(self) -> str:
        return "string"


@dataclass(frozen=True, eq=False)
class Array(QType):
    element: QType

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.element.name + "List"

    @property
    def json_type(self) -> str:
        return "array"


@dataclass(frozen=True)
class Member:
    name: str
    type: QType
    optional: bool = False


def members_from(decl: Mapping[str, TypeRef] | None) -> tuple[Member, ...]:
    """``{"a": "int", "*b": "str"}`` -> members, ``*`` meaning optional."""
    out: list[Member] = []
    for key, ref in (decl or {}).items():
        optional = key.startswith("*")
        name = key[1:] if optional else key
        if any(m.name == name for m in out):
            raise SchemaError(f"member '{name}' declared twice")
        out.append(Member(name, resolve(ref), optional))
    return tuple(out)


class ObjectType(QType):
    """Struct or union: a JSON object."""

    @property
    def json_type(self) -> str:
        return "object"

    def all_member_names(self) -> set[str]:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Struct(ObjectType):
    name: str
    members: tuple[Member, ...] = field(default=())

    def __init__(self, name: str, members: Mapping[str, TypeRef] | None = None,
                 base: "Struct | None" = None) -> None:
        own = members_from(members)
        inherited = base.members if base is not None else ()
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "members", inherited + own)
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise SchemaError(f"struct {name} repeats a member of its base")

    def all_member_names(self) -> set[str]:
        return {m.name for m in self.members}


@dataclass(frozen=True, eq=False)
class Union(ObjectType):
    name: str
    base: tuple[Member, ...]
    discriminator: str
    variants: dict[str, ObjectType]

    def __init__(self, name: str, base: Mapping[str, TypeRef] | Struct, discriminator: str,
                 variants: Mapping[str, ObjectType]) -> None:
        members = base.members if isinstance(base, Struct) else members_from(base)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "base", members)
        object.__setattr__(self, "discriminator", discriminator)
        object.__setattr__(self, "variants", dict(variants))
        tag = next((m for m in members if m.name == discriminator), None)
        if tag is None or not isinstance(tag.type, Enum) or tag.optional:
            raise SchemaError(f"union {name}: discriminator '{discriminator}' must be a "
                              "required enum member of the base")
        for case in self.variants:
            if case not in tag.type.values:
                raise SchemaError(f"union {name}: '{case}' is not a value of {tag.type.name}")

    @property
    def tag_enum(self) -> Enum:
        for m in self.base:
            if m.name == self.discriminator:
                assert isinstance(m.type, Enum)
                return m.type
        raise AssertionError("checked in __init__")

    def all_member_names(self) -> set[str]:
        names = {m.name for m in self.base}
        for variant in self.variants.values():
            names |= variant.all_member_names()
        return names


@dataclass(frozen=True, eq=False)
class Alternate(QType):
    name: str
    branches: tuple[QType, ...]

    def __init__(self, name: str, branches: list[TypeRef]) -> None:
        resolved = tuple(resolve(b) for b in branches)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "branches", resolved)
        seen: set[str] = set()
        for b in resolved:
            kind = alternate_kind(b)
            if kind in seen:
                raise SchemaError(f"alternate {name}: two branches take JSON {kind}")
            seen.add(kind)

    @property
    def json_type(self) -> str:
        return "value"


def alternate_kind(t: QType) -> str:
    """Which JSON value kind selects branch ``t`` of an alternate."""
    json = t.json_type
    if json in ("int", "number"):
        return "number"
    if json == "value":
        raise SchemaError("'any' cannot be an alternate branch")
    return json


def value_kind(value: Any) -> str:
    """JSON kind of a parsed value, in :func:`alternate_kind`'s terms."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "array"


# The empty object type: arguments or result of commands that declare none.
EMPTY = Struct("q_empty")
