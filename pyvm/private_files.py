"""Files that hold guest state are created readable by their owner only (mode 0600).

Guest memory dumps (``pmemsave``/``memsave``), serial output (``-serial file:``), the
``-D`` log and RAM files extracted by ``pyvm-analyze -x`` can carry whatever the guest
holds: keys, passwords, other users' data.  Created with the umask alone they would be
0644 under the usual 022.  Like migration files (``migration/file.c`` opens them 0600),
they are created with mode 0600; the umask can only narrow that.  A file that already
exists keeps the mode its owner gave it (``open(2)`` ignores the mode then), as QEMU's
files do.
"""

from __future__ import annotations

import os
from typing import IO, TextIO, cast

PRIVATE_MODE = 0o600


def create_private(path: str, *, append: bool = False) -> int:
    """``open(path, O_WRONLY|O_CREAT|O_TRUNC or O_APPEND|O_CLOEXEC, 0600)``; OSError as open."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    return os.open(path, flags, PRIVATE_MODE)


def open_private_binary(path: str) -> IO[bytes]:
    """A buffered binary writer on a new (or truncated) private file."""
    return os.fdopen(create_private(path), "wb")


def open_private_text(path: str, *, append: bool = False, line_buffered: bool = True) -> TextIO:
    """A text writer on a private file (logs)."""
    return cast(TextIO, os.fdopen(create_private(path, append=append), "a" if append else "w",
                                  buffering=1 if line_buffered else -1))
