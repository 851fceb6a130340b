"""Progress reporting through an injected object, so core loops know nothing about a UI.

Core code calls ``progress.stage(name, total)``, then ``progress.advance(n)``; both raise
``Cancelled`` when the reporter's owner asked to stop (the CLI on Ctrl-C, a job on Cancel).
Work is committed before ``advance`` is called, so cancelling never loses stored results.

A reporter that shows a whole job (a background job's row) feeds those calls to a
``PhaseTracker`` over the job's planned ``PhaseSpec``s: the overall fraction and its ETA
(``overall_eta``), with each phase and stage under it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

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


# -- whole-job progress ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PhaseSpec:
    """One phase a kind of work goes through, as its reporter sees it.

    ``match`` is the start of the stage names that belong to the phase (default: ``name``);
    ``count`` how many stages in a row it covers (Stage 1's baselines train one or two probe sets, each
    a stage "probes (logistic)"); ``labels`` names them in order; ``weight`` is the phase's rough
    share of the whole job's time, in any unit (only ratios matter); ``note`` says how often it
    reports (so "0/61" for a minute reads as expected, not as stuck)."""

    name: str
    weight: float
    match: str = ""
    count: int = 1
    labels: tuple[str, ...] = ()
    note: str = ""

    def covers(self, stage: str) -> bool:
        return stage.startswith(self.match or self.name)


class PhaseTracker:
    """Whole-job progress out of ``stage`` / ``advance`` calls, for any reporter that shows it.

    Each stage becomes a row under the plan's phase it matches (searching forward, so a phase that
    never starts, e.g. one whose work was stored by an earlier run, is marked skipped). A stage whose
    name matches no phase left gets a row of its own, named apart from any earlier row ("answers (2)"),
    so no counter ever goes backwards. The overall fraction weighs each phase's rows by the phase's
    weight and never decreases; ``credited`` is the part that was already done when this worker
    started (resumed work), which the ETA leaves out of the rate.

    Worked example, plan a (weight 1), b (weight 3): stage a 10/10 done, stage b at 5/10 ->
    fraction (1 * 1 + 3 * 0.5) / 4 = 0.625.
    """

    def __init__(self, plan: Sequence[PhaseSpec] = (), clock: Callable[[], float] = time.time):
        self.clock = clock
        self.started_at = clock()
        self.phases: list[dict[str, Any]] = [self._phase(p) for p in plan]
        self._specs = list(plan)
        self._current = -1  # index into phases of the running phase
        self.fraction = 0.0
        self.credited = 0.0

    # -- reporter calls --------------------------------------------------------------------------
    def stage(self, name: str, total: int | None = None, done: int = 0) -> dict[str, Any]:
        """Start a stage; returns its row (name, done, total, ...)."""
        now = self.clock()
        self._close_row(now)
        index = self._phase_for(name)
        if index is None:  # discovered: a phase of its own after the current one
            spec = PhaseSpec(self._unique(name), weight=self._default_weight(), match=name)
            index = self._current + 1
            self._specs.insert(index, spec)
            self.phases.insert(index, self._phase(spec))
        for i in range(self._current + 1, index):  # never started: their work was stored before
            if not self.phases[i]["rows"]:
                self.phases[i]["status"] = "skipped"
                self.credited += self._weight_share(i)
        if 0 <= self._current < index:
            self.phases[self._current]["status"] = "done"
        self._current = index
        phase, spec = self.phases[index], self._specs[index]
        label = spec.labels[len(phase["rows"])] if len(phase["rows"]) < len(spec.labels) else name
        row = {"name": self._unique(label), "stage": name, "done": int(done), "total": total, "start_done": int(done),
               "started_at": now, "finished_at": None, "status": "running"}
        phase["rows"].append(row)
        phase["count"] = max(phase["count"], len(phase["rows"]))
        phase["status"] = "running"
        if total and done:
            self.credited += self._weight_share(index) * min(done, total) / total / max(1, phase["count"])
        self._update_fraction()
        return row

    def advance(self, n: int = 1) -> dict[str, Any] | None:
        row = self.current_row
        if row is None:
            return None
        row["done"] += n
        self._update_fraction()
        return row

    def finish(self) -> None:
        """The work ended successfully: every row is complete; phases that never ran were not needed."""
        now = self.clock()
        self._close_row(now, complete=True)
        for phase in self.phases:
            phase["status"] = "done" if phase["rows"] else "skipped"
        self.fraction = 1.0

    # -- reading ---------------------------------------------------------------------------------
    @property
    def current_row(self) -> dict[str, Any] | None:
        if self._current < 0 or not self.phases[self._current]["rows"]:
            return None
        return self.phases[self._current]["rows"][-1]

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state: what a job row stores and a UI draws."""
        return {"fraction": self.fraction, "credited": self.credited, "started_at": self.started_at,
                "phases": [{**p, "rows": [dict(r) for r in p["rows"]]} for p in self.phases]}

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _phase(spec: PhaseSpec) -> dict[str, Any]:
        return {"name": spec.name, "weight": float(spec.weight), "status": "pending", "count": spec.count, "note": spec.note, "rows": []}

    def _phase_for(self, name: str) -> int | None:
        start = max(self._current, 0)
        for i in range(start, len(self._specs)):
            phase = self.phases[i]
            if not self._specs[i].covers(name):
                continue
            if i == self._current and len(phase["rows"]) >= self._specs[i].count:
                continue  # this phase has had its stages; a repeat belongs further on (or is new)
            return i
        return None

    def _unique(self, name: str) -> str:
        """``name``, or ``name (2)``, ``name (3)``... when a row already has it."""
        taken = {r["name"] for p in self.phases for r in p["rows"]}
        if name not in taken:
            return name
        n = 2
        while f"{name} ({n})" in taken:
            n += 1
        return f"{name} ({n})"

    def _default_weight(self) -> float:
        weights = [p["weight"] for p in self.phases]
        return sum(weights) / len(weights) if weights else 1.0

    def _weight_share(self, index: int) -> float:
        total = sum(p["weight"] for p in self.phases)
        return self.phases[index]["weight"] / total if total else 0.0

    def _close_row(self, now: float, complete: bool = False) -> None:
        row = self.current_row
        if row is not None and row["status"] == "running":
            row["status"], row["finished_at"] = "done", now
            if row["total"] and (complete or row["done"] >= row["total"]):
                row["done"] = max(row["done"], row["total"])
            elif complete and not row["total"]:
                row["total"] = row["done"] = max(row["done"], 1)

    def _phase_fraction(self, phase: dict[str, Any]) -> float:
        if phase["status"] in ("done", "skipped"):
            return 1.0
        got = 0.0
        for row in phase["rows"]:
            if row["status"] == "done":
                got += 1.0
            elif row["total"]:
                got += min(row["done"], row["total"]) / row["total"]
        return min(1.0, got / max(1, phase["count"]))

    def _update_fraction(self) -> None:
        total = sum(p["weight"] for p in self.phases)
        if not total:
            return
        f = sum(p["weight"] * self._phase_fraction(p) for p in self.phases) / total
        self.fraction = max(self.fraction, min(f, 1.0))


def overall_eta(fraction: float, credited: float, elapsed: float) -> float | None:
    """Seconds left for the whole job, from the share of it done in ``elapsed`` seconds (work that was
    already stored when it started, ``credited``, took no time and does not count towards the rate).

    >>> overall_eta(0.5, 0.0, 60.0)    # half done in a minute
    60.0
    >>> overall_eta(0.75, 0.25, 60.0)  # half the job in a minute (a quarter was stored before), a quarter left
    30.0
    """
    worked = fraction - credited
    if fraction >= 1.0:
        return 0.0
    if worked <= 1e-6 or elapsed <= 0:
        return None
    return elapsed * (1.0 - fraction) / worked
