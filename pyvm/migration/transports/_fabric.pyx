# cython: language_level=3, boundscheck=False, wraparound=False
"""A small binding over libfabric (OFI) for pyvm's rdma transport.

libfabric's calls are inline functions in its headers that jump through provider tables,
so they are called from here, not through ctypes.  Only what the transport needs is bound:
``getinfo`` for connected message endpoints (FI_EP_MSG) with FI_MSG|FI_RMA, a
:class:`Listener` (passive endpoint + event queue) that yields :class:`ConnectRequest`
objects, a :class:`Connection` (domain, completion queue, event queue, endpoint) made by
:meth:`Connection.client` or :meth:`Connection.server`, :class:`MemoryRegion`
registrations of Python buffers, ``send``/``recv``/RMA ``write`` and completion polling.

Rules kept here:

- Every status is checked; failures raise :class:`FabricError` with the call's name,
  libfabric's text and the errno.  A failed completion is read with ``fi_cq_readerr``.
- Blocking waits (``fi_cq_sread``, ``fi_eq_sread``), ``fi_getinfo`` and ``fi_mr_reg`` run
  without the GIL.  Waits take a timeout in milliseconds so callers can notice shutdown.
- Each operation carries a ``struct fi_context2`` from an array owned by the connection
  (that satisfies providers that want FI_CONTEXT/FI_CONTEXT2); the caller names operations
  by small integers and completions report those integers back.
- A registration holds the Python buffer export for its lifetime, so guest RAM cannot be
  unmapped under the NIC.  Teardown order: registrations, endpoint, CQ, EQ, domain; the
  fabric goes last, when its final user is gone.
- One thread uses a connection at a time (the transport guarantees it).
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset, strdup
from libc.stdlib cimport calloc, free
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE)

cdef extern from *:
    """
    #include <stdint.h>
    #include <sys/mman.h>
    #include <unistd.h>

    /* Back every page of a range with memory (providers with FI_MR_ALLOCATED), keeping
       its contents: MADV_POPULATE_WRITE (Linux 5.14) or, before that, a store of each
       page's first byte back into itself. */
    static void pyvm_prefault(uint8_t *start, size_t length)
    {
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        uintptr_t first = (uintptr_t)start & ~(uintptr_t)(page - 1);
        uintptr_t end = (uintptr_t)start + length;
        volatile uint8_t *p;
        if (madvise((void *)first, end - first, 23 /* MADV_POPULATE_WRITE */) == 0)
            return;
        for (p = (volatile uint8_t *)first; (uintptr_t)p < end; p += page)
            *p = *p;
    }
    """
    void pyvm_prefault(uint8_t *start, size_t length) nogil

cdef extern from "rdma/fabric.h" nogil:
    ctypedef struct fi_fid "struct fid":
        pass
    ctypedef fi_fid *fid_t
    ctypedef uint64_t fi_addr_t
    ctypedef struct fid_fabric "struct fid_fabric":
        pass
    ctypedef struct fid_domain "struct fid_domain":
        pass
    ctypedef struct fid_ep "struct fid_ep":
        pass
    ctypedef struct fid_pep "struct fid_pep":
        pass
    ctypedef struct fid_eq "struct fid_eq":
        pass
    ctypedef struct fid_cq "struct fid_cq":
        pass
    ctypedef struct fid_mr "struct fid_mr":
        pass

    ctypedef struct fi_context2 "struct fi_context2":
        pass

    ctypedef struct fi_tx_attr "struct fi_tx_attr":
        uint64_t op_flags
        uint64_t msg_order
        size_t inject_size
        size_t size
    ctypedef struct fi_rx_attr "struct fi_rx_attr":
        uint64_t msg_order
        size_t size
    ctypedef struct fi_ep_attr "struct fi_ep_attr":
        int type
        size_t max_msg_size
    ctypedef struct fi_domain_attr "struct fi_domain_attr":
        char *name
        int threading
        int resource_mgmt
        int mr_mode
        size_t mr_key_size
    ctypedef struct fi_fabric_attr "struct fi_fabric_attr":
        char *name
        char *prov_name
        uint32_t prov_version
    ctypedef struct fi_info "struct fi_info":
        fi_info *next
        uint64_t caps
        uint64_t mode
        uint32_t addr_format
        size_t src_addrlen
        size_t dest_addrlen
        void *src_addr
        void *dest_addr
        fid_t handle
        fi_tx_attr *tx_attr
        fi_rx_attr *rx_attr
        fi_ep_attr *ep_attr
        fi_domain_attr *domain_attr
        fi_fabric_attr *fabric_attr

    uint32_t FI_VERSION(uint32_t major, uint32_t minor)
    uint32_t FI_MAJOR_VERSION
    uint32_t FI_MINOR_VERSION
    uint64_t FI_MSG, FI_RMA, FI_WRITE, FI_REMOTE_WRITE, FI_SEND, FI_RECV, FI_READ
    uint64_t FI_TRANSMIT, FI_SOURCE, FI_CONTEXT, FI_CONTEXT2
    uint64_t FI_ORDER_SAS, FI_ORDER_SAW
    int FI_MR_LOCAL, FI_MR_VIRT_ADDR, FI_MR_ALLOCATED, FI_MR_PROV_KEY, FI_MR_ENDPOINT
    int FI_EP_MSG
    int FI_RM_ENABLED

    int fi_getinfo(uint32_t version, const char *node, const char *service, uint64_t flags,
                   const fi_info *hints, fi_info **info)
    void fi_freeinfo(fi_info *info)
    fi_info *fi_allocinfo()
    fi_info *fi_dupinfo(const fi_info *info)
    int fi_fabric(fi_fabric_attr *attr, fid_fabric **fabric, void *context)
    int fi_close(fid_t fid)
    uint32_t fi_version()

cdef extern from "rdma/fi_errno.h" nogil:
    const char *fi_strerror(int errnum)
    int FI_EAGAIN, FI_EAVAIL, FI_ETIMEDOUT, FI_ENODATA, FI_ECANCELED

cdef extern from "rdma/fi_domain.h" nogil:
    int fi_domain(fid_fabric *fabric, fi_info *info, fid_domain **domain, void *context)
    int fi_mr_reg(fid_domain *domain, const void *buf, size_t len, uint64_t access,
                  uint64_t offset, uint64_t requested_key, uint64_t flags, fid_mr **mr,
                  void *context)
    uint64_t fi_mr_key(fid_mr *mr)
    void *fi_mr_desc(fid_mr *mr)
    int fi_mr_bind(fid_mr *mr, fid_t bfid, uint64_t flags)
    int fi_mr_enable(fid_mr *mr)
    uint64_t FI_KEY_NOTAVAIL

cdef extern from "rdma/fi_eq.h" nogil:
    int FI_WAIT_NONE, FI_WAIT_UNSPEC
    int FI_CQ_FORMAT_MSG
    int FI_CONNREQ, FI_CONNECTED, FI_SHUTDOWN
    ctypedef struct fi_eq_attr "struct fi_eq_attr":
        size_t size
        uint64_t flags
        int wait_obj
    ctypedef struct fi_cq_attr "struct fi_cq_attr":
        size_t size
        uint64_t flags
        int format
        int wait_obj
    ctypedef struct fi_eq_cm_entry "struct fi_eq_cm_entry":
        fid_t fid
        fi_info *info
    ctypedef struct fi_eq_err_entry "struct fi_eq_err_entry":
        fid_t fid
        void *context
        uint64_t data
        int err
        int prov_errno
        void *err_data
        size_t err_data_size
    ctypedef struct fi_cq_msg_entry "struct fi_cq_msg_entry":
        void *op_context
        uint64_t flags
        size_t len
    ctypedef struct fi_cq_err_entry "struct fi_cq_err_entry":
        void *op_context
        uint64_t flags
        size_t len
        int err
        int prov_errno
        void *err_data
        size_t err_data_size
    int fi_eq_open(fid_fabric *fabric, fi_eq_attr *attr, fid_eq **eq, void *context)
    ssize_t fi_eq_read(fid_eq *eq, uint32_t *event, void *buf, size_t len, uint64_t flags)
    ssize_t fi_eq_sread(fid_eq *eq, uint32_t *event, void *buf, size_t len, int timeout,
                        uint64_t flags)
    ssize_t fi_eq_readerr(fid_eq *eq, fi_eq_err_entry *buf, uint64_t flags)
    const char *fi_eq_strerror(fid_eq *eq, int prov_errno, const void *err_data, char *buf,
                               size_t len)
    int fi_cq_open(fid_domain *domain, fi_cq_attr *attr, fid_cq **cq, void *context)
    ssize_t fi_cq_read(fid_cq *cq, void *buf, size_t count)
    ssize_t fi_cq_sread(fid_cq *cq, void *buf, size_t count, const void *cond, int timeout)
    ssize_t fi_cq_readerr(fid_cq *cq, fi_cq_err_entry *buf, uint64_t flags)
    const char *fi_cq_strerror(fid_cq *cq, int prov_errno, const void *err_data, char *buf,
                               size_t len)

cdef extern from "rdma/fi_endpoint.h" nogil:
    int fi_passive_ep(fid_fabric *fabric, fi_info *info, fid_pep **pep, void *context)
    int fi_endpoint(fid_domain *domain, fi_info *info, fid_ep **ep, void *context)
    int fi_ep_bind(fid_ep *ep, fid_t bfid, uint64_t flags)
    int fi_pep_bind(fid_pep *pep, fid_t bfid, uint64_t flags)
    int fi_enable(fid_ep *ep)
    ssize_t fi_recv(fid_ep *ep, void *buf, size_t len, void *desc, fi_addr_t src_addr,
                    void *context)
    ssize_t fi_send(fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr,
                    void *context)

cdef extern from "rdma/fi_cm.h" nogil:
    int fi_getname(fid_t fid, void *addr, size_t *addrlen)
    int fi_listen(fid_pep *pep)
    int fi_connect(fid_ep *ep, const void *addr, const void *param, size_t paramlen)
    int fi_accept(fid_ep *ep, const void *param, size_t paramlen)
    int fi_reject(fid_pep *pep, fid_t handle, const void *param, size_t paramlen)
    int fi_shutdown(fid_ep *ep, uint64_t flags)

cdef extern from "rdma/fi_rma.h" nogil:
    ssize_t fi_write(fid_ep *ep, const void *buf, size_t len, void *desc, fi_addr_t dest_addr,
                     uint64_t addr, uint64_t key, void *context)

# -- constants the Python side needs ----------------------------------------------------------
MR_LOCAL = FI_MR_LOCAL
MR_VIRT_ADDR = FI_MR_VIRT_ADDR
MR_ALLOCATED = FI_MR_ALLOCATED
MR_PROV_KEY = FI_MR_PROV_KEY
MR_ENDPOINT = FI_MR_ENDPOINT
ACCESS_SEND = FI_SEND
ACCESS_RECV = FI_RECV
ACCESS_WRITE = FI_WRITE
ACCESS_REMOTE_WRITE = FI_REMOTE_WRITE
EVENT_CONNECTED = FI_CONNECTED
EVENT_SHUTDOWN = FI_SHUTDOWN
COMP_SEND = FI_SEND
COMP_RECV = FI_RECV
COMP_WRITE = FI_WRITE

# mr_mode bits pyvm knows how to honour (fi_mr(3)): local descriptors, virtual or offset
# addressing, provider keys, pre-faulted memory, endpoint-bound registrations.
cdef int SUPPORTED_MR_MODE = (FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED |
                              FI_MR_PROV_KEY | FI_MR_ENDPOINT)
cdef int POLL_BATCH = 64
# Ordering the protocol relies on (fi_endpoint(3) msg_order): control messages arrive in the
# order sent (send after send), and a message received after RDMA writes finds their data
# in memory (send after write: a round's REGISTER_FINISHED covers the round's writes).
cdef uint64_t REQUIRED_ORDER = FI_ORDER_SAS | FI_ORDER_SAW


class FabricError(Exception):
    """A libfabric call or a completion failed.

    ``str()`` is libfabric's text for the error; ``call`` names the call, ``errno`` is
    libfabric's positive error number and ``op`` the operation number a failed completion
    belonged to (-1 when not known).
    """

    def __init__(self, call, errno_, detail="", op=-1):
        text = fi_strerror(errno_).decode("utf-8", "replace")
        message = text + (f" ({detail})" if detail and detail != text else "")
        super().__init__(message)
        self.call = call
        self.errno = errno_
        self.op = op


cdef inline int _check(int rc, str call) except -1:
    if rc < 0:
        raise FabricError(call, -rc)
    return rc


def library_version():
    """The runtime libfabric version as ``(major, minor)``."""
    cdef uint32_t v = fi_version()
    return (v >> 16, v & 0xFFFF)


cdef class Info:
    """One fi_info entry (owned copy)."""

    cdef fi_info *info

    def __dealloc__(self):
        if self.info != NULL:
            fi_freeinfo(self.info)
            self.info = NULL

    @staticmethod
    cdef Info wrap(fi_info *info):
        cdef Info obj = Info.__new__(Info)
        obj.info = info
        return obj

    @property
    def provider(self):
        return self.info.fabric_attr.prov_name.decode() if self.info.fabric_attr.prov_name else ""

    @property
    def fabric_name(self):
        return self.info.fabric_attr.name.decode() if self.info.fabric_attr.name else ""

    @property
    def domain_name(self):
        return self.info.domain_attr.name.decode() if self.info.domain_attr.name else ""

    @property
    def mr_mode(self):
        return self.info.domain_attr.mr_mode

    @property
    def mode(self):
        return self.info.mode

    @property
    def tx_size(self):
        return self.info.tx_attr.size

    @property
    def rx_size(self):
        return self.info.rx_attr.size

    @property
    def max_msg_size(self):
        return self.info.ep_attr.max_msg_size


def getinfo(node, service, bint source, provider=None):
    """Every fi_info for a connected message endpoint with FI_MSG|FI_RMA, ordered sends.

    ``source`` asks for local (listening) addresses; ``provider`` restricts the provider
    name.  A missing provider or address gives an empty list (FI_ENODATA).
    """
    cdef fi_info *hints = fi_allocinfo()
    cdef fi_info *result = NULL
    cdef fi_info *cur
    cdef int rc
    cdef bytes bnode = node.encode() if node else None
    cdef bytes bservice = str(service).encode() if service is not None else None
    cdef const char *cnode = NULL
    cdef const char *cservice = NULL
    if hints == NULL:
        raise MemoryError()
    try:
        hints.caps = FI_MSG | FI_RMA
        hints.mode = FI_CONTEXT | FI_CONTEXT2
        hints.ep_attr.type = FI_EP_MSG
        hints.domain_attr.mr_mode = SUPPORTED_MR_MODE
        hints.tx_attr.msg_order = REQUIRED_ORDER
        hints.rx_attr.msg_order = REQUIRED_ORDER
        if provider:
            hints.fabric_attr.prov_name = strdup(provider.encode())
        if bnode is not None:
            cnode = bnode
        if bservice is not None:
            cservice = bservice
        with nogil:
            rc = fi_getinfo(FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION), cnode, cservice,
                            FI_SOURCE if source else 0, hints, &result)
        if rc == -FI_ENODATA:
            return []
        _check(rc, "fi_getinfo")
        infos = []
        cur = result
        while cur != NULL:
            if provider is None or (cur.fabric_attr.prov_name != NULL and
                                    cur.fabric_attr.prov_name.decode() == provider):
                infos.append(Info.wrap(fi_dupinfo(cur)))
            cur = cur.next
        return infos
    finally:
        fi_freeinfo(hints)
        if result != NULL:
            fi_freeinfo(result)


cdef class Fabric:
    """An open fabric; closed when its last user (listener or connection) is gone."""

    cdef fid_fabric *fabric
    cdef readonly Info info

    def __cinit__(self, Info info):
        self.info = info
        _check(fi_fabric(info.info.fabric_attr, &self.fabric, NULL), "fi_fabric")

    def __dealloc__(self):
        if self.fabric != NULL:
            fi_close(<fid_t>self.fabric)
            self.fabric = NULL


cdef int _open_eq(Fabric fabric, fid_eq **eq) except -1:
    cdef fi_eq_attr attr
    memset(&attr, 0, sizeof(attr))
    attr.size = 16
    attr.wait_obj = FI_WAIT_UNSPEC
    return _check(fi_eq_open(fabric.fabric, &attr, eq, NULL), "fi_eq_open")


cdef object _eq_error(fid_eq *eq, str call):
    cdef fi_eq_err_entry err
    cdef char buf[256]
    memset(&err, 0, sizeof(err))
    if fi_eq_readerr(eq, &err, 0) < 0:
        return FabricError(call, FI_EAVAIL)
    detail = ""
    if err.prov_errno:
        detail = fi_eq_strerror(eq, err.prov_errno, err.err_data, buf, sizeof(buf)).decode(
            "utf-8", "replace")
    return FabricError(call, err.err, detail)


cdef int _eq_wait(fid_eq *eq, uint32_t *event, uint8_t *buf, size_t size, int timeout_ms,
                  str call) except -2:
    """Read one EQ event; the entry length, or -1 on timeout."""
    cdef ssize_t rc
    with nogil:
        if timeout_ms == 0:
            rc = fi_eq_read(eq, event, buf, size, 0)
        else:
            rc = fi_eq_sread(eq, event, buf, size, timeout_ms, 0)
    if rc == -FI_EAGAIN or rc == -FI_ETIMEDOUT:
        return -1
    if rc == -FI_EAVAIL:
        raise _eq_error(eq, call)
    _check(<int>rc, call)
    return <int>rc


cdef bytes _cm_data(uint8_t *buf, int length):
    cdef int header = sizeof(fi_eq_cm_entry)
    if length <= header:
        return b""
    return buf[header:length]


cdef class ConnectRequest:
    """A connection request read from a listener: the peer's private data and its info."""

    cdef fi_info *info
    cdef readonly bytes private_data

    def __dealloc__(self):
        if self.info != NULL:
            fi_freeinfo(self.info)
            self.info = NULL


