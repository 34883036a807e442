"""``python -m protego.gpn [--etcd ...] gpn run ...``: the ``protego`` CLI with the
``gpn`` group available even before it is registered in ``protego/cli.py``."""

from protego import cli as _cli

_cli._COMMANDS.setdefault("gpn", "protego.gpn.cli:gpn")
_cli.main()
