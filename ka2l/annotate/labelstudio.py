"""The one adapter over ``label_studio_sdk`` (SDK 2.x): nothing else in ka2l imports it.

``Client(url, token)`` accepts a legacy token (40 hex characters, sent as ``Token ...``) and a personal
access token (a JWT refresh token; the SDK exchanges it for short-lived access tokens itself). Every
call goes through ``Client._call``, which

- retries transient failures with exponential backoff: connection refused / reset, timeouts, 5xx and
  429 for calls that are safe to repeat (reads); only "connection refused", 429 and 503 for calls that
  create something (a project, an import), because a repeated import after an ambiguous failure could
  create every task twice;
- translates what is left into ``ka2l.errors``: ``LabelStudioUnreachable`` (nothing answers, or what
  answers is not Label Studio's API), ``LabelStudioAuthError`` (401/403, including "legacy token
  authentication has been disabled"), ``LabelStudioTimeout``, ``ProjectGone`` (404 on a project) and
  ``LabelStudioError`` for anything else. Messages name the server and the fix, never the token.

The SDK's own retry loop is switched off (``max_retries=0``) so only this policy applies.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import LabelStudioAuthError, LabelStudioError, LabelStudioTimeout, LabelStudioUnreachable, ProjectGone

log = logging.getLogger(__name__)

T = TypeVar("T")

SAFE, CREATES = "safe", "creates"  # retry policies: a read can be repeated; a create only when it surely did not happen
_RETRY_STATUS = {SAFE: lambda s: s >= 500 or s == 429, CREATES: lambda s: s in (429, 503)}
MAX_BACKOFF_S = 30.0
TITLE_MAX = 50  # Label Studio refuses longer project titles

FIX_URL = ("Check that the server is running (`python -m ka2l annotate serve` starts the local one) and that the URL in "
           "Settings is the server's root with scheme and port, e.g. http://127.0.0.1:8080.")
FIX_TOKEN = ("Copy a token from Label Studio (Account & Settings -> Personal Access Token, or the legacy Access Token) "
             "into ka2l's Settings page, .streamlit/secrets.toml [label_studio] or KA2L_LABEL_STUDIO_TOKEN.")


def _detail(exc: Any) -> str:
    """The server's own explanation from an SDK ApiError, short."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        text = str(body.get("detail") or "")
        problems = body.get("validation_errors")
        if problems:
            text = f"{text.rstrip('.')}: {problems}" if text else str(problems)
        return (text or str(body))[:300]
    if isinstance(body, str) and body.lstrip().startswith("<"):
        return "an HTML page"
    return str(body)[:300] if body else ""