cdef class Listener:
    """A passive endpoint listening for connection requests."""

    cdef readonly Fabric fabric
    cdef fid_eq *eq
    cdef fid_pep *pep

    def __cinit__(self, Info info):
        self.fabric = Fabric(info)
        _open_eq(self.fabric, &self.eq)
        _check(fi_passive_ep(self.fabric.fabric, info.info, &self.pep, NULL), "fi_passive_ep")
        _check(fi_pep_bind(self.pep, <fid_t>self.eq, 0), "fi_pep_bind")
        _check(fi_listen(self.pep), "fi_listen")

    def __dealloc__(self):
        self._close()

    cdef void _close(self):
        if self.pep != NULL:
            fi_close(<fid_t>self.pep)
            self.pep = NULL
        if self.eq != NULL:
            fi_close(<fid_t>self.eq)
            self.eq = NULL

    def close(self):
        self._close()

    def getname(self):
        """The bound socket address as raw ``struct sockaddr`` bytes."""
        cdef uint8_t addr[128]
        cdef size_t size = sizeof(addr)
        if self.pep == NULL:
            raise FabricError("fi_getname", 9)          # EBADF: closed
        _check(fi_getname(<fid_t>self.pep, addr, &size), "fi_getname")
        return addr[:size]

    def wait_request(self, int timeout_ms):
        """The next :class:`ConnectRequest`, or None when ``timeout_ms`` passes."""
        cdef uint8_t buf[512]
        cdef uint32_t event = 0
        cdef int length
        cdef fi_eq_cm_entry *entry = <fi_eq_cm_entry *>buf
        cdef ConnectRequest req
        if self.eq == NULL:
            raise FabricError("fi_eq_sread", 9)
        length = _eq_wait(self.eq, &event, buf, sizeof(buf), timeout_ms, "fi_eq_sread")
        if length < 0:
            return None
        if event != FI_CONNREQ:
            return None
        req = ConnectRequest.__new__(ConnectRequest)
        req.info = entry.info
        req.private_data = _cm_data(buf, length)
        return req

    def reject(self, ConnectRequest req, bytes private_data=b""):
        if self.pep != NULL and req.info != NULL:
            fi_reject(self.pep, req.info.handle, <const char *>private_data, len(private_data))


