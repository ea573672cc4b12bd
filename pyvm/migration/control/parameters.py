"""Migration parameters: ``migrate-set-parameters`` and ``query-migrate-parameters``.

Every member of QEMU 8.2's ``MigrationParameters`` (qapi/migration.json) with the
defaults of migration/options.c.  :meth:`MigrationParameters.apply` takes a
``migrate-set-parameters`` argument object (QMP member names) and works as QEMU does:

1. each member is type-checked and converted with the input visitor's texts
   (unsigned integers accept negative values and wrap modulo 2**64; narrower types then
   fail with ``expects uint8_t``; ``tls-*`` accept ``null``, meaning ``""``);
2. the request is merged into a copy of the current values and the whole result goes
   through QEMU's ``migrate_params_check`` (texts with QEMU's underscore names, in
   QEMU's order);
3. only then is anything committed: a refused request changes nothing.

Errors are :class:`ParameterError`, a :class:`~pyvm.migration.errors.MigrationError`
whose ``str()`` is the QMP ``GenericError`` description.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from pyvm.migration.errors import MigrationError
from pyvm.migration.policy import PolicyError, parse_policy
from pyvm.migration.stream.constants import TARGET_PAGE_SIZE


class ParameterError(MigrationError):
    """A ``migrate-set-parameters`` request was refused; nothing was changed."""


class MigMode(str, Enum):
    """QEMU 8.2 ``MigMode``: what ``migrate`` does (``cpr-transfer`` arrived in 10.0)."""

    NORMAL = "normal"
    CPR_REBOOT = "cpr-reboot"


# qapi/migration.json MultiFDCompression at 8.2 ("zstd" exists when QEMU is built with it).
MULTIFD_COMPRESSION_VALUES: tuple[str, ...] = ("none", "zlib", "zstd")

_UINT64_MAX = (1 << 64) - 1
_INT64_MIN = -(1 << 63)


@dataclass(frozen=True)
class ParameterSpec:
    """One member: its QMP name, QAPI type and default (``None``: unset until set)."""

    name: str
    kind: str       # size uint8 uint32 uint64 bool StrOrNull MigMode MultiFDCompression
    default: Any    # ... or BitmapMapping ([BitmapMigrationNodeAlias])


# MigrationParameters in declaration order; defaults from migration/options.c.
PARAMETER_SPECS: tuple[ParameterSpec, ...] = (
    ParameterSpec("announce-initial", "size", 50),              # ms
    ParameterSpec("announce-max", "size", 550),                 # ms
    ParameterSpec("announce-rounds", "size", 5),
    ParameterSpec("announce-step", "size", 100),                # ms
    ParameterSpec("compress-level", "uint8", 1),
    ParameterSpec("compress-threads", "uint8", 8),
    ParameterSpec("compress-wait-thread", "bool", True),
    ParameterSpec("decompress-threads", "uint8", 2),
    ParameterSpec("throttle-trigger-threshold", "uint8", 50),   # percent
    ParameterSpec("cpu-throttle-initial", "uint8", 20),         # percent
    ParameterSpec("cpu-throttle-increment", "uint8", 10),       # percent
    ParameterSpec("cpu-throttle-tailslow", "bool", False),
    ParameterSpec("tls-creds", "StrOrNull", ""),
    ParameterSpec("tls-hostname", "StrOrNull", ""),
    ParameterSpec("tls-authz", "StrOrNull", ""),
    ParameterSpec("max-bandwidth", "size", 128 << 20),          # bytes/s (MAX_THROTTLE)
    ParameterSpec("avail-switchover-bandwidth", "size", 0),     # 0: use the measured rate
    ParameterSpec("downtime-limit", "uint64", 300),             # ms
    ParameterSpec("x-checkpoint-delay", "uint32", 20000),       # ms (COLO)
    ParameterSpec("block-incremental", "bool", False),
    ParameterSpec("multifd-channels", "uint8", 2),
    ParameterSpec("xbzrle-cache-size", "size", 64 << 20),
    ParameterSpec("max-postcopy-bandwidth", "size", 0),
    ParameterSpec("max-cpu-throttle", "uint8", 99),
    ParameterSpec("multifd-compression", "MultiFDCompression", "none"),
    ParameterSpec("multifd-zlib-level", "uint8", 1),
    ParameterSpec("multifd-zstd-level", "uint8", 1),
    ParameterSpec("block-bitmap-mapping", "BitmapMapping", None),
    ParameterSpec("x-vcpu-dirty-limit-period", "uint64", 1000),  # ms
    ParameterSpec("vcpu-dirty-limit", "uint64", 1),             # MB/s
    ParameterSpec("mode", "MigMode", MigMode.NORMAL.value),
    # 9.1: O_DIRECT for the page writes of mapped-ram with multifd (migrate_direct_io)
    ParameterSpec("direct-io", "bool", False),
    # pyvm's own: the migration policy (pyvm.migration.policy); unset means "qemu"
    ParameterSpec("x-policy", "str", None),
)
SPECS_BY_NAME: dict[str, ParameterSpec] = {spec.name: spec for spec in PARAMETER_SPECS}

_WIDTH = {"uint8": 8, "uint32": 32, "uint64": 64, "size": 64}
_ENUMS = {"MigMode": tuple(m.value for m in MigMode),
          "MultiFDCompression": MULTIFD_COMPRESSION_VALUES}


# -- type checks (qapi/qobject-input-visitor.c texts) -----------------------------------------

def _type_error(path: str, expected: str) -> ParameterError:
    return ParameterError(f"Invalid parameter type for '{path}', expected: {expected}")


def _convert(spec: ParameterSpec, value: Any) -> Any:
    name, kind = spec.name, spec.kind
    if kind in _WIDTH:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or not _INT64_MIN <= value <= _UINT64_MAX:
            raise ParameterError(f"Parameter '{name}' expects uint64")
        value &= _UINT64_MAX                    # negative values wrap, as in QEMU
        if value >> _WIDTH[kind]:
            raise ParameterError(f"Parameter '{name}' expects {kind}_t")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(name, "boolean")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise _type_error(name, "string")
        return value
    if kind == "StrOrNull":
        if value is None:
            return ""                           # null resets to the default
        if not isinstance(value, str):
            raise _type_error(name, "StrOrNull")
        return value
    if kind in _ENUMS:
        if not isinstance(value, str):
            raise _type_error(name, "string")
        if value not in _ENUMS[kind]:
            raise ParameterError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    return _convert_mapping(value, name)


# BitmapMigrationNodeAlias / BitmapMigrationBitmapAlias / ...AliasTransform members:
# name -> (type, required)
_NODE_ALIAS = {"node-name": ("str", True), "alias": ("str", True), "bitmaps": ("bitmaps", True)}
_BITMAP_ALIAS = {"name": ("str", True), "alias": ("str", True), "transform": ("transform", False)}
_TRANSFORM = {"persistent": ("bool", False)}
_STRUCTS = {"node": _NODE_ALIAS, "bitmap": _BITMAP_ALIAS, "transform": _TRANSFORM}


def _convert_struct(value: Any, path: str, members: Mapping[str, tuple[str, bool]]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(path, "object")
    out: dict[str, Any] = {}
    for member, (kind, required) in members.items():
        sub = f"{path}.{member}"
        if member not in value:
            if required:
                raise ParameterError(f"Parameter '{sub}' is missing")
            continue
        item = value[member]
        if kind == "str" and not isinstance(item, str):
            raise _type_error(sub, "string")
        if kind == "bool" and not isinstance(item, bool):
            raise _type_error(sub, "boolean")
        if kind == "bitmaps":
            if not isinstance(item, list):
                raise _type_error(sub, "array")
            item = [_convert_struct(b, f"{sub}[{i}]", _BITMAP_ALIAS) for i, b in enumerate(item)]
        elif kind == "transform":
            item = _convert_struct(item, sub, _TRANSFORM)
        out[member] = item
    for member in value:
        if member not in members:
            raise ParameterError(f"Parameter '{path}.{member}' is unexpected")
    return out


def _convert_mapping(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _type_error(name, "array")
    return [_convert_struct(node, f"{name}[{i}]", _NODE_ALIAS) for i, node in enumerate(value)]


# -- block-bitmap-mapping (migration/block-dirty-bitmap.c check_dirty_bitmap_mig_alias_map) --

MAX_NODE_NAME_LEN = 31            # sizeof(BlockDriverState.node_name) - 1
BDRV_BITMAP_MAX_NAME_SIZE = 1023  # include/block/dirty-bitmap.h
MAX_ALIAS_LEN = 255               # aliases go on the wire as counted strings


def _id_wellformed(text: str) -> bool:
    """util/id.c id_wellformed: an ASCII letter, then letters, digits, '-', '.', '_'."""
    ok = "-._"
    return (bool(text) and text[0].isascii() and text[0].isalpha()
            and all(c.isascii() and (c.isalnum() or c in ok) for c in text[1:]))


def _blen(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_alias_map(mapping: list[dict[str, Any]], name_to_alias: bool) -> None:
    seen_nodes: set[str] = set()
    for node in mapping:
        node_name, node_alias = node["node-name"], node["alias"]
        if not _id_wellformed(node_alias):
            raise ParameterError(f"The node alias '{node_alias}' is not well-formed")
        if _blen(node_alias) > MAX_ALIAS_LEN:
            raise ParameterError(
                f"The node alias '{node_alias}' is longer than {MAX_ALIAS_LEN} bytes")
        if _blen(node_name) > MAX_NODE_NAME_LEN:
            raise ParameterError(
                f"The node name '{node_name}' is longer than {MAX_NODE_NAME_LEN} bytes")
        key = node_name if name_to_alias else node_alias
        if key in seen_nodes:
            raise ParameterError(f"The node name '{node_name}' is mapped twice" if name_to_alias
                                 else f"The node alias '{node_alias}' is used twice")
        seen_nodes.add(key)
        seen_bitmaps: set[str] = set()
        for bitmap in node["bitmaps"]:
            if _blen(bitmap["alias"]) > MAX_ALIAS_LEN:
                raise ParameterError(f"The bitmap alias '{bitmap['alias']}' is longer than "
                                     f"{MAX_ALIAS_LEN} bytes")
            if _blen(bitmap["name"]) > BDRV_BITMAP_MAX_NAME_SIZE:
                raise ParameterError(f"The bitmap name '{bitmap['name']}' is longer than "
                                     f"{BDRV_BITMAP_MAX_NAME_SIZE} bytes")
            key = bitmap["name"] if name_to_alias else bitmap["alias"]
            if key in seen_bitmaps:
                raise ParameterError(
                    f"The bitmap '{node_name}'/'{bitmap['name']}' is mapped twice" if name_to_alias
                    else f"The bitmap alias '{node_alias}'/'{bitmap['alias']}' is used twice")
            seen_bitmaps.add(key)


def check_bitmap_mapping(mapping: list[dict[str, Any]]) -> None:
    """Both directions of the alias map must be unambiguous (QEMU checks name->alias first)."""
    try:
        _check_alias_map(mapping, True)
        _check_alias_map(mapping, False)
    except ParameterError as err:
        raise ParameterError(
            f"Invalid mapping given for block-bitmap-mapping: {err}") from None


# -- migrate_params_check (migration/options.c, 8.2 order and texts) ------------------------

def _expects(name: str, what: str) -> ParameterError:
    return ParameterError(f"Parameter '{name}' expects {what}")


def check_parameters(p: Mapping[str, Any], zero_copy_send: bool = False) -> None:
    """QEMU's ``migrate_params_check`` on a complete merged set of values.

    ``max-bandwidth`` and ``avail-switchover-bandwidth`` are also range-checked in QEMU
    (``... 0 to SIZE_MAX bytes/second``), which no 64-bit value can fail.
    """
    if p["compress-level"] > 9:
        raise _expects("compress_level", "a value between 0 and 9")
    if p["compress-threads"] < 1:
        raise _expects("compress_threads", "a value between 1 and 255")
    if p["decompress-threads"] < 1:
        raise _expects("decompress_threads", "a value between 1 and 255")
    if not 1 <= p["throttle-trigger-threshold"] <= 100:
        raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
    if not 1 <= p["cpu-throttle-initial"] <= 99:
        raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
    if not 1 <= p["cpu-throttle-increment"] <= 99:
        raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
    if p["downtime-limit"] > 2000 * 1000:
        raise _expects("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
    if p["multifd-channels"] < 1:
        raise _expects("multifd_channels", "a value between 1 and 255")
    if p["multifd-zlib-level"] > 9:
        raise _expects("multifd_zlib_level", "a value between 0 and 9")
    if p["multifd-zstd-level"] > 20:
        raise _expects("multifd_zstd_level", "a value between 0 and 20")
    size = p["xbzrle-cache-size"]
    if size < TARGET_PAGE_SIZE or size & (size - 1):
        raise _expects("xbzrle_cache_size", "a power of two no less than the target page size")
    if not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99:
        raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
    if p["announce-initial"] > 100000:
        raise _expects("announce_initial", "a value between 0 and 100000")
    if p["announce-max"] > 100000:
        raise _expects("announce_max", "a value between 0 and 100000")
    if p["announce-rounds"] > 1000:
        raise _expects("announce_rounds", "a value between 0 and 1000")
    if not 1 <= p["announce-step"] <= 10000:
        raise _expects("announce_step", "a value between 0 and 10000")   # sic: 0 is refused
    if p["block-bitmap-mapping"] is not None:
        check_bitmap_mapping(p["block-bitmap-mapping"])
    if zero_copy_send and (p["multifd-compression"] != "none" or p["tls-creds"]):
        raise ParameterError(
            "Zero copy only available for non-compressed non-TLS multifd migration")
    if not 1 <= p["x-vcpu-dirty-limit-period"] <= 1000:
        raise _expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
    if p["vcpu-dirty-limit"] < 1:
        # sic: QEMU 8.2 passes this phrase to its "expects %s" format
        raise _expects("vcpu_dirty_limit", "is invalid, it must greater then 1 MB/s")
    if p.get("x-policy"):
        try:
            parse_policy(p["x-policy"])
        except PolicyError as err:
            raise ParameterError(f"Parameter 'x-policy': {err}") from None


class MigrationParameters:
    """One VM's migration parameters, starting at QEMU's defaults."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {spec.name: spec.default for spec in PARAMETER_SPECS}

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            raise KeyError(name)
        return copy.deepcopy(self._values[name])

    @property
    def mode(self) -> MigMode:
        return MigMode(self._values["mode"])

    @property
    def max_bandwidth(self) -> int:
        return int(self._values["max-bandwidth"])

    @property
    def downtime_limit(self) -> int:
        return int(self._values["downtime-limit"])

    def apply(self, changes: Mapping[str, Any], zero_copy_send: bool = False) -> list[str]:
        """Apply a ``migrate-set-parameters`` argument object, all or nothing.

        ``zero_copy_send`` tells whether that capability is on (QEMU's check consults it).
        Returns the names that were set, in schema order; raises :class:`ParameterError`.
        """
        converted: dict[str, Any] = {}
        for spec in PARAMETER_SPECS:           # the visitor walks members in schema order
            if spec.name in changes:
                converted[spec.name] = _convert(spec, changes[spec.name])
        for name in changes:
            if name not in SPECS_BY_NAME:
                raise ParameterError(f"Parameter '{name}' is unexpected")
        merged = dict(self._values)
        merged.update(converted)
        check_parameters(merged, zero_copy_send)
        self._values = merged
        return list(converted)

    def query(self) -> dict[str, Any]:
        """``query-migrate-parameters``; ``block-bitmap-mapping`` only once it was set."""
        out: dict[str, Any] = {}
        for spec in PARAMETER_SPECS:
            value = self._values[spec.name]
            if value is None:
                continue
            out[spec.name] = copy.deepcopy(value)
        return out
