"""The sans-IO JSON codec: QEMU's lexer/parser texts, recovery, limits, writer."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from qmp_helpers import has_invalid_text
from pyvm.qmp.json_stream import JsonLimits, JsonStreamer, Parsed, ParseError, StreamItem
from pyvm.qmp.json_writer import encode_line, quote, to_json
from pyvm.qmp.key_order import qdict_order


def feed(data: bytes, limits: JsonLimits | None = None) -> list[StreamItem]:
    return JsonStreamer(limits).feed(data)


def errors(data: bytes) -> list[str]:
    return [i.desc for i in feed(data) if isinstance(i, ParseError)]


# Observed on QEMU 7.2 (qobject/json-lexer.c, qobject/json-parser.c error texts).
@pytest.mark.parametrize("sent, expected", [
    (b'{"execute": query-status}',
     ["JSON parse error, stray '-s'", "JSON parse error, expecting value"]),
    (b'{"execute": "query-status",}', ["JSON parse error, expecting value"]),
    (b'}', ["JSON parse error, expecting value"]),
    (b'hello world\n', ["JSON parse error, invalid keyword 'hello'",
                        "JSON parse error, invalid keyword 'world'"]),
])
def test_observed_parse_errors(sent: bytes, expected: list[str]) -> None:
    assert errors(sent) == expected


@pytest.mark.parametrize("sent, expected", [
    (b'{1: 2}', "JSON parse error, key is not a string in object"),
    (b'{"a" 1}', "JSON parse error, missing : in object pair"),
    (b'{"a": 1 "b": 2}', "JSON parse error, expected separator in dict"),
    (b'[1 2]', "JSON parse error, expected separator in list"),
    (b'["\\q"]', "JSON parse error, invalid escape sequence in string"),
    (b'["\\uZZZZ"]', "JSON parse error, \\uZZZZ is not a valid Unicode character"),
    (b'["\\uD800"]', "JSON parse error, \\uD800 is not a valid Unicode character"),
    (b'["\\uFFFF"]', "JSON parse error, \\uFFFF is not a valid Unicode character"),
    (b'["\xc3\x28"]', "JSON parse error, invalid UTF-8 sequence in string"),
    (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key"),
    (b'[nul]', "JSON parse error, invalid keyword 'nul'"),
    (b'01', "JSON parse error, stray '01'"),
    (b'[1.]', "JSON parse error, stray '1.]'"),
    (b'@', "JSON parse error, stray '@'"),
])
def test_parse_error_texts(sent: bytes, expected: str) -> None:
    assert errors(sent)[0] == expected


def test_values_and_extensions() -> None:
    items = feed(b"{'a': 'it\\'s', \"b\": [1, -2, 2.5, 1e2, true, false, null, \"\\u00e9\","
                 b" \"\\ud83d\\ude00\", \"\\u0000\", 'say \"hi\"']}")
    assert items == [Parsed({"a": "it's", "b": [1, -2, 2.5, 100.0, True, False, None, "é",
                                                "\U0001F600", "\x00", 'say "hi"']})]


def test_integer_ranges_follow_qnum() -> None:
    [a, b, c, d] = feed(b"9223372036854775807 18446744073709551615 18446744073709551616 "
                        b"-9223372036854775809 ")
    assert a == Parsed(9223372036854775807) and b == Parsed(18446744073709551615)
    assert isinstance(c, Parsed) and isinstance(c.value, float)
    assert isinstance(d, Parsed) and isinstance(d.value, float)


def test_split_and_concatenated_input_equivalent() -> None:
    stream = (b'{"execute": "a", "id": 1}{"execute":"b"}  [1,2]\n'
              b'{"bad": } "str" {\'x\': [{"y": "\\u0041"}]}')
    whole = feed(stream)
    streamer = JsonStreamer()
    pieces = []
    for i in range(len(stream)):
        pieces += streamer.feed(stream[i:i + 1])
    assert pieces == whole
    assert whole == [Parsed({"execute": "a", "id": 1}), Parsed({"execute": "b"}),
                     Parsed([1, 2]), ParseError("JSON parse error, expecting value"),
                     Parsed("str"), Parsed({"x": [{"y": "A"}]})]


def test_number_at_end_of_input_waits_for_lookahead() -> None:
    streamer = JsonStreamer()
    assert streamer.feed(b"12") == []
    assert streamer.feed(b"3 ") == [Parsed(123)]


def test_recovery_at_next_balanced_object() -> None:
    items = feed(b'{"execute": "x", "arguments": {"a": \x01 junk}}\n{"execute": "ok"}')
    assert items[0] == ParseError("JSON parse error, stray '\x01'")
    assert items[-1] == Parsed({"execute": "ok"})


def test_token_size_limit_then_usable() -> None:
    limits = JsonLimits(max_message_bytes=1000)
    streamer = JsonStreamer(limits)
    out = streamer.feed(b'{"execute": "' + b"a" * 5000 + b'"}\n')
    assert out[0] == ParseError("JSON token size limit exceeded")
    assert streamer.feed(b'{"execute": "query-status"}') == [Parsed({"execute": "query-status"})]


def test_token_count_limit() -> None:
    streamer = JsonStreamer(JsonLimits(max_tokens=100))
    out = streamer.feed(b"[" + b"1," * 200 + b"1]\n")
    assert out[0] == ParseError("JSON token count limit exceeded")
    assert streamer.feed(b'{"a": 1}') == [Parsed({"a": 1})]


def test_nesting_limit_default_1024() -> None:
    ok = feed(b"[" * 1024 + b"]" * 1024)
    assert len(ok) == 1 and isinstance(ok[0], Parsed)
    bad = feed(b"[" * 1025 + b"]" * 1025)
    assert bad[0] == ParseError("JSON nesting depth limit exceeded")


def test_default_message_limit_counts_all_tokens() -> None:
    limits = JsonLimits()
    items = feed(b'{"a": "' + b"x" * (limits.max_message_bytes + 10) + b'"}\n{"b": 1}')
    assert items[0] == ParseError("JSON token size limit exceeded")
    assert items[-1] == Parsed({"b": 1})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


def _valid_text(value: object) -> bool:
    if isinstance(value, str):
        return not has_invalid_text(value)
    if isinstance(value, list):
        return all(_valid_text(v) for v in value)
    if isinstance(value, dict):
        return all(_valid_text(k) and _valid_text(v) for k, v in value.items())
    return True


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_roundtrip_writer_then_parser(value: object) -> None:
    """Our writer's output parses back to the same value (floats via %.17g)."""
    if not _valid_text(value):
        return
    text = to_json(value)
    assert text.isascii()
    assert feed(text.encode() + b" ") == [Parsed(value)]
    assert json.loads(text) == value


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_parser_agrees_with_python_json(value: object) -> None:
    if not _valid_text(value):
        return
    text = json.dumps([value])
    assert feed(text.encode()) == [Parsed(json.loads(text))]


