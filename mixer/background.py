"""Background: a function running on a helper thread, its value or error collected later."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """fn(*args) on a daemon thread; result() waits for it, then returns its value or raises its error.

    Daemon: when the caller fails first, the process exits without waiting for fn. The wait is
    timed, so Ctrl-C and SIGTERM reach the waiting (main) thread between waits.
    """

    def __init__(self, fn: Callable[..., T], *args: Any, name: str | None = None) -> None:
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        try:
            self._outcome["value"] = fn(*args)
        except BaseException as err:  # handed to the thread that asks for the result
            self._outcome["error"] = err

    def result(self) -> T:
        while self._thread.is_alive():
            self._thread.join(0.5)
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]
