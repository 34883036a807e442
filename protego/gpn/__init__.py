"""The GPN (gateway processing node): ESP data path with real I/O and its agent.

* :mod:`.records` -- etcd SA records -> ESP SAs and tunnel metadata (pure)
* :mod:`.tenant` -- VXLAN framing, egress traffic-selector table, host directory (pure)
* :mod:`.seqshare` -- outbound sequence blocks shared by worker processes
* :mod:`.bpf` -- classic BPF programs that shard ESP by SPI across workers (pure)
* :mod:`.worker` -- one per-core worker process: batched I/O, ESP, heartbeats
* :mod:`.engine` -- starts the workers, owns their sockets and control channels
* :mod:`.agent` -- the ``protego gpn`` reconcile loop (etcd <-> engine)
"""
