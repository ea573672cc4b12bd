"""Example migration policies, each a small class following one published algorithm.

=====================  ==============================================================
``xen_skip``           Clark et al., NSDI 2005: skip pages dirtied again in the round
``auto_converge``      QEMU's auto-converge (cpu-throttle-initial/increment) as a policy
``hybrid_postcopy``    precopy, then postcopy when the dirty rate does not converge
``hot_cold``           rarely-written pages first, the hottest held for the final copy
=====================  ==============================================================

QEMU's own precopy, the default, is :class:`pyvm.migration.policy.QemuPrecopy`.
"""
