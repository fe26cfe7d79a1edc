"""Shared plumbing for the LLM-backed evaluation tools (Gemini judge, GPT-4o refiner).

* one retry loop (tenacity) for transport failures (429 / 408 / 5xx / timeouts / connection errors) *and* malformed
  or off-schema answers, with bounded exponential back-off and jitter (the SDKs' own retries are switched off so
  there is exactly one budget and every attempt's failure is recorded);
* answers validated by pydantic models (the same models both SDKs take as the response schema): a
  ``pydantic.ValidationError`` anywhere in a call counts as an off-schema answer, described in one line;
* an on-disk answer cache (one JSON file per key, written with :func:`ultraflux.io.atomic_write_text`);
* secret redaction for every error string that is recorded or logged.

Nothing here ever logs, prints or stores an API key: error messages are passed through :func:`redact` before
they leave this module, and keys are only ever handed to the SDK client constructors.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import pydantic

from ultraflux.io import atomic_write_text, sha256_text

log = logging.getLogger(__name__)

# HTTP status codes worth retrying: request timeout, lock timeout, rate limit, server errors.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class InvalidAnswer(ValueError):
    """The service answered, but the answer is malformed / off-schema / a refusal: retry, then record as invalid."""


# ----------------------------------------------------------------------------------------------------------- secrets
def redact(text: Any, secrets: Iterable[str | None]) -> str:
    """``str(text)`` with every (non-trivial) secret replaced by ``***``."""
    s = str(text)
    for sec in secrets:
        if sec and len(sec) >= 4:
            s = s.replace(sec, "***")
    return s


def env_key(*names: str) -> str | None:
    """The first non-empty environment variable among ``names`` (stripped), or None."""
    for n in names:
        v = os.environ.get(n, "").strip()
        if v:
            return v
    return None


# ---------------------------------------------------------------------------------------------------------- answers
M = TypeVar("M", bound=pydantic.BaseModel)


def describe_validation_error(err: pydantic.ValidationError, secrets: Iterable[str | None] = ()) -> str:
    """One line naming what is wrong with an answer: not JSON at all, or which fields are off-schema and why.

    Quoted inputs are redacted before they are clipped to 200 characters (so no part of a secret survives)."""
    secrets = list(secrets)

    def quote(value: Any) -> str:
        r = redact(repr(value), secrets)
        return r if len(r) <= 200 else r[:200] + "..."

    errors = err.errors(include_url=False)
    bad_json = [e for e in errors if e["type"] == "json_invalid"]
    if bad_json:
        return f"answer is not valid JSON ({bad_json[0]['msg']}): {quote(bad_json[0]['input'])}"
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e["loc"]) or "answer"
        parts.append(f"{where}: {e['msg']}" + ("" if e["type"] == "missing" else f" (got {quote(e['input'])})"))
    return "off-schema answer: " + "; ".join(parts)


def parse_answer(model: type[M], text: Any) -> M:
    """``model`` validated from the JSON text ``text``; :class:`InvalidAnswer` (one-line reason) otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidAnswer("empty answer (no text in the response)")
    try:
        return model.model_validate_json(text)
    except pydantic.ValidationError as e:
        raise InvalidAnswer(describe_validation_error(e)) from None


# ------------------------------------------------------------------------------------------------------------ retry
@dataclass
class RetryPolicy:
    """``max_retries`` retries after the first attempt (so ``max_retries + 1`` attempts in all).

    Delay before retry ``k`` (0-based) = ``min(max_s, base_s * 2**k)`` scaled by a uniform factor in
    ``[1 - jitter, 1]``; a server ``Retry-After`` raises it (never above ``max_s``).
    """

    max_retries: int
    base_s: float
    max_s: float
    jitter: float

    @classmethod
    def from_cfg(cls, cfg: dict) -> "RetryPolicy":
        """From a validated ``judge`` / ``refiner`` section (its ``max_retries`` and ``backoff_*`` keys)."""
        return cls(max_retries=int(cfg["max_retries"]), base_s=float(cfg["backoff_base_s"]),
                   max_s=float(cfg["backoff_max_s"]), jitter=float(cfg["backoff_jitter"]))

    def delay(self, retry_index: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        r = (rng or random).random()
        d = min(self.max_s, self.base_s * (2.0 ** retry_index)) * (1.0 - self.jitter * r)
        if retry_after is not None and retry_after > d:
            d = min(self.max_s, retry_after)
        return max(0.0, d)


@dataclass
class Failure:
    """Classification of one failed attempt."""

    kind: str  # "transport" | "invalid" | "fatal"
    message: str  # already redacted
    status: int | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in ("transport", "invalid")


def _retry_after(headers: Any) -> float | None:
    try:
        v = headers.get("retry-after") if headers is not None else None
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def classify(exc: BaseException, secrets: Iterable[str | None] = ()) -> Failure:
    """Map an exception raised by the google-genai / openai SDKs (or our validators) to a :class:`Failure`."""
    secrets = list(secrets)
    msg = redact(f"{type(exc).__name__}: {exc}", secrets)
    if len(msg) > 2000:
        msg = msg[:2000] + "...[truncated]"
    if isinstance(exc, InvalidAnswer):
        return Failure("invalid", msg)
    if isinstance(exc, pydantic.ValidationError):  # e.g. openai's ``parse`` validating the answer into our model
        return Failure("invalid", f"InvalidAnswer: {describe_validation_error(exc, secrets)}"[:2000])
    # google-genai: errors.APIError(code, response_json, response)
    try:
        from google.genai import errors as genai_errors

        if isinstance(exc, genai_errors.APIError):
            code = int(exc.code) if exc.code is not None else None
            headers = getattr(getattr(exc, "response", None), "headers", None)
            kind = "transport" if (code in RETRYABLE_STATUS or code is None) else "fatal"
            return Failure(kind, msg, code, _retry_after(headers))
    except ImportError:  # pragma: no cover
        pass
    try:
        import openai

        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            kind = "transport" if code in RETRYABLE_STATUS else "fatal"
            return Failure(kind, msg, code, _retry_after(exc.response.headers))
        if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
            return Failure("transport", msg)
        if isinstance(exc, (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError)):
            return Failure("invalid", msg)
    except ImportError:  # pragma: no cover
        pass
    # raw transport errors (httpx2 / httpx / stdlib) that the SDK did not wrap
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"TimeoutException", "ConnectError", "ReadError", "RemoteProtocolError", "NetworkError",
                "TransportError", "TimeoutError", "ConnectionError"}:
        return Failure("transport", msg)
    return Failure("fatal", msg)


