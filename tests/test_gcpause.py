"""The cyclic collector is held off for a block and left as it was (aivo_mesh/gcpause.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from aivo_mesh.gcpause import paused_gc


@pytest.fixture
def gc_state() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


@pytest.mark.usefixtures("gc_state")
def test_the_collector_is_off_within_and_as_it_was_after() -> None:
    gc.enable()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError, match="boom"), paused_gc():
        raise ValueError("boom")
    assert gc.isenabled()
    gc.disable()  # a process that turned it off keeps it off
    with paused_gc():
        assert not gc.isenabled()
    assert not gc.isenabled()