def test_writer_escapes_like_qemu() -> None:
    assert quote('a"\\\b\f\n\r\t\x01\x7f\u00e9\U0001F600\x00') == \
        '"a\\"\\\\\\b\\f\\n\\r\\t\\u0001\\u007F\\u00E9\\uD83D\\uDE00\\u0000"'
    assert quote("\ufdd0\udc00") == '"\\uFFFD\\uFFFD"'


def test_writer_numbers_and_separators() -> None:
    assert to_json({"return": {}}) == '{"return": {}}'
    assert to_json([8.5406399999999998, 0.0, 1.0, -5, True, None]) == \
        "[8.5406399999999998, 0, 1, -5, true, null]"
    assert encode_line({"return": {}}) == b'{"return": {}}\r\n'


def test_pretty_output_uses_crlf() -> None:
    assert encode_line({"return": {"a": [1]}}, pretty=True) == \
        b'{\r\n    "return": {\r\n        "a": [\r\n            1\r\n        ]\r\n    }\r\n}\r\n'


def test_deep_nesting_is_written() -> None:
    deep: list[object] = []
    cur = deep
    for _ in range(2000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    assert to_json(deep) == "[" * 2001 + "]" * 2001


# Key orders observed on QEMU 7.2 (qobject/qdict.c hashes the keys; members inserted in
# schema order).
@pytest.mark.parametrize("inserted, printed", [
    (["running", "singlestep", "status"], ["status", "singlestep", "running"]),
    (["return", "id"], ["return", "id"]),
    (["error", "id"], ["id", "error"]),
    (["class", "desc"], ["class", "desc"]),
    (["event", "timestamp", "data"], ["timestamp", "event", "data"]),
    (["major", "minor", "micro"], ["micro", "minor", "major"]),
    (["capability", "state"], ["state", "capability"]),
])
def test_qdict_key_order(inserted: list[str], printed: list[str]) -> None:
    assert qdict_order(inserted) == printed


def test_float_formatting_is_printf_17g() -> None:
    for value in (0.1, 1e-300, 123456789.123, -2.5e22):
        assert float(to_json(value)) == value
        assert to_json(value) == "%.17g" % value
    assert math.isinf(float(to_json(float("inf"))))
