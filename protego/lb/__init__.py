"""GIN/GEN: Protego's ingress and egress load balancer (``protego lb``).

Pure core:

* :mod:`protego.lb.model`     — etcd keys → typed, validated steering state;
* :mod:`protego.lb.ruleset`   — desired nftables tables, read-back parsing, diff → one batch;
* :mod:`protego.lb.policy`    — next-hop slots, marks and policy-routing rules/routes;
* :mod:`protego.lb.heartbeat` — heartbeat wire codec and the GPN failure detector.

Adapters at the edge: :mod:`protego.lb.nft` (libnftables), :mod:`protego.lb.routes`
(pyroute2), :mod:`protego.lb.agent` (etcd watches, reconcile loop, heartbeat I/O).
"""
