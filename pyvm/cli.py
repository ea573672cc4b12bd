"""The ``pyvm`` command line, in QEMU's syntax for what pyvm supports.

Every user error ends as one line ``pyvm: <option>: <problem>`` and exit status 1 —
never a traceback.  ``pyvm -h`` lists the options.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid as uuidlib
from dataclasses import dataclass, field

from pyvm import __version__
from pyvm.chardev import resolve_chardev
from pyvm.config import MACHINE_ALIASES, DebugExitConfig, DriveConfig, MachineConfig
from pyvm.errors import ConfigError, PyvmError
from pyvm.guests import catalogue_text, find_guest, guest_path
from pyvm.log import TOPICS
from pyvm.machine import Machine
from pyvm.qmp.options import parse_monitor_options, uses_stdio
from pyvm.ram import BACKEND_TYPES, MemoryBackendConfig
from pyvm.size import parse_size
from pyvm.tls import TLS_OBJECT_TYPES, TlsError
from pyvm.tls import make_object as make_tls_object

# option -> (takes an argument, help text)
OPTIONS: dict[str, tuple[bool, str]] = {
    "h": (False, "print this help and exit"),
    "help": (False, "print this help and exit"),
    "version": (False, "print the version and exit"),
    "m": (True, "[size=]SIZE guest RAM (default 128M; suffixes K, M, G)"),
    "smp": (True, "[cpus=]N number of vCPUs (round robin on one host thread)"),
    "machine": (True, "[type=]pc[,memory-backend=ID]"),
    "M": (True, "same as -machine"),
    "object": (True, "memory-backend-{ram,memfd,file},id=ID,size=SIZE[,share=on][,prealloc=on][,mem-path=PATH]"
                     " | tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]"
                     " | tls-creds-psk,id=ID,dir=DIR,endpoint=server|client[,username=NAME]"
                     " | authz-simple,id=ID,identity=DN"
                     " | authz-list,id=ID[,policy=deny|allow][,rules.N.match=DN,rules.N.policy=allow|deny]"),
    "drive": (True, "file=IMG[,format=raw][,if=ide][,cache=writethrough|writeback][,readonly=on]"),
    "hda": (True, "IMG: same as -drive file=IMG,format=raw (or a bundled boot sector's name)"),
    "kernel": (True, "Linux bzImage or vmlinux, an ELF file (32- or 64-bit), or a bundled guest's name (-kernel help)"),
    "append": (True, "command line for -kernel (Linux: boot_params; ELF: at 0x7000, address in ESI)"),
    "initrd": (True, "FILE: initial ram disk for a Linux -kernel"),
    "bios": (True, "flat image mapped below 1 MiB, started at F000:FFF0"),
    "serial": (True, "stdio|file:PATH|unix:PATH,server=on,wait=off|tcp:H:P,server=on,wait=off[,tls-creds=ID,tls-authz=ID]|chardev:ID|null|none"),
    "nographic": (False, "no display; serial port on stdio"),
    "display": (True, "none (pyvm has no display)"),
    "S": (False, "do not start the guest until 'cont'"),
    "name": (True, "NAME of the guest (query-name)"),
    "uuid": (True, "UUID of the guest (query-uuid)"),
    "no-reboot": (False, "exit instead of rebooting"),
    "no-shutdown": (False, "stay up (paused) when the guest shuts down"),
    "device": (True, "isa-debug-exit[,iobase=PORT][,iosize=N]"),
    "d": (True, "LIST of log items (-d help)"),
    "D": (True, "FILE to log to"),
    "qmp": (True, "unix:PATH,server=on,wait=off | tcp:HOST:PORT,server=on,wait=off | stdio"),
    "monitor": (True, "stdio: the human monitor (HMP)"),
    "chardev": (True, "socket,id=ID,path=PATH|host=H,port=P,server=on,wait=off"),
    "mon": (True, "chardev=ID,mode=control|readline"),
    "incoming": (True, "URI | defer: wait for an incoming migration"),
    "rdma-provider": (True, "NAME: libfabric provider for rdma: (verbs, tcp; default: best available)"),
}


@dataclass
class ParsedArgs:
    cfg: MachineConfig
    qmp: list[str] = field(default_factory=list)
    monitor: list[str] = field(default_factory=list)
    chardev: list[str] = field(default_factory=list)
    mon: list[str] = field(default_factory=list)
    action: str = "run"       # run | help | version


def split_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """Split QEMU's ``key=value,key=value`` (``,,`` escapes a comma); a bare first item is
    ``implied=item``; a bare later item is ``item=on``."""
    items: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                cur += ","
                i += 2
                continue
            items.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    items.append(cur)
    out: list[tuple[str, str]] = []
    for n, item in enumerate(items):
        if "=" in item:
            k, v = item.split("=", 1)
            out.append((k, v))
        elif n == 0 and implied is not None:
            out.append((implied, item))
        elif item:
            out.append((item, "on"))
    return out


def _bool(opt: str, key: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ConfigError(f"{opt}: Parameter '{key}' expects 'on' or 'off'")


def _size(opt: str, key: str, value: str, default_suffix: str = "") -> int:
    try:
        return parse_size(value, default_suffix)
    except ValueError:
        raise ConfigError(f"{opt}: Parameter '{key}' expects a size (e.g. 256M)") from None


def _int(opt: str, key: str, value: str) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"{opt}: Parameter '{key}' expects a number") from None


def parse_args(argv: list[str]) -> ParsedArgs:
    cfg = MachineConfig()
    pa = ParsedArgs(cfg)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            raise ConfigError(f"{arg}: invalid option (pyvm takes only options; see -h)")
        name = arg.lstrip("-")
        if name not in OPTIONS:
            raise ConfigError(f"{arg}: invalid option")
        takes_arg = OPTIONS[name][0]
        value = ""
        if takes_arg:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg}: requires an argument")
            value = argv[i + 1]
            i += 2
        else:
            i += 1
        _apply(pa, name, f"-{name} {value}".strip(), value)
    if cfg.nographic and not cfg.serial:
        cfg.serial = ["stdio"]
    return pa


def _apply(pa: ParsedArgs, name: str, opt: str, value: str) -> None:
    cfg = pa.cfg
    if name in ("h", "help"):
        pa.action = "help"
    elif name == "version":
        pa.action = "version"
    elif name == "m":
        opts = dict(split_opts(value, "size"))
        unknown = set(opts) - {"size", "slots", "maxmem"}
        if unknown:
            raise ConfigError(f"{opt}: Invalid parameter '{sorted(unknown)[0]}'")
        cfg.ram_size = _size(opt, "size", opts.get("size", ""), "M")
        if cfg.ram_size < 1 << 20 or cfg.ram_size % 4096:
            raise ConfigError(f"{opt}: RAM size must be at least 1 MiB and a multiple of 4 KiB")
        cfg.ram_size_given = True
    elif name == "smp":
        opts = dict(split_opts(value, "cpus"))
        n = _int(opt, "cpus", opts.get("cpus", "1"))
        if not 1 <= n <= 64:
            raise ConfigError(f"{opt}: Invalid SMP CPUs {n} (pyvm supports 1 to 64)")
        cfg.smp = n
    elif name in ("machine", "M"):
        for k, v in split_opts(value, "type"):
            if k == "type":
                if v not in MACHINE_ALIASES:
                    raise ConfigError(f"{opt}: unsupported machine type '{v}' (use 'pc')")
            elif k == "memory-backend":
                cfg.memory_backend = v
            elif k in ("accel",):
                if v != "tcg":
                    raise ConfigError(f"{opt}: accelerator '{v}' is not available (pyvm runs Unicorn)")
            else:
                raise ConfigError(f"{opt}: Invalid parameter '{k}'")
    elif name == "object":
        _parse_object(cfg, opt, value)
    elif name == "drive":
        _parse_drive(cfg, opt, value)
    elif name == "hda":
        bundled = find_guest(value, "-hda")
        cfg.drives.append(DriveConfig(file=guest_path(bundled.file), readonly=True)
                          if bundled else DriveConfig(file=value))
    elif name == "kernel":
        if value == "help":
            pa.action = "kernel-help"
        bundled = find_guest(value, "-kernel")
        cfg.kernel = guest_path(bundled.file) if bundled else value
    elif name == "append":
        cfg.append = value
    elif name == "initrd":
        cfg.initrd = value
    elif name == "bios":
        cfg.bios = value
    elif name == "serial":
        cfg.serial.append(value)
    elif name == "nographic":
        cfg.nographic = True
    elif name == "display":
        if split_opts(value, "type")[0][1] != "none":
            raise ConfigError(f"{opt}: pyvm has no display; only '-display none' is accepted")
        cfg.display_none = True
    elif name == "S":
        cfg.start_paused = True
    elif name == "name":
        cfg.name = dict(split_opts(value, "guest")).get("guest", value)
    elif name == "uuid":
        try:
            cfg.uuid = str(uuidlib.UUID(value))
        except ValueError:
            raise ConfigError(f"{opt}: Fail to parse UUID string") from None
    elif name == "no-reboot":
        cfg.no_reboot = True
    elif name == "no-shutdown":
        cfg.no_shutdown = True
    elif name == "device":
        _parse_device(cfg, opt, value)
    elif name == "d":
        if value == "help":
            pa.action = "log-help"
        cfg.log_items = value
    elif name == "D":
        cfg.log_file = value
    elif name == "qmp":
        pa.qmp.append(value)
    elif name == "monitor":
        pa.monitor.append(value)
    elif name == "chardev":
        pa.chardev.append(value)
    elif name == "mon":
        pa.mon.append(value)
    elif name == "incoming":
        cfg.incoming = value
    elif name == "rdma-provider":
        if not value.replace("_", "").replace(";", "").isalnum():
            raise ConfigError(f"{opt}: invalid provider name")
        os.environ["PYVM_RDMA_PROVIDER"] = value


def _parse_object(cfg: MachineConfig, opt: str, value: str) -> None:
    opts = split_opts(value, "qom-type")
    qom_type = opts[0][1] if opts else ""
    if qom_type in TLS_OBJECT_TYPES:
        _parse_tls_object(cfg, opt, qom_type, dict(opts[1:]))
        return
    if qom_type not in BACKEND_TYPES:
        raise ConfigError(f"{opt}: invalid object type: {qom_type}")
    props = dict(opts[1:])
    allowed = {"id", "size", "share", "prealloc", "merge", "dump"}
    if qom_type == "memory-backend-file":
        allowed |= {"mem-path", "align", "discard-data", "readonly"}
    for k in props:
        if k not in allowed:
            raise ConfigError(f"{opt}: Property '{qom_type}.{k}' not found")
    if "id" not in props:
        raise ConfigError(f"{opt}: Parameter 'id' is missing")
    if "size" not in props:
        raise ConfigError(f"{opt}: can't create backend with size 0")
    if props["id"] in cfg.backends:
        raise ConfigError(f"{opt}: attempt to add duplicate property '{props['id']}' to object")
    size = _size(opt, "size", props["size"])
    share_default = qom_type == "memory-backend-memfd"
    share = _bool(opt, "share", props["share"]) if "share" in props else share_default
    if qom_type == "memory-backend-file" and "mem-path" not in props:
        raise ConfigError(f"{opt}: property 'mem-path' is required")
    cfg.backends[props["id"]] = MemoryBackendConfig(
        qom_type, props["id"], size, share=share, mem_path=props.get("mem-path"),
        prealloc=_bool(opt, "prealloc", props.get("prealloc", "off")))


def _parse_tls_object(cfg: MachineConfig, opt: str, qom_type: str, props: dict[str, str]) -> None:
    if "id" not in props:
        raise ConfigError(f"{opt}: Parameter 'id' is missing")
    try:
        cfg.tls_objects.add(make_tls_object(qom_type, props))
    except TlsError as err:
        raise ConfigError(f"{opt}: {err}") from err


def _parse_drive(cfg: MachineConfig, opt: str, value: str) -> None:
    props = dict(split_opts(value))
    if "file" not in props:
        raise ConfigError(f"{opt}: Parameter 'file' is missing")
    for k in props:
        if k not in {"file", "format", "if", "index", "media", "cache", "readonly", "snapshot", "id"}:
            raise ConfigError(f"{opt}: Invalid parameter '{k}'")
    fmt = props.get("format", "raw")
    if fmt != "raw":
        raise ConfigError(f"{opt}: format '{fmt}' is not supported (pyvm reads raw images)")
    if props.get("if", "ide") != "ide":
        raise ConfigError(f"{opt}: interface '{props['if']}' is not supported (use if=ide)")
    cache = props.get("cache", "writethrough")
    if cache not in ("writethrough", "writeback"):
        raise ConfigError(f"{opt}: invalid cache option '{cache}' (writethrough or writeback)")
    cfg.drives.append(DriveConfig(file=props["file"], format=fmt, cache=cache,
                                  readonly=_bool(opt, "readonly", props.get("readonly", "off"))))


def _parse_device(cfg: MachineConfig, opt: str, value: str) -> None:
    opts = split_opts(value, "driver")
    driver = opts[0][1] if opts else ""
    if driver == "help":
        raise ConfigError("available devices: isa-debug-exit")
    if driver != "isa-debug-exit":
        raise ConfigError(f"{opt}: '{driver}' is not a valid device model name")
    d = DebugExitConfig()
    for k, v in opts[1:]:
        if k == "iobase":
            d.iobase = _int(opt, k, v)
        elif k == "iosize":
            d.iosize = _int(opt, k, v)
        else:
            raise ConfigError(f"{opt}: Property 'isa-debug-exit.{k}' not found")
    if not 0 <= d.iobase <= 0xFFFF or d.iosize not in (1, 2, 4):
        raise ConfigError(f"{opt}: iobase must be 0-0xffff and iosize 1, 2 or 4")
    cfg.debug_exit.append(d)


def usage() -> str:
    lines = [f"pyvm {__version__}: a userspace x86 virtual machine (QEMU 8.2 interface)",
             "usage: pyvm [options]   (no options: boot the 'hello' demo guest)", ""]
    for name, (takes, text) in OPTIONS.items():
        if name in ("help", "M"):
            continue
        lines.append(f"  -{name:<14}{text}")
    return "\n".join(lines)


def default_guest(cfg: MachineConfig) -> None:
    """No boot option: boot the packaged ``hello`` guest."""
    if not cfg.kernel:
        # QEMU's exact refusals (hw/core/machine.c / vl.c)
        if cfg.append is not None:
            raise ConfigError("-append only allowed with -kernel option")
        if cfg.initrd is not None:
            raise ConfigError("-initrd only allowed with -kernel option")
    if not (cfg.kernel or cfg.bios or cfg.drives):
        cfg.kernel = guest_path("hello.elf")
        cfg.default_guest = True
    if not cfg.serial:
        cfg.serial = ["null" if cfg.display_none else "stdio"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        pa = parse_args(argv)
        if pa.action == "help":
            print(usage())
            return 0
        if pa.action == "version":
            print(f"pyvm version {__version__} (QEMU 8.2 API level)")
            return 0
        if pa.action == "kernel-help":
            print(catalogue_text())
            return 0
        if pa.action == "log-help":
            print("Log items (comma separated):")
            for item, text in TOPICS.items():
                print(f"{item:<14}{text}")
            return 0
        return run(pa)
    except ConfigError as err:
        print(f"pyvm: {err}", file=sys.stderr)
        return 1
    except PyvmError as err:
        print(f"pyvm: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:            # output piped into e.g. head, which went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(pa: ParsedArgs) -> int:
    cfg = pa.cfg
    monitors = []
    if pa.qmp or pa.monitor or pa.mon or pa.chardev:
        monitors = parse_monitor_options(pa.qmp, pa.monitor, pa.chardev, pa.mon)
        if uses_stdio(monitors) and (cfg.nographic or "stdio" in cfg.serial):
            raise ConfigError("cannot use stdio by multiple character devices")
        if uses_stdio(monitors) and not cfg.serial:
            cfg.serial = ["null"]
    cfg.serial = [resolve_chardev(spec, pa.chardev) for spec in cfg.serial]
    default_guest(cfg)
    machine = Machine(cfg)
    machine.has_monitor = bool(monitors)
    service = None
    try:
        if monitors or cfg.incoming is not None:
            # Deferred: the monitor (asyncio, the QMP schema tables) and migration load only
            # when the command line asks for them, so a plain run starts without them.
            from pyvm.migration.control import monitor_commands
            from pyvm.migration.control import service as migration_service
            from pyvm.qmp.core import build_tables
            from pyvm.qmp.server import start_monitors
            if monitors:
                # This monitor's commands: the core ones and migration's, registered here.
                tables = build_tables(monitor_commands.install)
                # Clients are greeted at once; their commands wait until the VM has started.
                service = start_monitors(machine, monitors, tables, hold=True,
                                         tls_objects=cfg.tls_objects)
        _install_signals(machine)
        machine.start()
        if cfg.incoming is not None:
            migration_service.start_incoming_from_cli(machine, cfg.incoming)
        if service is not None:
            service.release()
        return machine.wait()
    finally:
        if service is not None:
            service.close()
        if monitors or cfg.incoming is not None:
            # stops and joins the migration, dirty-rate and dirty-limit threads
            from pyvm.migration.control import service as migration_service
            migration_service.shutdown(machine)
        machine.close()


def _install_signals(machine: object) -> None:
    def on_signal(signum: int, _frame: object) -> None:
        print(f"pyvm: terminating on signal {signum}", file=sys.stderr)
        machine.request_exit(0, "host-signal")  # type: ignore[attr-defined]

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    os.environ.setdefault("PYVM_PID", str(os.getpid()))