cdef class MemoryRegion:
    """A Python buffer range, registered with the domain when the provider needs it.

    ``address`` is the local virtual address of the range; ``key`` and ``registered``
    describe the libfabric registration (``registered`` is False for a range the provider
    does not need registered, which then only pins the buffer export).
    """

    cdef Py_buffer view
    cdef bint have_view
    cdef fid_mr *mr
    cdef void *desc
    cdef readonly uintptr_t address
    cdef readonly size_t length
    cdef readonly uint64_t key
    cdef readonly bint registered

    def __dealloc__(self):
        self.close()

    def close(self):
        if self.mr != NULL:
            fi_close(<fid_t>self.mr)
            self.mr = NULL
            self.desc = NULL
        if self.have_view:
            PyBuffer_Release(&self.view)
            self.have_view = False

    @property
    def closed(self):
        return not self.have_view

    def contains(self, size_t offset, size_t length):
        return offset <= self.length and length <= self.length - offset


cdef class Connection:
    """A connected message endpoint with its domain, CQ and EQ."""

    cdef readonly Fabric fabric
    cdef readonly Info info
    cdef fid_domain *domain
    cdef fid_eq *eq
    cdef fid_cq *cq
    cdef fid_ep *ep
    cdef fi_context2 *contexts
    cdef readonly int max_ops
    cdef readonly int mr_mode
    cdef uint64_t next_key
    cdef bint cq_waitable
    cdef object regions             # set of live MemoryRegion objects, closed first
    cdef readonly bytes peer_data

    def __cinit__(self):
        self.regions = set()
        self.next_key = 1
        self.peer_data = b""

    cdef int _open(self, Fabric fabric, fi_info *info, int max_ops) except -1:
        cdef fi_cq_attr cq_attr
        cdef int rc
        self.fabric = fabric
        self.max_ops = max_ops
        self.mr_mode = info.domain_attr.mr_mode
        self.contexts = <fi_context2 *>calloc(max_ops, sizeof(fi_context2))
        if self.contexts == NULL:
            raise MemoryError()
        _check(fi_domain(fabric.fabric, info, &self.domain, NULL), "fi_domain")
        _open_eq(fabric, &self.eq)
        memset(&cq_attr, 0, sizeof(cq_attr))
        cq_attr.size = max_ops + 16
        cq_attr.format = FI_CQ_FORMAT_MSG
        cq_attr.wait_obj = FI_WAIT_UNSPEC
        rc = fi_cq_open(self.domain, &cq_attr, &self.cq, NULL)
        self.cq_waitable = rc == 0
        if rc < 0:
            cq_attr.wait_obj = FI_WAIT_NONE
            _check(fi_cq_open(self.domain, &cq_attr, &self.cq, NULL), "fi_cq_open")
        _check(fi_endpoint(self.domain, info, &self.ep, NULL), "fi_endpoint")
        _check(fi_ep_bind(self.ep, <fid_t>self.eq, 0), "fi_ep_bind")
        _check(fi_ep_bind(self.ep, <fid_t>self.cq, FI_TRANSMIT | FI_RECV), "fi_ep_bind")
        _check(fi_enable(self.ep), "fi_enable")
        return 0

    @staticmethod
    def client(Info info, int max_ops):
        """An endpoint towards ``info``'s destination address, not yet connected."""
        cdef Connection conn = Connection.__new__(Connection)
        conn.info = info
        conn._open(Fabric(info), info.info, max_ops)
        return conn

    @staticmethod
    def server(Listener listener, ConnectRequest req, int max_ops):
        """An endpoint for a connection request, not yet accepted."""
        cdef Connection conn = Connection.__new__(Connection)
        conn.info = Info.wrap(fi_dupinfo(req.info))
        conn._open(listener.fabric, req.info, max_ops)
        return conn

    def __dealloc__(self):
        self._teardown()

    cdef void _teardown(self):
        if self.regions is not None:
            for region in list(self.regions):
                region.close()
            self.regions.clear()
        if self.ep != NULL:
            fi_close(<fid_t>self.ep)
            self.ep = NULL
        if self.cq != NULL:
            fi_close(<fid_t>self.cq)
            self.cq = NULL
        if self.eq != NULL:
            fi_close(<fid_t>self.eq)
            self.eq = NULL
        if self.domain != NULL:
            fi_close(<fid_t>self.domain)
            self.domain = NULL
        if self.contexts != NULL:
            free(self.contexts)
            self.contexts = NULL

    def close(self):
        """Release everything; the connection is unusable afterwards."""
        self._teardown()

    @property
    def closed(self):
        return self.ep == NULL

    cdef int _live(self, str call) except -1:
        if self.ep == NULL:
            raise FabricError(call, 9, "connection closed")
        return 0

    # -- connection management --------------------------------------------------------------
    def connect(self, bytes private_data):
        self._live("fi_connect")
        _check(fi_connect(self.ep, self.info.info.dest_addr, <const char *>private_data,
                          len(private_data)), "fi_connect")

    def accept(self, bytes private_data):
        self._live("fi_accept")
        _check(fi_accept(self.ep, <const char *>private_data, len(private_data)), "fi_accept")

    def wait_connected(self, int timeout_ms):
        """Wait for FI_CONNECTED; True once connected (the peer's private data is then in
        ``peer_data``), False on timeout.  A refused or failed connection raises."""
        cdef uint8_t buf[512]
        cdef uint32_t event = 0
        cdef int length
        self._live("fi_eq_sread")
        length = _eq_wait(self.eq, &event, buf, sizeof(buf), timeout_ms, "connect")
        if length < 0:
            return False
        if event == FI_CONNECTED:
            self.peer_data = _cm_data(buf, length)
            return True
        if event == FI_SHUTDOWN:
            raise FabricError("connect", 104, "the peer closed the connection")  # ECONNRESET
        raise FabricError("connect", 71, f"unexpected event {event}")         # EPROTO

    def poll_event(self):
        """A pending EQ event number (e.g. ``EVENT_SHUTDOWN``) or None; never blocks."""
        cdef uint8_t buf[512]
        cdef uint32_t event = 0
        self._live("fi_eq_read")
        if _eq_wait(self.eq, &event, buf, sizeof(buf), 0, "fi_eq_read") < 0:
            return None
        return event

    def shutdown(self):
        if self.ep != NULL:
            fi_shutdown(self.ep, 0)

    # -- memory registration ------------------------------------------------------------------
    def register(self, buffer, size_t offset, size_t length, uint64_t access, bint register,
                 bint prefault=False):
        """A :class:`MemoryRegion` for ``buffer[offset:offset+length]``.

        With ``register`` false the range is only pinned (its buffer export held) for use
        as a local source where the provider does not want FI_MR_LOCAL registrations.
        ``prefault`` touches every page first (providers with FI_MR_ALLOCATED need backed
        memory) and needs a writable buffer.
        """
        cdef MemoryRegion region = MemoryRegion.__new__(MemoryRegion)
        cdef bint writable = (access & FI_REMOTE_WRITE) != 0 or prefault
        cdef int flags = PyBUF_SIMPLE | (PyBUF_WRITABLE if writable else 0)
        cdef int rc
        cdef uint64_t requested
        cdef void *start
        self._live("fi_mr_reg")
        PyObject_GetBuffer(buffer, &region.view, flags)
        region.have_view = True
        cdef size_t size = <size_t>region.view.len
        if offset > size or length > size - offset or length == 0:
            region.close()
            raise ValueError(f"range {offset}+{length} outside a buffer of {region.view.len} bytes")
        start = <uint8_t *>region.view.buf + offset
        region.address = <uintptr_t>start
        region.length = length
        if prefault:
            with nogil:
                pyvm_prefault(<uint8_t *>start, length)
        if register:
            requested = self.next_key
            self.next_key += 1
            with nogil:
                rc = fi_mr_reg(self.domain, start, length, access, 0, requested, 0,
                               &region.mr, NULL)
            if rc < 0:
                region.close()
                _check(rc, "fi_mr_reg")
            if self.mr_mode & FI_MR_ENDPOINT:
                rc = fi_mr_bind(region.mr, <fid_t>self.ep, 0)
                if rc == 0:
                    rc = fi_mr_enable(region.mr)
                if rc < 0:
                    region.close()
                    _check(rc, "fi_mr_bind")
            region.key = fi_mr_key(region.mr)
            if region.key == FI_KEY_NOTAVAIL:
                region.close()
                raise FabricError("fi_mr_key", 95, "the provider uses raw keys")  # EOPNOTSUPP
            region.desc = fi_mr_desc(region.mr)
            region.registered = True
        self.regions.add(region)
        return region

    def release(self, MemoryRegion region):
        region.close()
        self.regions.discard(region)

    @property
    def remote_base_is_virtual(self):
        """True when the peer addresses registrations by virtual address (FI_MR_VIRT_ADDR)."""
        return bool(self.mr_mode & FI_MR_VIRT_ADDR)

    # -- data transfer ------------------------------------------------------------------------
    cdef void *_context(self, int op) except NULL:
        if op < 0 or op >= self.max_ops:
            raise ValueError(f"operation number {op} out of range")
        return <void *>&self.contexts[op]

    def post_recv(self, MemoryRegion region, size_t offset, size_t length, int op):
        """Post a receive into ``region``; False when the queue is full (retry later)."""
        self._live("fi_recv")
        if not region.contains(offset, length) or region.closed:
            raise ValueError("receive buffer outside its region")
        cdef ssize_t rc = fi_recv(self.ep, <void *>(region.address + offset), length,
                                  region.desc, 0, self._context(op))
        if rc == -FI_EAGAIN:
            return False
        _check(<int>rc, "fi_recv")
        return True

    def send(self, MemoryRegion region, size_t offset, size_t length, int op):
        """Send ``length`` bytes from ``region``; False when the queue is full."""
        self._live("fi_send")
        if not region.contains(offset, length) or region.closed:
            raise ValueError("send buffer outside its region")
        cdef ssize_t rc = fi_send(self.ep, <void *>(region.address + offset), length,
                                  region.desc, 0, self._context(op))
        if rc == -FI_EAGAIN:
            return False
        _check(<int>rc, "fi_send")
        return True

    def write(self, MemoryRegion region, size_t offset, size_t length, uint64_t remote_addr,
              uint64_t key, int op):
        """RMA-write ``length`` bytes of ``region`` to ``remote_addr`` under ``key``;
        False when the queue is full."""
        self._live("fi_write")
        if not region.contains(offset, length) or region.closed:
            raise ValueError("write source outside its region")
        cdef ssize_t rc = fi_write(self.ep, <void *>(region.address + offset), length,
                                   region.desc, 0, remote_addr, key, self._context(op))
        if rc == -FI_EAGAIN:
            return False
        _check(<int>rc, "fi_write")
        return True

    def poll(self, int timeout_ms):
        """Completed operations as a list of ``(op, flags, length)``.

        Waits up to ``timeout_ms`` (0: do not wait) for the first one.  A failed
        completion raises :class:`FabricError` carrying the operation number.
        """
        cdef fi_cq_msg_entry entries[64]
        cdef ssize_t rc
        cdef int waited = 0
        cdef int i
        self._live("fi_cq_read")
        rc = fi_cq_read(self.cq, entries, POLL_BATCH)
        if rc == -FI_EAGAIN and timeout_ms != 0:
            if self.cq_waitable:
                with nogil:
                    rc = fi_cq_sread(self.cq, entries, POLL_BATCH, NULL, timeout_ms)
            else:
                with nogil:
                    while rc == -FI_EAGAIN and waited < timeout_ms:
                        _sleep_ms(1)
                        waited += 1
                        rc = fi_cq_read(self.cq, entries, POLL_BATCH)
        if rc == -FI_EAGAIN or rc == -FI_ETIMEDOUT:
            return []
        if rc == -FI_EAVAIL:
            raise self._cq_error()
        _check(<int>rc, "fi_cq_read")
        base = <uintptr_t>self.contexts
        return [(<int>((<uintptr_t>entries[i].op_context - base) // sizeof(fi_context2)),
                 entries[i].flags, entries[i].len) for i in range(rc)]

    cdef object _cq_error(self):
        cdef fi_cq_err_entry err
        cdef char buf[256]
        cdef int op = -1
        memset(&err, 0, sizeof(err))
        if fi_cq_readerr(self.cq, &err, 0) < 0:
            return FabricError("completion", FI_EAVAIL)
        if err.op_context != NULL:
            op = <int>((<uintptr_t>err.op_context - <uintptr_t>self.contexts)
                       // sizeof(fi_context2))
        detail = ""
        if err.prov_errno:
            detail = fi_cq_strerror(self.cq, err.prov_errno, err.err_data, buf,
                                    sizeof(buf)).decode("utf-8", "replace")
        return FabricError("completion", err.err, detail, op)


cdef extern from "time.h" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec *req, timespec *rem)


cdef void _sleep_ms(int ms) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = ms // 1000
    ts.tv_nsec = (ms % 1000) * 1000000
    nanosleep(&ts, NULL)


