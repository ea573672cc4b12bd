"""pyvm's migration lab: write a migration algorithm in Python, replay recorded guests
under it, sweep and plot.

=================  ==================================================================
``errors``         :class:`LabError` and its subclasses (tree in its docstring)
``trace``          the versioned, compressed dirty-page trace file
``workloads``      synthetic traces with known patterns (uniform, zipf, sweep...)
``record``         record a running guest's dirty pages from the native tracker
``info``           trace summaries: writable working set over time
``link``           link models (rate, round trip, loss/jitter penalties)
``simulate``       replay a trace under a policy and a link
``sweep``          grids of simulations on Dask ``distributed``
``plots``          matplotlib figures (PNG)
``policies``       example policies, each after one paper
``cli``            the ``pyvm-lab`` command
=================  ==================================================================

The policy API itself is :mod:`pyvm.migration.policy`: the migration engine is its
main consumer, and the lab only imports it.  Imports run one way: cli → sweep, plots →
simulate, record, info → trace, link, workloads → errors, pyvm.migration.policy.
"""
