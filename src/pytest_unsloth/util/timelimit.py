"""Run a function in a daemon thread and wait for it, with or without a time limit.

The one place the plugin runs a call in a helper thread: a reward function with a limit, the
GRPO checks' children started side by side, an import kept off the caller's stack. A call that
overruns its limit is abandoned (a daemon thread cannot be killed), not waited for. What must
be stoppable for sure runs in a subprocess instead (see ``probe.run_subprocess``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class TimeLimitExceeded(Exception):
    """The call did not return within its time limit (it may still be running)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"did not return within {timeout:g} s")
        self.timeout = timeout


class ThreadCall(Generic[T]):
    """``target()`` started in a daemon thread named ``name``; ``result()`` waits for it."""

    def __init__(self, target: Callable[[], T], name: str) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = target()
            except BaseException as exc:  # re-raised in the waiting thread with its traceback
                self._error = exc

        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def result(self, timeout: float | None = None) -> T:
        """The call's return value, or its exception raised here.

        Raises ``TimeLimitExceeded`` when ``timeout`` seconds pass first (None waits forever).
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            assert timeout is not None  # join(None) returns only when the thread ended
            raise TimeLimitExceeded(timeout)
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]  # set, since no error was raised


def call_in_thread(target: Callable[[], T], timeout: float | None, name: str) -> T:
    """Run ``target()`` in a daemon thread; its value, its exception, or ``TimeLimitExceeded``."""
    return ThreadCall(target, name).result(timeout)
