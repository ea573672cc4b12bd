"""The migration control side: the state machine, precopy, incoming, parameters, commands.

It drives the stream format (:mod:`pyvm.migration.stream`) over the transports
(:mod:`pyvm.migration.transports`).  Lowest first: ``status``, ``capabilities``,
``parameters``, ``blockers``, ``address``, ``channel``, ``connect``, ``manager``,
``precopy``, ``incoming``, ``service``, ``qmp_schema``, ``monitor_commands`` (the table
in :mod:`pyvm.migration` says what each holds).
"""
