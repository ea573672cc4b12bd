# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The run loop's idle tick in one native call (pyvm/machine.py ``Machine._idle_native``).

While every vCPU is halted, the Python run loop makes two passes per timer tick: one
wakes at the PIT's deadline, raises IRQ 0, acknowledges and delivers it and runs the
handler; the next finds nothing to do and waits.  Each pass reads the clock, asks every
timer device for its deadline, enters the loop's condition variable a few times and
goes through ``Uc.emu_start``'s wrapper: a few hundred microseconds of interpreter per
tick, several percent of a core for a guest that does nothing.

:meth:`IdleTicker.run` does the same steps, in the same order, as a loop in C:

1. return if the loop has work: a kick, a request from another thread, the VM ending,
   the VM no longer running, vCPU 0 no longer halted;
2. return if a deadline of another timer device (the RTC, the UART...) has passed: the
   Python loop runs it;
3. fire the PIT's deadline when it has passed (:func:`pyvm._pit.run_timers`, IRQ 0
   straight into the native 8259A);
4. when the PIC has an interrupt and vCPU 0 has IF=1: acknowledge it, deliver it
   (``VCpu.deliver``, natively through the IDT), and run vCPU 0 with
   ``uc_emu_start`` called directly, under the same slice budget and kick protocol as
   ``Machine._run_slice``; back to 1. when the run ended at HLT, else return (an
   exception, a fault, a stop request or a guest that stopped halting: the Python side
   finishes the run exactly as after its own ``emu_start``);
5. wait without the GIL in ``ppoll`` on the loop's wake-up eventfd (``Machine.kick``
   writes it while this runs) until the earliest deadline (at most 0.5 s, as
   ``Machine._idle``); return when woken, else back to 1.

Port I/O from the handler still goes through the IN/OUT hooks (pyvm/_portio.pyx) to the
port bus and its devices.  Device state is never cached here: every step reads the
devices' own attributes, so a migration, a reset or a monitor command (all of which
come through a kick) find nothing stale.  The Python loop is the twin: with
``PYVM_DELIVERY=python`` it runs alone, and the guest sees the same interrupts at the
same virtual times either way (the same deadlines, the same order of steps).
"""

from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.errno cimport errno, EINTR

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>
    #include <time.h>
    #include <poll.h>
    #include <signal.h>
    typedef int (*pyvm_idle_emu_start_t)(void *uc, uint64_t begin, uint64_t until,
                                         uint64_t timeout, size_t count);
    static int pyvm_idle_emu_start(uintptr_t fn, void *uc, uint64_t begin) {
        /* exits mode (pyvm/cpu.py VCpu.__init__): no end address is set */
        return ((pyvm_idle_emu_start_t)fn)(uc, begin, (uint64_t)1 << 62, 0, 0);
    }
    static int64_t pyvm_idle_monotonic_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);    /* time.monotonic_ns() on Linux */
        return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    }
    /* 1 when fd is readable within timeout_ns (<= 0: just look), 0 when not, -errno. */
    static int pyvm_idle_wait(int fd, int64_t timeout_ns) {
        struct pollfd p;
        struct timespec ts;
        int r;
        if (timeout_ns < 0)
            timeout_ns = 0;
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        p.fd = fd;
        p.events = POLLIN;
        p.revents = 0;
        r = ppoll(&p, 1, &ts, NULL);
        if (r < 0)
            return -errno;
        return r > 0 ? 1 : 0;
    }
    """
    int pyvm_idle_emu_start(uintptr_t fn, void *uc, uint64_t begin) nogil
    int64_t pyvm_idle_monotonic_ns() nogil
    int pyvm_idle_wait(int fd, int64_t timeout_ns) nogil

from pyvm import _pic, _pit
from pyvm.errors import GuestFault

# What run() returns (pyvm/machine.py reads them as IDLE_*).
KICKED = 0          # a kick, a request, the end of the VM or a wake-up of the eventfd
DEADLINE = 1        # another device's deadline passed: the Python loop runs its timers
NOT_IDLE = 2        # the VM is not running, or vCPU 0 is not halted
RAN = 3             # vCPU 0 ran and did not end at HLT: the Python loop carries on

DEF MAX_WAIT_NS = 500000000         # Machine._idle's longest wait
DEF NO_DEADLINE = 0x7FFFFFFFFFFFFFFF


