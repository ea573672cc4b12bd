"""The migration control side: the state machine, precopy, incoming, parameters, commands."""