class Client:
    """A connection to one Label Studio server.

    ``timeout`` is seconds per HTTP request; ``retries`` how many times a transient failure is retried
    (waiting ``backoff * 2**attempt`` seconds, capped at 30 s, or the server's Retry-After on 429).
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5):
        url = (url or "").strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise LabelStudioUnreachable(f"Label Studio URL {url!r} must start with http:// or https://. {FIX_URL}")
        if not (token or "").strip():
            raise LabelStudioAuthError(f"No token given for Label Studio at {url}. {FIX_TOKEN}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise LabelStudioError(f"timeout must be > 0 and retries, backoff >= 0; got {timeout}, {retries}, {backoff}.")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self._token = token.strip()
        self._sdk_client: Any = None

    def __repr__(self) -> str:  # never the token
        return f"Client(url={self.url!r})"

    @classmethod
    def from_connection(cls, connection: Any, **kwargs: Any) -> Client:
        """From anything with ``url`` and ``token`` (``ka2l.annotate.connection.Connection``)."""
        return cls(connection.url, connection.token, **kwargs)

    @property
    def _sdk(self) -> Any:
        if self._sdk_client is None:
            self._sdk_client = self._call("connecting", SAFE, lambda: self._make_sdk())
        return self._sdk_client

    def _make_sdk(self) -> Any:
        from label_studio_sdk import LabelStudio  # the SDK is imported here only

        return LabelStudio(base_url=self.url, api_key=self._token, timeout=self.timeout, max_retries=0)

    # -- the retry and translation boundary ---------------------------------------------------------

    def _call(self, what: str, policy: str, fn: Callable[[], T], project_id: int | None = None) -> T:
        import httpx

        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - every dependency error is translated below
                wait = self._retry_wait(exc, policy, attempt)
                if wait is None:
                    raise self._translate(exc, what, project_id) from exc
                log.info("Label Studio %s: %s; retry %d/%d in %.1f s", what, type(exc).__name__, attempt + 1, self.retries, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _retry_wait(self, exc: Exception, policy: str, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the failure is not transient (or retries are spent)."""
        import httpx

        if attempt >= self.retries:
            return None
        wait = min(self.backoff * 2.0 ** attempt, MAX_BACKOFF_S)
        if isinstance(exc, httpx.ConnectError):
            return wait  # the request never reached the server: always safe to repeat
        if isinstance(exc, (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError)):
            return wait if policy == SAFE else None
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and _RETRY_STATUS[policy](status):
            headers = getattr(exc, "headers", None) or {}
            after = headers.get("retry-after") or headers.get("Retry-After")
            if status == 429 and after and str(after).isdigit():
                return min(float(after), MAX_BACKOFF_S)
            return wait
        return None

    def _translate(self, exc: Exception, what: str, project_id: int | None) -> LabelStudioError:
        import httpx

        where = f"Label Studio at {self.url}"
        if isinstance(exc, LabelStudioError):
            return exc
        if isinstance(exc, httpx.TimeoutException):
            return LabelStudioTimeout(f"{where} did not answer within {self.timeout:g} s while {what}. The server may be "
                                      "busy or overloaded: try again, or use a smaller batch size.")
        if isinstance(exc, (httpx.TransportError, httpx.InvalidURL, httpx.UnsupportedProtocol)):
            return LabelStudioUnreachable(f"Could not reach {where} while {what}: {exc or type(exc).__name__}. {FIX_URL}")
        status = getattr(exc, "status_code", None)
        detail = _detail(exc)
        if status in (401, 403):
            if "legacy token" in detail.lower():
                return LabelStudioAuthError(
                    f"{where} refused the token: legacy token authentication has been disabled for this organization. "
                    "Use a personal access token instead (Label Studio -> Account & Settings -> Personal Access Token) and "
                    "save it in ka2l's Settings, or re-enable legacy tokens (Organization -> API Tokens Settings).", status)
            if status == 401:
                return LabelStudioAuthError(f"{where} refused the token (401: {detail or 'unauthorized'}). {FIX_TOKEN}", status)
            return LabelStudioAuthError(f"{where} does not allow this user to do that ({what}; 403: {detail}). Use a token "
                                        "of a user who is an owner or administrator of the organization.", status)
        if status == 404 and detail == "an HTML page" and (project_id is None or not self._is_label_studio()):
            return LabelStudioUnreachable(f"Something answers at {self.url}, but not Label Studio's API (404 while {what}). "
                                          f"{FIX_URL}", status)
        if status == 404 and project_id is not None:
            return ProjectGone(f"Label Studio project {project_id} no longer exists at {self.url} (deleted in Label Studio?). "
                               "ka2l keeps what it stored about it; push to a new project to go on.", status)
        if isinstance(status, int):
            return LabelStudioError(f"{where} answered {status} while {what}: {detail or 'no detail'}.", status)
        return LabelStudioError(f"{where}: {what} failed: {type(exc).__name__}: {str(exc)[:300]}")

    def _is_label_studio(self) -> bool:
        """Whether the URL answers as Label Studio's API (some 404s of a deleted project are HTML pages)."""
        try:
            self._sdk.users.whoami()
            return True
        except Exception:  # noqa: BLE001 - only deciding which error to report
            return False

    # -- the calls ------------------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """The token's user: id, email, username. Use it to test a connection."""
        user = self._call("checking the token", SAFE, lambda: self._sdk.users.whoami())
        return {"id": user.id, "email": user.email, "username": user.username}

    def create_project(self, title: str, label_config: str, description: str = "") -> int:
        """A new project; ``title`` is cut to Label Studio's 50 characters."""
        title = title.strip()[:TITLE_MAX] or "ka2l"
        project = self._call(f"creating project {title!r}", CREATES, lambda: self._sdk.projects.create(
            title=title, label_config=label_config, description=description))
        return int(project.id)

    def project(self, project_id: int) -> dict[str, Any]:
        """The project's title, task and annotation counts and label config; ``ProjectGone`` if deleted."""
        p = self._call(f"reading project {project_id}", SAFE, lambda: self._sdk.projects.get(int(project_id)), project_id)
        return {"id": int(p.id), "title": p.title, "task_number": int(p.task_number or 0),
                "num_tasks_with_annotations": int(p.num_tasks_with_annotations or 0),
                "total_annotations_number": int(p.total_annotations_number or 0),
                "skipped_annotations_number": int(p.skipped_annotations_number or 0),
                "label_config": p.label_config, "url": self.project_url(p.id)}

    def project_url(self, project_id: int) -> str:
        """Where a person opens the project's tasks in a browser."""
        return f"{self.url}/projects/{int(project_id)}/data"

    def task_count(self, project_id: int) -> int:
        return self.project(project_id)["task_number"]

    def import_tasks(self, project_id: int, tasks: Sequence[dict[str, Any]]) -> list[int]:
        """Create tasks (each ``{"data": {...}, "predictions": [...]}``) in one call; their ids, in order."""
        if not tasks:
            return []
        answer = self._call(f"importing {len(tasks)} tasks into project {project_id}", CREATES, lambda: self._sdk.projects.import_tasks(
            int(project_id), request=list(tasks), return_task_ids=True), project_id)
        ids = [int(i) for i in (answer.task_ids or [])]
        if len(ids) != len(tasks):
            raise LabelStudioError(f"Label Studio at {self.url} created {len(ids)} tasks for {len(tasks)} sent to project "
                                   f"{project_id}; push again to reconcile.")
        return ids

    def tasks(self, project_id: int, page_size: int = 1000) -> list[dict[str, Any]]:
        """Every task of the project as ``{"id", "data"}`` (paged; no annotations)."""

        def read() -> list[dict[str, Any]]:
            pages = self._sdk.tasks.list(project=int(project_id), include="id,data", page_size=page_size)
            return [{"id": int(t.id), "data": dict(t.data or {})} for t in pages]

        self.project(project_id)  # a deleted project lists no tasks instead of failing: say it is gone
        return self._call(f"listing the tasks of project {project_id}", SAFE, read, project_id)

    def task_keys(self, project_id: int, page_size: int = 1000) -> dict[str, int]:
        """``data.ka2l_key`` -> task id for every task of the project that carries one (the lowest id wins
        when a key occurs twice)."""
        keys: dict[str, int] = {}
        for t in self.tasks(project_id, page_size):
            key = t["data"].get("ka2l_key")
            if key is not None and (key not in keys or t["id"] < keys[key]):
                keys[key] = t["id"]
        return keys

    def export(self, project_id: int, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every task of the project with its annotations (Label Studio's JSON export)."""

        def read() -> list[dict[str, Any]]:
            opts = {"timeout_in_seconds": int(timeout)} if timeout else None
            chunks = self._sdk.projects.exports.download_sync(int(project_id), export_type="JSON", download_all_tasks=True,
                                                              request_options=opts)
            return json.loads(b"".join(chunks) or b"[]")

        return self._call(f"exporting project {project_id}", SAFE, read, project_id)

    def create_annotation(self, task_id: int, result: list[dict[str, Any]], lead_time: float | None = None,
                          was_cancelled: bool = False) -> int:
        """Annotate a task as the token's user would in the UI (tests and tools)."""
        extra = {"lead_time": float(lead_time)} if lead_time is not None else {}
        a = self._call(f"annotating task {task_id}", CREATES, lambda: self._sdk.annotations.create(
            int(task_id), result=result, was_cancelled=bool(was_cancelled), **extra))
        return int(a.id)

    def update_annotation(self, annotation_id: int, result: list[dict[str, Any]]) -> None:
        self._call(f"updating annotation {annotation_id}", SAFE, lambda: self._sdk.annotations.update(int(annotation_id), result=result))

    def delete_annotation(self, annotation_id: int) -> None:
        self._call(f"deleting annotation {annotation_id}", SAFE, lambda: self._sdk.annotations.delete(int(annotation_id)))

    def delete_project(self, project_id: int) -> None:
        self._call(f"deleting project {project_id}", SAFE, lambda: self._sdk.projects.delete(int(project_id)), project_id)

    def create_access_token(self) -> str:
        """A new personal access token (JWT refresh token) for the token's user."""
        made = self._call("creating a personal access token", CREATES, lambda: self._sdk.tokens.create())
        return str(made.token)

    def set_legacy_tokens(self, enabled: bool) -> None:
        """Allow or refuse legacy tokens in the user's organization (an owner's setting)."""
        current = self._call("reading the organization's token settings", SAFE, lambda: self._sdk.jwt_settings.get())
        self._call("changing the organization's token settings", SAFE, lambda: self._sdk.jwt_settings.update(
            legacy_api_tokens_enabled=bool(enabled), api_tokens_enabled=True,
            api_token_ttl_days=int(current.api_token_ttl_days or 3650)))  # the Community Edition has no TTL and ignores it