cdef class IdleTicker:
    """The idle tick of one machine (see the module docstring).  ``machine`` is the
    :class:`pyvm.machine.Machine`; ``others`` the timer devices other than the PIT;
    ``wake_fd`` the eventfd ``Machine.kick`` writes while :meth:`run` runs;
    ``emu_start_fn`` the address of ``uc_emu_start``."""

    cdef object _m
    cdef object _cpu
    cdef object _native
    cdef object _stopper
    cdef object _engine
    cdef object _pic
    cdef object _pit
    cdef object _clock
    cdef object _requests
    cdef object _exit
    cdef object _wake
    cdef object _runstate
    cdef object _run_ns
    cdef list _others
    cdef void *_uc
    cdef uintptr_t _emu_start
    cdef int _fd
    cdef int64_t _slice_ns
    #: interrupts delivered and handled natively so far (tests read it)
    cdef public long ticks

    def __cinit__(self, object machine, list others, int wake_fd, uintptr_t emu_start_fn,
                  int64_t slice_ns):
        cpu = machine.cpus[0]
        self._m = machine
        self._cpu = cpu
        self._native = cpu.native_delivery
        self._stopper = cpu.stopper
        self._engine = cpu.uc
        self._uc = <void *><uintptr_t>cpu.uc._uch.value
        self._pic = machine.pic
        self._pit = machine.pit
        self._clock = machine.clock
        self._requests = machine._requests
        self._exit = machine._exit_event
        self._wake = machine._wake
        self._runstate = machine.runstate
        self._run_ns = machine.cpu_run_ns
        self._others = list(others)
        self._fd = wake_fd
        self._emu_start = emu_start_fn
        self._slice_ns = slice_ns
        self.ticks = 0

    cdef int64_t _other_deadline(self):
        cdef int64_t earliest = NO_DEADLINE, d
        for dev in self._others:
            got = dev.deadline()
            if got is not None:
                d = got
                if d < earliest:
                    earliest = d
        return earliest

    cdef bint _has_work(self):
        return bool(self._m._kicked or not self._requests.empty())

    def run(self):
        """Handle timer ticks while vCPU 0 stays halted; return why it stopped (KICKED,
        DEADLINE, NOT_IDLE or RAN).  Exceptions from the steps it calls propagate."""
        cdef int64_t now, base, other = 0, pit_d, earliest, timeout
        cdef int r
        cdef bint fresh = True
        cpu = self._cpu
        pic = self._pic
        pit = self._pit
        clock = self._clock
        while True:
            # 1. work for the Python loop.  A change of run state, the end of the VM and
            # any other thread's change to a device come with a kick; so do the other
            # devices' deadlines, except through port I/O of the handler: they are read
            # again after each run (``fresh``).
            if self._has_work():
                return KICKED
            if fresh:
                if self._exit.is_set() or not self._runstate.running:
                    return KICKED
            if not cpu.halted:
                return NOT_IDLE
            got = clock._base
            if got is None:
                return NOT_IDLE
            base = got
            now = pyvm_idle_monotonic_ns() - base
            # 2. the other devices' deadlines, as Machine._run_timers sees them
            if fresh:
                other = self._other_deadline()
                fresh = False
            if other <= now:
                return DEADLINE
            # 3. the PIT
            pit_d = pit.irq_next_time
            if 0 <= pit_d <= now:
                _pit.run_timers(pit, now, pic, _pic.set_irq_on_loop)
                pit_d = pit.irq_next_time
            earliest = other
            if 0 <= pit_d < earliest:
                earliest = pit_d
            # 4. an interrupt for vCPU 0 (Machine._deliver_interrupts)
            if _pic.has_pending(pic):
                r = self._native.interrupts_enabled()
                if r < 0:
                    return NOT_IDLE     # the Python side reads it again and raises
                if r:
                    vector = _pic.acknowledge(pic)
                    try:    # Machine._deliver, without its frame
                        cpu.deliver(vector, None)
                    except GuestFault as fault:
                        cpu.halted = False
                        self._m._guest_fault(cpu, fault)
                        return NOT_IDLE
                    cpu.halted = False
                    self.ticks += 1
                    if not self._run(earliest):
                        return RAN
                    fresh = True
                    continue
            # 5. wait for the earliest deadline or a wake-up
            timeout = MAX_WAIT_NS
            if earliest != NO_DEADLINE:
                now = pyvm_idle_monotonic_ns() - base
                if earliest - now < timeout:
                    timeout = earliest - now
            if timeout > 0:
                with nogil:
                    r = pyvm_idle_wait(self._fd, timeout)
                if r == 1:
                    return KICKED
                if r < 0 and r != -EINTR:
                    raise OSError(-r, "ppoll on the run loop's wake-up eventfd failed")

    cdef bint _run(self, int64_t deadline) except -1:
        """One slice of vCPU 0 as Machine._run_slice runs it; True when it ended at HLT
        with nothing left for the Python side."""
        cdef int64_t budget = self._slice_ns, started, ended, now
        cdef int err
        cdef long stops
        cdef uint64_t pc_c
        cpu = self._cpu
        m = self._m
        native = self._native
        stopper = self._stopper
        base = self._clock._base
        if base is None:
            return False
        if deadline != NO_DEADLINE:
            now = pyvm_idle_monotonic_ns() - <int64_t>base
            if deadline - now < budget:
                budget = max(0, deadline - now)
        if _pic.has_pending(self._pic) and native.interrupts_enabled() == 0:
            budget = 0          # an interrupt window, as in Machine._run_slice
        if cpu._in_flight:
            return False        # rare here: the Python run clears the exception in flight
        pc = native.pc()
        if pc < 0:
            return False        # the Python run reads it again and raises the error
        stopper.set_deadline(pyvm_idle_monotonic_ns() + budget)
        stops = stopper.stops
        # the condition's own lock, as ``with self._wake`` in Machine._run_slice
        self._wake.acquire()
        try:
            cpu.clear_stop()
            if m._kicked:
                cpu.request_stop()
            m._running = cpu
        finally:
            self._wake.release()
        engine = self._engine
        pc_c = pc
        engine._hook_exception = None
        started = pyvm_idle_monotonic_ns()
        try:
            with nogil:
                err = pyvm_idle_emu_start(self._emu_start, self._uc, pc_c)
        finally:
            self._wake.acquire()
            m._running = None
            self._wake.release()
        ended = pyvm_idle_monotonic_ns()
        self._run_ns[cpu.index] += ended - started
        taken = native.take()
        if (err != 0 or taken is not None or engine._hook_exception is not None
                or cpu.hook_error is not None or cpu._syscall or cpu.fault is not None):
            cpu.finish_run(err, taken, engine._hook_exception)
            m._slice_done(cpu, stops)
            return False
        cpu.syscalled = False
        if cpu.stop_in_hook or stopper.stops != stops:
            return False
        if native.stopped_at_hlt() == 1:
            cpu.halted = True
            return True
        m._slice_done(cpu, stops)       # a triple fault, or an error reading the code
        return False
