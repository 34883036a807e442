"""Protego's datastore edge: the etcd v3 adapter and the embedded etcd launcher.

``protego.store.etcd`` wraps the maintained sync client (``pyetcd``) with watch
resume, lease keep-alive, endpoint failover and bounded retries.
``protego.store.server`` starts and stops embedded etcd members for the testbed
and the tests.
"""
