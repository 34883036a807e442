"""Trace-driven simulation of elastic provisioning (paper §7.4).

- :mod:`.trace`: the trace CSV format, its validating reader and writer.
- :mod:`.synthetic`: a seeded synthetic trace calibrated to §7.4.
- :mod:`.metrics`: fair-share violations, daily bandwidth guarantee, resource saving.
- :mod:`.simulator`: replays a trace through :mod:`protego.provisioning`.
- :mod:`.report`, :mod:`.plot`, :mod:`.cli`: Table 2, Figure 11, ``protego sim``.
"""
