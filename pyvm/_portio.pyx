# cython: language_level=3, boundscheck=False, wraparound=False
"""Native IN/OUT hooks: the C twin of ``VCpu._on_in`` / ``VCpu._on_out`` (pyvm/cpu.py).

Unicorn calls a ``UC_HOOK_INSN`` hook for every IN and OUT instruction (QEMU
target/i386/tcg/misc_helper.c ``helper_inb``... reach Unicorn's ``cpu_inb``/``cpu_outb``,
which call the hook).  Through the Python binding each call is a ctypes callback, the
binding's guard wrapper and pyvm's guard: tens of microseconds, paid by every guest at
every timer tick (EOI, PIT reload, a UART status read).  These hooks are plain C
functions registered with ``uc_hook_add`` through the function pointer the binding's
library exports; they take the GIL and call the port bus's ``read``/``write`` directly,
with the same guard as the Python hooks: an exception is stored in the owner's
``hook_error``, the run stops (``uc_emu_stop``), and :meth:`pyvm.cpu.VCpu.emu_start`
raises it after the run.  After an OUT the run also stops when the owner's
``stop_in_hook`` is set (the machine is ending).

Ports of a device with a native port path of its own (the 8259A pair, pyvm/_pic.pyx)
can be routed to it directly (:meth:`PortHooks.direct`), skipping the bus's and the
device's Python methods: the same call the device's ``io_read``/``io_write`` make, with
the bus's masking, and only while ``-d ioport`` (which the bus logs) is off.  Linux's
timer interrupt reads and writes the PIC's mask and EOI ports four times per tick.

``PYVM_DELIVERY=python`` or ``PYVM_PURE_PYTHON=1`` keep the Python hooks (the twins).
"""

