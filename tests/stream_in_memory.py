"""Driving the stream primitives in memory, as the tests do.

Production feeds a :class:`StreamReader` from a transport and hands a
:class:`StreamWriter`'s chunks to ``writev``; a test has the whole input, or wants the
whole output, at once.
"""

from __future__ import annotations

from typing import Generator

from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.writer import Chunk, StreamWriter


def run_to_completion(step: Generator[None, None, object], reader: StreamReader) -> object:
    """Drive ``step`` over input that is already complete.

    The reader is closed first, so a step that needs more than is buffered raises
    TruncatedStreamError instead of waiting.
    """
    reader.close()
    try:
        while True:
            next(step)
    except StopIteration as done:
        return done.value


def join_chunks(chunks: list[Chunk]) -> bytes:
    """The chunks as one bytes object (copies the page views)."""
    return b"".join(chunks)


def writer_bytes(w: StreamWriter) -> bytes:
    """Everything written to ``w`` so far as one bytes object; ``w`` starts empty again."""
    return join_chunks(w.take_chunks())
