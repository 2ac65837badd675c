"""Waiting on a condition with a bound, instead of sleeping and hoping (the project's test rule)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Return as soon as `condition()` holds; fail the test after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"{what} did not hold within {timeout:g}s") from None
