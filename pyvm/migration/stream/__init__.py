"""The migration stream format: bytes <-> objects, no I/O.

Nothing here imports a transport, a socket or the control side; the encoder hands out
chunks (page payloads as memoryviews of guest RAM) and the decoder is fed bytes.  Module
order, lowest first: ``constants``, ``writer``, ``reader``, ``vmdesc_json``,
``vmstate_codec``, ``sections``, ``ram_format``, ``ram_loader``, ``decoder``, ``encoder``,
``vmdesc_loader`` (the table in :mod:`pyvm.migration` says what each holds).
"""
