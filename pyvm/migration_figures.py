"""PNG figures of a finished (or cancelled) migration, drawn from ``query-migrate`` samples.

Each sample is QEMU's ``MigrationInfo`` plus ``t`` (seconds since ``migrate``), as
``pyvm-migrate --history`` records them.  Three figures:

``remaining.png``   the bytes still to send when each round began (one bar per
                    ``dirty-sync-count``): a converging migration shrinks them
``throughput.png``  transfer rate over time, from the growth of ``transferred``
``timeline.png``    setup, live precopy and downtime on one time axis
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

MIB = 1 << 20


def rounds(history: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(dirty-sync-count, remaining bytes) at the first sample of each round."""
    out: list[tuple[int, int]] = []
    for s in history:
        ram = s.get("ram")
        if not ram or s.get("status") != "active":
            continue
        n = int(ram.get("dirty-sync-count", 0))
        if not out or out[-1][0] != n:
            out.append((n, int(ram.get("remaining", 0))))
    return out


def throughput(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(time s, Mbit/s) between consecutive samples."""
    out = []
    prev = None
    for s in history:
        ram = s.get("ram")
        if not ram:
            continue
        if prev is not None and s["t"] > prev[0]:
            out.append((s["t"], (ram["transferred"] - prev[1]) * 8 / 1e6 / (s["t"] - prev[0])))
        prev = (s["t"], ram["transferred"])
    return out


def write_figures(history: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    import matplotlib       # deferred: heavy, and only --figures draws
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    final = history[-1]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rs = rounds(history)
    ax.bar([str(n) for n, _ in rs], [r / MIB for _, r in rs], color="tab:orange")
    ax.set_xlabel("round (dirty-sync-count)")
    ax.set_ylabel("remaining at round start (MiB)")
    ax.set_title("Does the migration converge?")
    fig.tight_layout()
    paths.append(directory / "remaining.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    tp = throughput(history)
    ax.plot([t for t, _ in tp], [m for _, m in tp], marker=".", color="tab:blue")
    ax.set_xlabel("time since migrate (s)")
    ax.set_ylabel("throughput (Mbit/s)")
    ax.set_title("Transfer rate")
    fig.tight_layout()
    paths.append(directory / "throughput.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 2.2))
    total = final.get("total-time", 0)
    setup = final.get("setup-time", 0)
    down = final.get("downtime", 0)
    live = max(total - setup - down, 0)
    left = 0
    for label, width, color in (("setup", setup, "tab:gray"), ("live precopy", live, "tab:green"),
                                ("downtime", down, "tab:red")):
        ax.barh(0, width, left=left, color=color, label=f"{label} {width} ms")
        left += width
    ax.set_yticks([])
    ax.set_xlabel("ms")
    ax.set_title(f"{final.get('status', '?')}: total {total} ms, downtime {down} ms")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=3, frameon=False)
    fig.tight_layout()
    paths.append(directory / "timeline.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
