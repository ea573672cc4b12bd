"""``query-qmp-schema``: the command table described as QEMU's SchemaInfo list.

(qapi/introspect.json, 8.2.)  As in QEMU, commands and events come first in declaration
order, then every type they use, in order of first use.  Type names are not part of the
wire ABI: they are replaced by numbers ("0", "1", ...) in order of first use; builtin
names stay, every integer type shows as ``int`` and arrays as ``[element]``.
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp.registry import CommandTable
from pyvm.qmp.schema import BUILTINS, EMPTY, Alternate, Array, Builtin, Enum, QType, Struct, Union


class _Introspector:
    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.used: list[QType] = []
        self.used_ids: set[int] = set()
        self.arrays: dict[int, Array] = {}

    def canon(self, t: QType) -> QType:
        """One object per builtin and per array type; integer types all become ``int``."""
        if isinstance(t, Builtin) and t.is_integer:
            return BUILTINS["int"]
        if isinstance(t, Array):
            element = self.canon(t.element)
            found = self.arrays.get(id(element))
            if found is None:
                found = self.arrays[id(element)] = Array(element)
            return found
        return t

    def use(self, t: QType) -> str:
        t = self.canon(t)
        if id(t) not in self.used_ids:
            self.used_ids.add(id(t))
            self.used.append(t)
        if isinstance(t, Builtin):
            return t.name
        if isinstance(t, Array):
            return "[" + self.use(t.element) + "]"
        if id(t) not in self.names:
            self.names[id(t)] = str(len(self.names))
        return self.names[id(t)]

    def members(self, members: Any) -> list[dict[str, Any]]:
        out = []
        for m in members:
            entry: dict[str, Any] = {"name": m.name, "type": self.use(m.type)}
            if m.optional:
                entry["default"] = None
            out.append(entry)
        return out

    def describe(self, t: QType) -> dict[str, Any]:
        name = self.use(t)
        if isinstance(t, Builtin):
            return {"name": name, "meta-type": "builtin", "json-type": t.json}
        if isinstance(t, Enum):
            return {"name": name, "meta-type": "enum",
                    "members": [{"name": v} for v in t.values], "values": list(t.values)}
        if isinstance(t, Array):
            return {"name": name, "meta-type": "array", "element-type": self.use(t.element)}
        if isinstance(t, Struct):
            return {"name": name, "meta-type": "object", "members": self.members(t.members)}
        if isinstance(t, Union):
            return {"name": name, "meta-type": "object", "members": self.members(t.base),
                    "tag": t.discriminator,
                    "variants": [{"case": case, "type": self.use(v)}
                                 for case, v in t.variants.items()]}
        if isinstance(t, Alternate):
            return {"name": name, "meta-type": "alternate",
                    "members": [{"type": self.use(b)} for b in t.branches]}
        raise AssertionError(f"cannot describe {t!r}")


def schema_info(table: "CommandTable") -> list[dict[str, Any]]:
    """The SchemaInfo list for every command and event of ``table``."""
    intro = _Introspector()
    out: list[dict[str, Any]] = []
    for cmd in table.commands():
        entry: dict[str, Any] = {
            "name": cmd.name, "meta-type": "command",
            "arg-type": intro.use(cmd.args if cmd.args is not None else EMPTY),
            "ret-type": intro.use(cmd.returns if cmd.returns is not None else EMPTY)}
        if cmd.allow_oob:
            entry["allow-oob"] = True
        out.append(entry)
    for ev in table.events():
        out.append({"name": ev.name, "meta-type": "event",
                    "arg-type": intro.use(ev.data if ev.data is not None else EMPTY)})
    index = 0
    while index < len(intro.used):          # describing a type may use more types
        out.append(intro.describe(intro.used[index]))
        index += 1
    return out


def cached_schema_info(table: CommandTable) -> list[dict[str, Any]]:
    """:func:`schema_info`, kept on the table until the table changes."""
    cached = table.schema_cache
    if cached is None:
        cached = table.schema_cache = schema_info(table)
    return cached