cimport cython
from libc.stdint cimport uint32_t, uint64_t, uintptr_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    typedef int (*pyvm_pio_hook_add_t)(void *uc, size_t *hh, int type, void *callback,
                                       void *user_data, uint64_t begin, uint64_t end, ...);
    typedef int (*pyvm_pio_hook_del_t)(void *uc, size_t hh);
    typedef int (*pyvm_pio_emu_stop_t)(void *uc);

    /* UC_HOOK_INSN = 1 << 1 (unicorn.h, uc_hook_type); begin > end: every address; the
       variadic argument is the instruction id (UC_X86_INS_IN / UC_X86_INS_OUT). */
    static int pyvm_pio_hook_add(uintptr_t fn, void *uc, size_t *hh, void *cb, void *user,
                                 int insn) {
        return ((pyvm_pio_hook_add_t)fn)(uc, hh, 1 << 1, cb, user, (uint64_t)1, (uint64_t)0,
                                         insn);
    }
    static int pyvm_pio_hook_del(uintptr_t fn, void *uc, size_t hh) {
        return ((pyvm_pio_hook_del_t)fn)(uc, hh);
    }
    static void pyvm_pio_emu_stop(uintptr_t fn, void *uc) {
        ((pyvm_pio_emu_stop_t)fn)(uc);
    }
    """
    int pyvm_pio_hook_add(uintptr_t fn, void *uc, size_t *hh, void *cb, void *user,
                          int insn) nogil
    int pyvm_pio_hook_del(uintptr_t fn, void *uc, size_t hh) nogil
    void pyvm_pio_emu_stop(uintptr_t fn, void *uc) nogil


cdef uint32_t _on_in(void *uc, uint32_t port, int size, void *user) noexcept with gil:
    """uc_cb_insn_in_t: the value the guest reads (all ones when the bus raised)."""
    cdef PortHooks hooks = <PortHooks>user
    cdef object direct
    try:
        if hooks._direct:
            direct = hooks._direct.get(port)
            if direct is not None and "ioport" not in hooks._log_enabled:
                # IoBus.read's mask, then the hook's
                return <uint32_t>(int(direct[1](direct[0], port, size))
                                  & ((1 << (8 * size)) - 1) & 0xFFFFFFFF)
        return <uint32_t>(int(hooks._read(port, size)) & 0xFFFFFFFF)
    except BaseException as err:  # noqa: B036 - stored and re-raised after the run
        hooks._failed(err)
        return <uint32_t>((1 << (8 * size)) - 1) if size < 4 else 0xFFFFFFFF


cdef void _on_out(void *uc, uint32_t port, int size, uint32_t value, void *user) noexcept with gil:
    """uc_cb_insn_out_t."""
    cdef PortHooks hooks = <PortHooks>user
    cdef object direct = None
    try:
        if hooks._direct:
            direct = hooks._direct.get(port)
        if direct is not None and "ioport" not in hooks._log_enabled:
            direct[2](direct[0], port, size, value & ((1 << (8 * size)) - 1))
        else:
            hooks._write(port, size, value)
    except BaseException as err:  # noqa: B036 - stored and re-raised after the run
        hooks._failed(err)
        return
    if hooks._owner.stop_in_hook:
        pyvm_pio_emu_stop(hooks._emu_stop, hooks._uc)


# no_gc_clear: the vCPU and its hooks form a cycle; when the collector breaks it, the
# engine (``engine``, kept below) must still be open while __dealloc__ removes the hooks.
@cython.no_gc_clear
cdef class PortHooks:
    """The IN and OUT hooks of one engine, calling ``read(port, size)`` and
    ``write(port, size, value)``; ``owner`` (the vCPU) receives ``hook_error`` and is
    asked for ``stop_in_hook``.  ``engine`` (the binding's ``Uc``) is kept alive until the
    hooks are removed.  ``detach()`` removes them (the engine must not be running)."""

    cdef void *_uc
    cdef uintptr_t _emu_stop
    cdef uintptr_t _hook_del
    cdef size_t _hh_in
    cdef size_t _hh_out
    cdef object _read
    cdef object _write
    cdef object _owner
    cdef object _engine
    cdef dict _direct
    cdef object _log_enabled
    cdef readonly bint attached

    def __cinit__(self, uintptr_t uc_handle, uintptr_t hook_add_fn, uintptr_t hook_del_fn,
                  uintptr_t emu_stop_fn, int insn_in, int insn_out, object read, object write,
                  object owner, object engine):
        cdef int err
        self._engine = engine
        self._uc = <void *>uc_handle
        self._emu_stop = emu_stop_fn
        self._hook_del = hook_del_fn
        self._read = read
        self._write = write
        self._owner = owner
        self._direct = {}
        self._log_enabled = frozenset()
        err = pyvm_pio_hook_add(hook_add_fn, self._uc, &self._hh_in, <void *>_on_in,
                                <void *>self, insn_in)
        if err:
            raise RuntimeError(f"uc_hook_add (IN) failed with Unicorn error {err}")
        err = pyvm_pio_hook_add(hook_add_fn, self._uc, &self._hh_out, <void *>_on_out,
                                <void *>self, insn_out)
        if err:
            pyvm_pio_hook_del(hook_del_fn, self._uc, self._hh_in)
            raise RuntimeError(f"uc_hook_add (OUT) failed with Unicorn error {err}")
        self.attached = True

    def direct(self, int first, int count, object device, object read, object write,
               object log_enabled):
        """Route ports [first, first + count) to ``read(device, port, size)`` and
        ``write(device, port, size, value)`` (a device's native port path) while the
        set ``log_enabled`` (the machine log's topics) has no ``ioport``."""
        self._log_enabled = log_enabled
        for port in range(first, first + count):
            self._direct[port] = (device, read, write)

    cdef void _failed(self, object err):
        # as VCpu._guard: keep the error, end the run now
        self._owner.hook_error = err
        pyvm_pio_emu_stop(self._emu_stop, self._uc)

    def detach(self):
        if self.attached:
            self.attached = False
            pyvm_pio_hook_del(self._hook_del, self._uc, self._hh_in)
            pyvm_pio_hook_del(self._hook_del, self._uc, self._hh_out)

    def __dealloc__(self):
        # The engine must never call a freed object: detach() comes first (VCpu.close).
        # Without it, remove the hooks here, unless the engine is already closed: the
        # binding closes every engine from a weakref.finalize at interpreter exit, which
        # may run before this object goes.
        cdef bint open_engine = False
        if self.attached:
            self.attached = False
            try:        # at interpreter exit the binding's module may be half torn down
                open_engine = bool(self._engine._Uc__finalizer.alive)
            except BaseException:  # noqa: B036 - nothing may escape a deallocator
                open_engine = False
            if open_engine:
                pyvm_pio_hook_del(self._hook_del, self._uc, self._hh_in)
                pyvm_pio_hook_del(self._hook_del, self._uc, self._hh_out)
