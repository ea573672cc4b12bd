"""Found by ``make fuzz`` (atheris): a stream whose XBZRLE page record is damaged made the
analyzer's clean-up raise ``BufferError: cannot close exported pointers exist`` -- the
traceback of the stream error still held the decoder's frames and their views of the
block's mapping -- so the error report became a traceback (pyvm-analyze) or an unexpected
exception (the torture decoder).  Closing must tolerate a view that is still alive."""

from __future__ import annotations

import pytest

from pyvm.analyze import AnalyzerTarget
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream.ram_loader import load_xbzrle_page


def test_closing_the_analyzer_target_while_a_page_view_is_alive() -> None:
    target = AnalyzerTarget({"devices": []}, dump_memory=False, extract=False)
    block = target.ram_block("pc.ram", 1 << 20)
    assert block is not None
    page = memoryview(block.buffer)[4096:8192]
    target.close()                      # raised BufferError before the fix
    page.release()


def test_a_damaged_xbzrle_page_error_survives_the_clean_up() -> None:
    target = AnalyzerTarget({"devices": []}, dump_memory=False, extract=False)
    block = target.ram_block("pc.ram", 1 << 20)
    assert block is not None
    with pytest.raises(MigrationError, match="wrong compression"):
        try:
            # the loader's frame keeps its view of the page in the traceback
            load_xbzrle_page(2, 3, memoryview(b"\x00\x01\x05"),
                             memoryview(block.buffer)[0:4096], 0)
        finally:
            target.close()
