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
``realvm``         real migrations between two pyvm processes, polled into rounds
``validate``       a real migration against the simulation of the same guest
``compare``        scenarios (TOML) x policies on real VMs, figures and a table
``wan``            a shaped path: network namespaces, veth, tbf, a delay/loss relay
``cli``            the ``pyvm-lab`` command
=================  ==================================================================

The policy API itself is :mod:`pyvm.migration.policy`: the migration engine is its
main consumer, and the lab only imports it.  Imports run one way: cli → compare,
validate, sweep, plots → realvm, wan, simulate, record, info → trace, link, workloads →
errors, pyvm.migration.policy.
"""
