"""One exception hierarchy for ka2l. Pages and the CLI catch ``Ka2lError`` and show its message;
anything else is a bug.

    Ka2lError
    ├── ConfigError          a setting has a value outside its allowed set
    ├── PoolError            a question pool could not be read or failed validation
    ├── ModelLoadError       a model / tokenizer could not be found or loaded
    ├── JudgeError           an equivalence judge is misconfigured (e.g. NLI labels missing)
    ├── ScoreError           uncertainty scores cannot be computed (missing or non-finite log-probs)
    ├── ProbeError           probes cannot be trained or applied (too few labels, shape mismatch)
    ├── StoreError           the database or an array file is missing or inconsistent
    │   └── NotFound         a pool / run / probe id does not exist
    ├── LabelStudioError     a Label Studio call failed (the message names the server, never the token)
    │   ├── LabelStudioUnreachable  nothing answers at the URL, or what answers is not Label Studio's API
    │   ├── LabelStudioAuthError    the token was refused (401/403; legacy tokens disabled)
    │   ├── LabelStudioTimeout      the server did not answer in time
    │   └── ProjectGone             the project was deleted in Label Studio
    └── Cancelled            the user asked long work to stop (not a failure)

Errors of dependencies are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class Ka2lError(Exception):
    """Base of every error ka2l raises on purpose. Its message is meant for the user."""


class ConfigError(Ka2lError, ValueError):
    pass


class PoolError(Ka2lError, ValueError):
    """A pool failed to load. ``problems`` lists every finding (row/column named) when known."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            shown = self.problems[:20]
            more = len(self.problems) - len(shown)
            message = message + "\n" + "\n".join(f"  - {p}" for p in shown)
            if more:
                message += f"\n  ... and {more} more"
        super().__init__(message)


class ModelLoadError(Ka2lError):
    pass


class JudgeError(Ka2lError):
    pass


class ScoreError(Ka2lError, ValueError):
    pass


class ProbeError(Ka2lError):
    pass


class StoreError(Ka2lError):
    pass


class NotFound(StoreError, LookupError):
    pass


class Cancelled(Ka2lError):
    """Raised by a progress reporter when the user cancelled; work stored so far is kept."""


class LabelStudioError(Ka2lError):
    """A Label Studio call failed. ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class LabelStudioUnreachable(LabelStudioError):
    pass


class LabelStudioAuthError(LabelStudioError):
    pass


class LabelStudioTimeout(LabelStudioError):
    pass


class ProjectGone(LabelStudioError, LookupError):
    pass
