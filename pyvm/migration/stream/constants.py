"""Numbers and names of QEMU's migration stream format (version 3), as QEMU 8.2 uses them.

Sources: migration/savevm.h and savevm.c (stream markers, commands), migration/ram.c (RAM
record flags), qapi/migration.json (capability names).  All multi-byte integers in the
stream are big-endian.
"""

from __future__ import annotations

# -- stream header and section markers (migration/savevm.h) --------------------------------
QEMU_VM_FILE_MAGIC = 0x5145564D          # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # refused on load
QEMU_VM_FILE_VERSION = 0x00000003

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

SECTION_TYPE_NAMES = {
    QEMU_VM_SECTION_START: "start",
    QEMU_VM_SECTION_PART: "part",
    QEMU_VM_SECTION_END: "end",
    QEMU_VM_SECTION_FULL: "full",
}

# -- target pages (x86: TARGET_PAGE_BITS 12) -------------------------------------------------
TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS
TARGET_PAGE_MASK = ~(TARGET_PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF

# -- RAM section "ram", version 4 (migration/ram.c) -----------------------------------------
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4
RAM_SAVE_FLAG_FULL = 0x01            # obsolete, never sent
RAM_SAVE_FLAG_ZERO = 0x02            # old name RAM_SAVE_FLAG_COMPRESS
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80            # RDMA registration
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100  # compress capability (removed in 9.1)
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200  # 8.1+

# -- QEMU_VM_COMMAND (savevm.c enum qemu_vm_cmd and mig_cmd_args at 8.2) ---------------------
# (value, name, payload length or -1 for variable)
MIG_COMMANDS: dict[int, tuple[str, int]] = {
    0: ("INVALID", -1),
    1: ("OPEN_RETURN_PATH", 0),
    2: ("PING", 4),
    3: ("POSTCOPY_ADVISE", -1),
    4: ("POSTCOPY_LISTEN", 0),
    5: ("POSTCOPY_RUN", 0),
    6: ("POSTCOPY_RAM_DISCARD", -1),
    7: ("PACKAGED", 4),
    8: ("ENABLE_COLO", 0),
    9: ("POSTCOPY_RESUME", 0),
    10: ("RECV_BITMAP", -1),
}
MIG_CMD_MAX = 11                      # 10.0 adds SWITCHOVER_START = 11; 8.2 refuses it
MIG_CMD_OPEN_RETURN_PATH = 1
MIG_CMD_PING = 2

# -- capabilities (qapi/migration.json MigrationCapability, enum order at 8.2) ---------------
MIGRATION_CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
    "mapped-ram",       # 9.0: a file with a fixed place per page (mapped_ram.py)
    "x-checksum",       # pyvm only: a CRC-32C after every section (pyvm.migration.stream.integrity)
)
# Capabilities both ends must agree on; the source lists the ones that are on in the
# "configuration/capabilities" subsection (savevm.c should_validate_capability, 8.2).
VALIDATED_CAPABILITIES: tuple[str, ...] = ("x-ignore-shared", "mapped-ram", "x-checksum")

# -- limits pyvm applies to what a peer sends ------------------------------------------------
MAX_COUNTED_STRING = 255              # one length byte
MAX_MACHINE_TYPE_LEN = 255            # QEMU machine type names are short
MAX_CAPABILITIES = len(MIGRATION_CAPABILITIES)
MAX_RAM_BLOCKS = 1024                 # blocks listed in one MEM_SIZE record
MAX_VMDESC_LEN = 16 * 1024 * 1024     # analyze-migration.py needs a zero byte in the length
