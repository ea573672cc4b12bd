"""pyvm: a userspace x86 virtual machine in Python, built on Unicorn.

Guest CPUs run in Unicorn engines over guest RAM that is an mmap; dirty-page tracking
is native code (``pyvm._fastpath``); migration speaks QEMU's stream format and QMP.
"""

__version__ = "0.1.0"

# The QEMU API level pyvm implements (QMP greeting, query-version).
QEMU_API_VERSION = (8, 2, 0)
