"""config/memo.py: what is derived from a mesh is computed once per mesh object, and only ever for it."""

from __future__ import annotations

import gc

import pytest

from aivo_mesh.config.memo import cached_meshes, per_mesh


class Box:
    """A stand-in for a mesh: any object that can be watched by a weak reference."""

    def __init__(self, value: int) -> None:
        self.value = value


calls: list[tuple[int, int]] = []


@per_mesh
def scaled(box: Box, factor: int, *, offset: int = 0) -> int:
    calls.append((box.value, factor))
    if factor < 0:
        raise ValueError("negative factor")
    return box.value * factor + offset


def test_once_per_object_and_arguments() -> None:
    calls.clear()
    a, b = Box(2), Box(2)
    assert [scaled(a, 3), scaled(a, 3), scaled(a, 4), scaled(b, 3)] == [6, 6, 8, 6]
    assert calls == [(2, 3), (2, 4), (2, 3)]  # an equal object is another object
    assert scaled(a, 3, offset=1) == 7 and scaled(a, 3, offset=1) == 7
    assert len(calls) == 4


def test_a_failure_is_not_remembered() -> None:
    calls.clear()
    box = Box(1)
    for _ in range(2):
        with pytest.raises(ValueError, match="negative"):
            scaled(box, -1)
    assert len(calls) == 2


def test_a_collected_object_leaves_nothing_and_its_successors_get_their_own_results() -> None:
    gc.collect()  # earlier tests' garbage (meshes in reference cycles) must not go away inside the count
    before = cached_meshes()
    # Objects made and dropped one after another: the interpreter hands their ids out again, and each
    # must still get its own result, never one kept for an object that had its id before.
    for value in range(200):
        box = Box(value)
        assert scaled(box, 1) == value
        del box
    gc.collect()
    assert cached_meshes() == before


def test_an_object_that_cannot_be_watched_is_refused_and_leaves_nothing() -> None:
    before = cached_meshes()
    with pytest.raises(TypeError):
        scaled(5, 2)  # type: ignore[arg-type]  # an int takes no weak reference
    assert cached_meshes() == before
