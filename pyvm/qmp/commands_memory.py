"""pmemsave and memsave: write guest memory to a file (system/cpus.c ``qmp_pmemsave``,
``qmp_memsave``).

The file is opened (created, truncated) before any memory is read, as in QEMU, so a
failing read leaves a partial file.  Reads go in 1 MiB chunks so a large dump does not
hold the VM's memory twice.  Physical addresses outside guest RAM read as zero bytes
(QEMU reads unassigned memory without failing).
"""

from __future__ import annotations

import os
from typing import IO, Any, Callable

from pyvm.private_files import open_private_binary
from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import CommandError
from pyvm.qmp.registry import CommandTable

CHUNK = 1 << 20
PAGE = 4096
_ADDR_MASK = (1 << 64) - 1
# qapi/qmp/qerror.h QERR_IO_ERROR
IO_ERROR = "An IO error has occurred"


def _open(filename: str) -> IO[bytes]:
    try:
        return open_private_binary(filename)      # guest memory: mode 0600
    except OSError as err:
        # util/error.c error_setg_file_open
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise CommandError(f"Could not open '{filename}': {reason}") from err


def _write(f: IO[bytes], data: bytes) -> None:
    try:
        f.write(data)
    except OSError as err:
        raise CommandError(IO_ERROR) from err


def _read_physical_lenient(read: Callable[[int, int], bytes], addr: int, size: int) -> bytes:
    try:
        return read(addr, size)
    except ValueError:
        pass
    out = bytearray()
    while size > 0:
        step = min(size, PAGE - (addr % PAGE))
        try:
            out += read(addr, step)
        except ValueError:
            out += bytes(step)
        addr = (addr + step) & _ADDR_MASK
        size -= step
    return bytes(out)


def pmemsave(ctx: CommandContext, args: dict[str, Any]) -> None:
    addr, size, filename = args["val"] & _ADDR_MASK, args["size"], args["filename"]
    with _open(filename) as f:
        if size < 0:
            raise CommandError(f"Invalid addr 0x{addr:016x}/size {size} specified")
        while size > 0:
            step = min(size, CHUNK)
            _write(f, _read_physical_lenient(ctx.vm.read_physical, addr, step))
            addr = (addr + step) & _ADDR_MASK
            size -= step


def memsave(ctx: CommandContext, args: dict[str, Any]) -> None:
    orig_addr, orig_size = args["val"] & _ADDR_MASK, args["size"]
    cpu_index = args.get("cpu-index", 0)
    if cpu_index not in {c["cpu-index"] for c in ctx.vm.cpus_info()}:
        raise CommandError("Parameter 'cpu-index' expects a CPU number")
    addr, size = orig_addr, orig_size
    with _open(args["filename"]) as f:
        if size < 0:
            raise CommandError(f"Invalid addr 0x{orig_addr:016x}/size {orig_size} specified")
        while size > 0:
            step = min(size, CHUNK)
            try:
                data = ctx.vm.read_virtual(cpu_index, addr, step)
            except ValueError as err:
                raise CommandError(f"Invalid addr 0x{orig_addr:016x}/size {orig_size} "
                                   "specified") from err
            _write(f, data)
            addr = (addr + step) & _ADDR_MASK
            size -= step


def install(table: CommandTable) -> None:
    table.register("memsave", {"val": "int", "size": "int", "filename": "str",
                               "*cpu-index": "int"}, None, memsave)
    table.register("pmemsave", {"val": "int", "size": "int", "filename": "str"}, None,
                   pmemsave)
