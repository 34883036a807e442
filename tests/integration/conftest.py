"""Fixtures that give integration tests a whole testbed, always torn down."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import unique_name


@pytest.fixture(scope="module")
def baseline_testbed() -> Iterator["object"]:
    """The default topology in baseline mode under a unique name (module scope)."""
    from protego.testbed import testbed as tbmod
    from protego.testbed.topology import load_topology

    name = unique_name("b")
    tb = tbmod.up(load_topology(None), name=name, mode="baseline")
    try:
        yield tb
    finally:
        tbmod.down(name)
