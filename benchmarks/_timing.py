"""Wall-clock split of a vertical run, for the benchmarks only: wraps named methods with timers.

Nothing in the product is changed: the wrappers are set on the objects (or classes) a benchmark
run builds, and time spent in nested wrapped calls is attributed to each wrapper it passes
through (the benchmarks report nested parts separately and say which ones nest).
"""

from __future__ import annotations

import functools
import os
import resource
import time
from collections import defaultdict
from typing import Any


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes = 0
        self._undo: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """Time every call of ``owner.name`` under ``label`` (undone by :meth:`restore`)."""
        had_own = name in getattr(owner, "__dict__", {})
        original = getattr(owner, name)
        if isinstance(owner, type):  # a class attribute: wrap the plain function
            function = owner.__dict__.get(name, original)

            @functools.wraps(function)
            def timed_method(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds[label] += time.perf_counter() - start
                    self.calls[label] += 1

            setattr(owner, name, timed_method)
        else:

            @functools.wraps(original)
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.seconds[label] += time.perf_counter() - start
                    self.calls[label] += 1

            setattr(owner, name, timed)
        self._undo.append((owner, name, original, had_own))

    def count_bytes(self, codec: Any) -> None:
        """Add the size of every frame ``codec.encode`` makes to :attr:`bytes`."""
        encode = codec.encode

        def counted(message):
            frame = encode(message)
            self.bytes += len(frame)
            return frame

        codec.encode = counted
        self._undo.append((codec, "encode", encode, "encode" in codec.__dict__))

    def restore(self) -> None:
        for owner, name, original, had_own in reversed(self._undo):
            if had_own or isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)
        self._undo = []

    def report(self) -> dict[str, float]:
        return {f"{k}_s": round(v, 3) for k, v in sorted(self.seconds.items())}


def cpu_seconds() -> float:
    """This process's CPU time plus that of its finished child processes (workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]
