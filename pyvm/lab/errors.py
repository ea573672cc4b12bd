"""Errors of the migration lab.

Every error the lab raises on purpose derives from :class:`LabError`::

    PyvmError
     +-- LabError             (pyvm.lab; the CLI prints it on one line, exit 1)
          +-- TraceError      a trace file is unreadable, malformed or too new
          +-- WorkloadError   an unknown workload or bad workload parameters

A policy failure is :class:`pyvm.migration.policy.PolicyError`, which names the policy;
the CLI reports it the same way.
"""

from __future__ import annotations

from pyvm.errors import PyvmError


class LabError(PyvmError):
    """Root of the lab's errors."""


class TraceError(LabError):
    """A dirty-page trace cannot be read or written."""


class WorkloadError(LabError):
    """A workload name or parameter is invalid."""
