"""Linux guest workloads for the lab: Debian's kernel booted to its busybox shell, running
a workload typed at the serial console.

The guest is the one ``pyvm-linux-guest`` fetches (:mod:`pyvm.linux_guest`: Debian's stock
kernel and ``busybox-static`` in a small initramfs).  A workload is written
``NAME[:key=value,...]``:

============  ===================================================================
``memloop``   a memory-writing loop: ``dd`` reads an ``mb`` MiB file of random bytes
              (default 8) into its buffer, over and over (one process at a time,
              so roughly the same ``mb`` MiB of RAM rewritten each pass)
``dd-tmpfs``  ``dd`` copies that file into ``/tmp`` (tmpfs: the page cache *is* the
              file), truncating and rewriting ``mb`` MiB (default 8) each pass
``churn``     compile-like churn: ``files`` small files (default 64) created,
              compressed (``gzip``), checksummed (``sha256sum``) and deleted in turn,
              a process per step
``idle``      the shell waiting at its prompt
============  ===================================================================

Every workload writes random, hence non-zero, data: a page the guest writes is a whole
page on the wire, as the simulator charges it (a page of zeros would be a 9-byte
``ZERO`` record).  The lab types the workload as one background job, then waits for the
line ``pyvm-lab: NAME running``, which the job prints once its set-up and first pass are
done; :func:`start_workload` returns then, and recording or migrating begins.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from pyvm.lab.errors import LabError, WorkloadError

#: The default RAM of a Linux guest in the lab (boots with room for tmpfs files).
LINUX_RAM = "256M"
#: Seconds from start to the shell prompt (a loaded 2-core machine can take minutes).
BOOT_TIMEOUT = 300.0
#: Seconds for a workload's set-up and first pass.
READY_TIMEOUT = 180.0
#: The shell prompt of pyvm.linux_guest's busybox (the console module's default form).
PROMPT = re.compile(r"[#$>] $")

# Shell text of each workload: (set-up, one pass); ${P} is the parameter.  The seed file
# comes from /dev/urandom once (the kernel's generator is slow under emulation, so 256 KiB
# of it, repeated): every byte the workloads then write is non-zero at page granularity.
_SEED = ("head -c 262144 /dev/urandom > /tmp/seed; : > /tmp/src; "
         "i=0; while [ $i -lt $((P*4)) ]; do cat /tmp/seed >> /tmp/src; i=$((i+1)); done")
_SCRIPTS: dict[str, tuple[str, str, int]] = {
    # name: (set-up, one pass, default P)
    "memloop": (_SEED, "dd if=/tmp/src of=/dev/null bs=${P}M count=1 2>/dev/null", 8),
    "dd-tmpfs": (_SEED, "dd if=/tmp/src of=/tmp/out bs=1M count=$P 2>/dev/null", 8),
    "churn": ("head -c 65536 /dev/urandom > /tmp/seed; mkdir -p /tmp/c; n=0",
              "n=$(((n+1)%P)); gzip -c /tmp/seed > /tmp/c/$n.gz; "
              "sha256sum /tmp/c/$n.gz > /tmp/c/$n.sum; cat /tmp/c/$n.sum /tmp/seed > /tmp/c/$n.o; "
              "rm -f /tmp/c/$(((n+P/2)%P)).*", 64),
    "idle": (":", ":", 0),
}
_PARAM = {"memloop": "mb", "dd-tmpfs": "mb", "churn": "files", "idle": ""}


@dataclass(frozen=True)
class LinuxWorkload:
    """A parsed workload: its name, its one parameter, and the shell line that runs it."""

    name: str
    param: int

    @property
    def marker(self) -> str:
        return f"pyvm-lab: {self.name} running"

    @property
    def command(self) -> str:
        """One line for the shell: a background job that sets up, runs a pass, prints the
        marker and loops.  The typed line's echo never contains the marker (it is built
        from ``$W`` at run time)."""
        setup, one, _ = _SCRIPTS[self.name]
        if self.name == "idle":
            return f"W={self.name}; echo \"pyvm-lab: $W running\""
        return (f"W={self.name}; P={self.param}; ( {setup}; {one}; "
                f"echo \"pyvm-lab: $W running\"; while :; do {one}; done ) &")


def is_linux_workload(spec: str) -> bool:
    return spec.partition(":")[0] in _SCRIPTS


def parse_workload(spec: str) -> LinuxWorkload:
    """``NAME[:key=value]`` (see the module docstring)."""
    name, _, rest = spec.partition(":")
    if name not in _SCRIPTS:
        raise WorkloadError(f"unknown Linux workload '{name}'; known: {', '.join(_SCRIPTS)}")
    param = _SCRIPTS[name][2]
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key != _PARAM[name] or not _PARAM[name]:
            takes = f"takes {_PARAM[name]}=N" if _PARAM[name] else "takes no parameters"
            raise WorkloadError(f"Linux workload '{name}' {takes}, not '{item}'")
        if not value.isdigit() or not 0 < int(value) <= 4096:
            raise WorkloadError(f"Linux workload '{spec}': {key} must be a whole number "
                                "from 1 to 4096")
        param = int(value)
    return LinuxWorkload(name, param)


def linux_files() -> tuple[str, str]:
    """(kernel, initrd) of the Linux guest, fetched on first use (``pyvm-linux-guest``)."""
    from pyvm import linux_guest

    try:
        kernel, initrd = linux_guest.fetch(linux_guest.DEFAULT_DIR)
    except SystemExit as err:       # linux_guest reports its failures as SystemExit text
        raise LabError(f"the Linux guest could not be fetched: {err}") from None
    return str(kernel), str(initrd)


def linux_cmdline() -> str:
    from pyvm import linux_guest

    return linux_guest.CMDLINE


class WorkloadConsole:
    """The serial console of a booting Linux guest, on ``socket_path``
    (``-serial unix:PATH,server=on,wait=off``)."""

    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        from pyvm import console_cli

        class Discard(console_cli.Output):
            def write(self, text: str) -> None:
                pass

        try:
            self._con: Any = console_cli.Console(console_cli.connect(socket_path, timeout),
                                                 Discard())
        except console_cli.ConsoleError as err:
            raise LabError(f"Linux guest: {err}") from None

    def start(self, wl: LinuxWorkload, boot_timeout: float = BOOT_TIMEOUT,
              ready_timeout: float = READY_TIMEOUT) -> None:
        """Wait for the shell, type the workload, wait for its marker."""
        from pyvm import console_cli

        try:
            self._con.wait_prompt(PROMPT, boot_timeout, wake=True)
            self._con.mark()
            self._con.type(wl.command)
            self._con.wait_for(re.compile(re.escape(wl.marker)), ready_timeout)
        except console_cli.ConsoleError as err:
            raise LabError(f"Linux workload '{wl.name}': {err}") from None

    def stop(self, timeout: float = 60.0) -> None:
        """End the background job (its whole process group) and wait for the prompt."""
        from pyvm import console_cli

        try:
            self._con.mark()
            line = "kill %1 2>/dev/null; wait"
            self._con.type(line)
            self._con.wait_prompt(PROMPT, timeout, after=line)
        except console_cli.ConsoleError as err:
            raise LabError(f"Linux guest: stopping the workload: {err}") from None

    def close(self) -> None:
        self._con.sock.close()


def serial_path(folder: str) -> str:
    return os.path.join(folder, "serial.sock")
