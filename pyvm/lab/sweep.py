"""Grids of simulated migrations on Dask ``distributed``.

A sweep runs every combination of policies x traces x links x start times.  A trace is a
file path or a synthetic workload spec (:mod:`pyvm.lab.workloads`); each worker loads it
once and keeps it.  Cells are grouped into batches (one Dask task each) so that
scheduling costs little next to the simulations.  With no scheduler address the sweep
starts a :class:`distributed.LocalCluster` of ``workers`` single-threaded processes and
closes it at the end.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence
from urllib.parse import urlsplit

from pyvm.lab.errors import LabError
from pyvm.lab.link import LinkModel
from pyvm.lab.simulate import DEVICE_BYTES, simulate_safely
from pyvm.lab.trace import Trace, load
from pyvm.lab.workloads import synthesize
from pyvm.migration.policy import Limits, PolicyError, load_policy

COLUMNS = ["policy", "trace", "link", "start", "status", "rounds", "pages_sent",
           "bytes_sent", "total_time", "downtime", "precopy_time", "postcopy_bytes",
           "final_pages", "throttle_pct", "error"]


@dataclass(frozen=True)
class Cell:
    """One simulated migration of a sweep."""

    policy: str
    trace: str
    link: str
    start: float


@functools.lru_cache(maxsize=16)
def open_trace(ref: str) -> Trace:
    """The trace a sweep names: a file if one exists at ``ref``, else a workload spec."""
    if os.path.exists(ref):
        return load(ref)

    return synthesize(ref)


def run_cells(cells: Sequence[Cell], limits: Limits, device_bytes: int = DEVICE_BYTES) -> list[
        dict[str, Any]]:
    """Simulate ``cells`` here (the body of one Dask task)."""
    rows = []
    for c in cells:
        trace = open_trace(c.trace)
        link = LinkModel.parse(c.link)
        try:
            policy = load_policy(c.policy)
        except PolicyError as err:
            rows.append({**dict.fromkeys(COLUMNS, ""), "policy": c.policy, "trace": c.trace,
                         "link": c.link, "start": c.start, "status": "failed",
                         "error": str(err)})
            continue
        res = simulate_safely(trace, policy, link, limits, device_bytes=device_bytes,
                              start=c.start, trace_name=c.trace, keep_history=False)
        row = res.row()
        row["link"] = c.link
        row["start"] = c.start
        rows.append(row)
    return rows


def grid(policies: Sequence[str], traces: Sequence[str], links: Sequence[str],
         starts: int = 1) -> list[Cell]:
    """Every combination; ``starts`` start times spread evenly over each trace."""
    cells = []
    for t in traces:
        duration = open_trace(t).duration
        offsets = [duration * i / starts for i in range(starts)]
        for link in links:
            LinkModel.parse(link)          # a typo fails here, not in a worker
            for p in policies:
                for s in offsets:
                    cells.append(Cell(p, t, link, s))
    return cells


def batches(cells: Sequence[Cell], size: int) -> list[list[Cell]]:
    return [list(cells[i:i + size]) for i in range(0, len(cells), max(1, size))]


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int = 2,
                timeout: float = 30) -> Iterator[Any]:
    """A :class:`distributed.Client` of the scheduler at ``scheduler``, or of a new
    LocalCluster of ``workers`` single-threaded processes; closed (with the cluster) on
    exit."""
    if scheduler:
        try:
            _probe(scheduler, timeout)
        except OSError as err:
            raise LabError(f"sweep: cannot reach the Dask scheduler: {err}") from err
    import distributed      # deferred: Dask is heavy, and only a sweep needs it

    Client: Any = distributed.Client            # untyped library: keep mypy --strict quiet
    LocalCluster: Any = distributed.LocalCluster
    cluster: Any = None
    try:
        if scheduler:
            client = Client(scheduler, timeout=timeout)
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None)
            client = Client(cluster)
    except (OSError, ValueError) as err:     # refused, timed out, a malformed address
        if cluster is not None:
            cluster.close()
        raise LabError(f"sweep: cannot reach the Dask scheduler: {err}") from err
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _probe(address: str, timeout: float) -> None:
    """Fail fast on a tcp:// scheduler that refuses connections (Dask's client would
    retry until its timeout)."""
    if not address.startswith("tcp://"):
        return
    parts = urlsplit(address)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as err:
        raise LabError(f"sweep: bad scheduler address '{address}': {err}") from None
    if not host or not port:
        raise LabError(f"sweep: bad scheduler address '{address}': expected tcp://HOST:PORT")
    with socket.create_connection((host, port), timeout=timeout):
        pass


def run_sweep(cells: Sequence[Cell], limits: Limits = Limits(), *, scheduler: str | None = None,
              workers: int = 2, batch: int = 0, device_bytes: int = DEVICE_BYTES,
              client: Any = None) -> list[dict[str, Any]]:
    """Run ``cells`` on Dask (``client``, else :func:`dask_client`); rows in the order of
    ``cells``."""
    if not cells:
        return []
    if client is None:
        with dask_client(scheduler, workers) as own:
            return run_sweep(cells, limits, batch=batch, device_bytes=device_bytes, client=own)
    nworkers = max(1, len(client.scheduler_info().get("workers", {})))
    size = batch or max(1, min(100, len(cells) // (nworkers * 16) or 1))
    futures = client.map(run_cells, batches(cells, size), limits=limits,
                         device_bytes=device_bytes, pure=False)
    rows: list[dict[str, Any]] = []
    for part in client.gather(futures):
        rows.extend(part)
    return rows


def write_table(rows: Iterable[dict[str, Any]], path: str) -> str:
    """CSV, or Parquet when ``path`` ends in ``.parquet`` (needs pyarrow)."""
    rows = list(rows)
    if path.endswith(".parquet"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq      # optional: Parquet only when pyarrow is installed
        except ImportError:
            raise LabError("sweep: writing Parquet needs pyarrow; install it or write .csv") \
                from None
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def read_table(path: str) -> list[dict[str, Any]]:
    """Rows of a table :func:`write_table` wrote (numbers parsed back from CSV)."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = dict(row)
            for k in ("rounds", "pages_sent", "bytes_sent", "postcopy_bytes", "final_pages",
                      "throttle_pct"):
                parsed[k] = int(row[k]) if row[k] else 0
            for k in ("start", "total_time", "downtime", "precopy_time"):
                parsed[k] = float(row[k]) if row[k] else float("nan")
            out.append(parsed)
    return out
