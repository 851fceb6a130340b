"""Progress reporting through an injected object, so core loops know nothing about a UI.

Core code calls ``progress.stage(name, total)``, then ``progress.advance(n)``; both raise
``Cancelled`` when the reporter's owner asked to stop (the CLI on Ctrl-C, a job on Cancel).
Work is committed before ``advance`` is called, so cancelling never loses stored results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from .errors import Cancelled

log = logging.getLogger(__name__)


class Progress(Protocol):
    def stage(self, name: str, total: int | None = None, done: int = 0) -> None: ...

    def advance(self, n: int = 1, message: str | None = None) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing, never cancels."""

    def stage(self, name: str, total: int | None = None, done: int = 0) -> None:
        log.info("stage %s (%s/%s)", name, done, total)

    def advance(self, n: int = 1, message: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class TqdmProgress:
    """One tqdm bar per stage, for the command line."""

    def __init__(self, disable: bool = False):
        self._bar = None
        self._disable = disable

    def stage(self, name: str, total: int | None = None, done: int = 0) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total, initial=done, desc=name, unit="q", disable=self._disable, dynamic_ncols=True)

    def advance(self, n: int = 1, message: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if message:
                self._bar.set_postfix_str(message, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def marks_status(update: Callable[..., None], progress: Progress) -> Iterator[None]:
    """Run resumable work, recording how it ended through ``update(status=..., error=...)``:
    'interrupted' on cancel / Ctrl-C (stored work is kept), 'failed' with the error otherwise. The
    caller marks success itself, with what it produced."""
    try:
        yield
    except (Cancelled, KeyboardInterrupt):
        update(status="interrupted")
        raise
    except Exception as exc:
        update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        progress.close()