@dataclass
class Outcome:
    status: str  # "ok" | "invalid" | "error"
    value: Any = None
    attempts: int = 0
    errors: list[dict] = field(default_factory=list)
    fatal: bool = False

    def as_record(self) -> dict:
        return {"status": self.status, "attempts": self.attempts, "errors": self.errors}


class _Failed(Exception):
    """One attempt failed; carries its classification for tenacity's retry decision and the outcome."""

    def __init__(self, failure: Failure):
        super().__init__(failure.message)
        self.failure = failure


class _Aborted(Exception):
    """``should_stop`` said stop before an attempt (an earlier fatal error elsewhere)."""


def call_with_retries(
    call: Callable[[], Any],
    validate: Callable[[Any], Any],
    policy: RetryPolicy,
    secrets: Iterable[str | None] = (),
    what: str = "request",
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Run ``validate(call())`` until it succeeds or the retry budget is spent (tenacity drives the attempts; the
    waits are :meth:`RetryPolicy.delay`, which honours a server's Retry-After).

    Returns an :class:`Outcome` whose status is ``ok`` (value = validated answer), ``invalid`` (the last failure was
    a malformed / off-schema / refused answer) or ``error`` (transport or fatal API failure). Nothing is invented.
    """
    import tenacity

    secrets = list(secrets)
    errors: list[dict] = []
    n_attempts = policy.max_retries + 1

    def attempt():
        if should_stop is not None and should_stop():
            errors.append({"attempt": len(errors) + 1, "kind": "fatal", "status": None,
                           "error": "aborted (an earlier fatal error)"})
            raise _Aborted()
        try:
            return validate(call())
        except Exception as exc:  # noqa: BLE001 - classified here, never swallowed silently
            failure = classify(exc, secrets)
            errors.append({"attempt": len(errors) + 1, "kind": failure.kind, "status": failure.status,
                           "error": failure.message})
            raise _Failed(failure) from exc

    def wait(state: tenacity.RetryCallState) -> float:
        return policy.delay(state.attempt_number - 1, state.outcome.exception().failure.retry_after)

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log.info("%s attempt %d/%d failed (%s); retrying in %.2fs", what, state.attempt_number, n_attempts,
                 state.outcome.exception().failure.message, state.upcoming_sleep)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(n_attempts), wait=wait, sleep=sleep, before_sleep=before_sleep, reraise=True,
        retry=tenacity.retry_if_exception(lambda e: isinstance(e, _Failed) and e.failure.retryable))
    try:
        return Outcome("ok", retrying(attempt), len(errors) + 1, errors)
    except _Aborted:
        return Outcome("error", None, len(errors) - 1, errors, fatal=True)
    except _Failed as failed:
        last = failed.failure
    if not last.retryable:
        log.warning("%s failed (not retryable): %s", what, last.message)
        return Outcome("error", None, len(errors), errors, fatal=True)
    log.warning("%s failed after %d attempts: %s", what, n_attempts, last.message)
    return Outcome("invalid" if last.kind == "invalid" else "error", None, n_attempts, errors)


# ------------------------------------------------------------------------------------------------------------ cache
def key_digest(key: dict) -> str:
    return sha256_text(json.dumps(key, sort_keys=True, ensure_ascii=False))


class DiskCache:
    """One JSON file per key: ``<dir>/<h[:2]>/<h>.json`` holding ``{"key": key, "value": value}``.

    Only validated answers are stored (failures are never cached, so a re-run retries them). A corrupt or
    mismatching entry is treated as a miss.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory is not None else None

    def _path(self, key: dict) -> Path:
        h = key_digest(key)
        assert self.dir is not None
        return self.dir / h[:2] / f"{h}.json"

    def get(self, key: dict) -> Any | None:
        if self.dir is None:
            return None
        p = self._path(key)
        try:
            entry = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != json.loads(json.dumps(key)):
            return None
        return entry.get("value")

    def put(self, key: dict, value: Any) -> None:
        if self.dir is None:
            return
        atomic_write_text(self._path(key), json.dumps({"key": key, "value": value}, sort_keys=True, ensure_ascii=False))


def default_cache_root() -> Path:
    """``$ULTRAFLUX_CACHE_DIR`` or ``~/.cache/ultraflux``."""
    env = os.environ.get("ULTRAFLUX_CACHE_DIR", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "ultraflux"
