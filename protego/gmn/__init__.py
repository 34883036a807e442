"""GMN role: the `protego gmn` agent and its kernel-protego plugin protocol."""
