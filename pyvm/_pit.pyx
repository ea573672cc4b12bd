# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The 8254's per-tick path in C: the twin of :meth:`pyvm.devices.pit8254.Pit8254.run_timers`.

At every timer tick the run loop fires channel 0's deadline: one edge on IRQ 0 and the
next deadline, the first period boundary after now (modes 2 and 3), computed from the
count and the time it was loaded.  This does the same on the device's own state (the
attributes its vmsd describes, read and written in place, nothing cached), so a reset,
a migration load or a test that assigns a field sees no difference.  The Python method
stays the reference (``PYVM_PURE_PYTHON=1`` or ``PYVM_DELIVERY=python`` select it); a
test drives both over generated programming sequences and compares the state and the
edges after every step.  Reference as in pyvm/devices/pit8254.py: Intel 82C54 datasheet.

The tick arithmetic is done in 128 bits: virtual nanoseconds times the 1.193182 MHz input
clock leave 64 bits after about two hours of uptime.
"""

from libc.stdint cimport int64_t

cdef extern from *:
    """
    #include <stdint.h>
    #define PYVM_PIT_FREQ 1193182
    #define PYVM_NS_PER_S 1000000000
    /* Python's floor division, in 128 bits. */
    static __int128 pyvm_pit_floordiv(__int128 a, __int128 b) {
        __int128 q = a / b;
        if ((a % b != 0) && ((a < 0) != (b < 0)))
            q -= 1;
        return q;
    }
    /* ticks_between (pit8254.py): whole input-clock periods from start to end. */
    static __int128 pyvm_pit_ticks_between(int64_t start, int64_t end) {
        return pyvm_pit_floordiv((__int128)(end - start) * PYVM_PIT_FREQ, PYVM_NS_PER_S);
    }
    /* The next deadline of a periodic channel 0 (run_timers, modes 2 and 3): the first
       period boundary after now; 0 with *ok = 0 when it does not fit in 64 bits. */
    static int64_t pyvm_pit_next_edge(int64_t load, int64_t n, int64_t now, int *ok) {
        __int128 done = pyvm_pit_floordiv(pyvm_pit_ticks_between(load, now), n) + 1;
        __int128 tick = done * n;
        /* tick_to_ns: the first nanosecond at which tick periods have elapsed, rounded up */
        __int128 ns = pyvm_pit_floordiv(tick * PYVM_NS_PER_S + PYVM_PIT_FREQ - 1, PYVM_PIT_FREQ);
        __int128 t = (__int128)load + ns;
        if (t > INT64_MAX || t < INT64_MIN) { *ok = 0; return 0; }
        *ok = 1;
        return (int64_t)t;
    }
    """
    int64_t pyvm_pit_next_edge(int64_t load, int64_t n, int64_t now, int *ok)

DEF PIT_IRQ = 0


def run_timers(object pit, int64_t now_ns, object pic=None, object pic_set_irq=None):
    """Pit8254.run_timers: when channel 0's deadline has passed, one edge on IRQ 0 and
    the next deadline.  The edge goes through the device's context (``ctx.set_irq``),
    or, given ``pic`` and ``pic_set_irq`` (the native 8259A's ``set_irq``), straight to
    the PIC (the run loop's own thread, between runs: the context would only add a
    no-op kick).  Returns True when an edge was raised."""
    cdef int64_t t = pit.irq_next_time
    cdef int64_t n, load, nxt
    cdef long mode
    cdef int ok = 0
    if t < 0 or now_ns < t:
        return False
    if pic is not None:
        pic_set_irq(pic, PIT_IRQ, True)
        pic_set_irq(pic, PIT_IRQ, False)
    else:
        ctx = pit.ctx
        if ctx is not None:
            ctx.set_irq(PIT_IRQ, True)
            ctx.set_irq(PIT_IRQ, False)
    mode = pit.mode[0]
    if mode == 2 or mode == 3:
        # as the Python method: edges missed by a late loop are not replayed, the phase
        # stays locked to the load time
        n = pit.count[0]
        load = pit.count_load_time[0]
        if n > 0:
            nxt = pyvm_pit_next_edge(load, n, now_ns, &ok)
        if n <= 0 or not ok:      # outside what the device can hold: the reference decides
            pit._run_timers_python_tail(now_ns)
            return True
        pit.irq_next_time = nxt
    else:
        pit.irq_next_time = -1     # one-shot modes: a single edge at terminal count
    return True
