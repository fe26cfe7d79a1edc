"""Fetching one image URL safely: urllib3 for HTTP, tenacity for the retries (the download stage's client).

:meth:`Fetcher.fetch` returns a :class:`Fetched` with a stable ``status``:

=================  ==========================================================================================
``ok``             the original bytes of an image (content type and magic bytes checked)
``http_404`` ...   a final HTTP error status ``http_<code>``; 5xx is ``http_5xx`` and 429 ``http_429`` once the
                   retries are spent
``timeout``        connect / read timeout after the retries
``truncated``      the body ended before its Content-Length, after the retries
``connect_error``  connection refused / reset after the retries
``not_image``      content type neither ``image/*`` nor ``application/octet-stream``, or bytes that are no image
``too_large``      more than ``download.max_mb`` (Content-Length, or counted while streaming: aborted there)
``redirect_loop``  a redirect back to a URL of the same chain; ``too_many_redirects`` past ``max_redirects``
``unsafe_url``     not http/https, or no host (:mod:`ultraflux.data.safety`); checked on every redirect hop
``private_address`` loopback / private / link-local address, unless ``download.allow_private_addresses``
``dns_error``      the host name does not resolve
=================  ==========================================================================================

Retries (timeouts, 429, 5xx, truncated bodies, connection errors): ``tenacity`` with exponential back-off and full
jitter (``download.backoff_s`` doubling up to ``download.max_backoff_s``), honouring a ``Retry-After`` header (in
seconds or as an HTTP date; capped at ``max_backoff_s``), at most ``download.retries`` retries. ``attempts``
counts the requests made for the URL (redirect hops excluded; 0 for a URL refused before any request).
Concurrency per host is bounded by a semaphore held only while a request is in flight (never during a back-off
sleep); urllib3 keeps up to ``per_host`` connections alive per host. urllib3 (not httpx) because ``requests``
already brings it into this environment.
"""
from __future__ import annotations

import email.utils
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import tenacity
import urllib3
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, TimeoutError

from .safety import url_problem

IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
               (b"II*\x00", "tif"), (b"MM\x00*", "tif"), (b"BM", "bmp"))
TRANSIENT = ("timeout", "http_429", "http_5xx", "truncated", "connect_error")  # retried; worth a later run too
REFUSED = ("unsafe_url", "private_address", "dns_error")  # statuses decided before a request is sent
ACCEPTED_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
CHUNK = 1 << 20  # read size: 1 MiB (64 KiB reads cost ~30% of a core at 250 MB/s in Python)


def image_extension(data: bytes | bytearray) -> str:
    """The image format of ``data`` from its magic bytes ("" = not an image we accept)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in IMAGE_MAGIC if data.startswith(magic)), "")


@dataclass
class Fetched:
    status: str
    detail: str = ""
    attempts: int = 0
    http_status: int = 0
    content_type: str = ""
    final_url: str = ""
    data: bytes | bytearray = field(default=b"", repr=False)
    ext: str = ""


class Transient(Exception):
    """A failure worth retrying; ``result`` is what is recorded if the retries run out."""

    def __init__(self, result: Fetched, retry_after: float | None = None):
        super().__init__(result.status)
        self.result, self.retry_after = result, retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class RetryAfterOrBackoff(tenacity.wait.wait_base):
    """tenacity wait: the server's Retry-After when it sent one (capped), else exponential back-off with jitter."""

    def __init__(self, initial: float, maximum: float):
        self.backoff = tenacity.wait_random_exponential(multiplier=initial, max=maximum)
        self.maximum = maximum

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(error, Transient) and error.retry_after is not None:
            return min(error.retry_after, self.maximum)
        return self.backoff(retry_state)


class Fetcher:
    """One shared urllib3 pool manager (thread-safe) for a whole download; ``fetch(url)`` from many threads."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.max_bytes = int(cfg["max_mb"] * (1 << 20))
        self.allow_private = bool(cfg["allow_private_addresses"])
        self.http = urllib3.PoolManager(
            num_pools=64, maxsize=int(cfg["per_host"]), retries=False,
            timeout=urllib3.Timeout(connect=min(cfg["timeout_s"], 10.0), read=cfg["timeout_s"]),
            headers={"User-Agent": cfg["user_agent"], "Accept": "image/*", "Accept-Encoding": "identity"})
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.clear()

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        host = (urlsplit(url).hostname or "").lower()
        with self._lock:
            return self._hosts.setdefault(host, threading.BoundedSemaphore(self.cfg["per_host"]))

    def fetch(self, url: str) -> Fetched:
        """Fetch ``url`` with retries; never raises for a network or content problem."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Transient),
            stop=tenacity.stop_after_attempt(int(self.cfg["retries"]) + 1),
            wait=RetryAfterOrBackoff(float(self.cfg["backoff_s"]), float(self.cfg["max_backoff_s"])),
            reraise=True)
        attempts = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    result = self._follow(url)
        except Transient as err:
            result = err.result
        refused_before_any_request = result.status in REFUSED and result.final_url == url
        result.attempts = 0 if refused_before_any_request else attempts
        return result

    def _follow(self, url: str) -> Fetched:
        """One attempt: request, following at most ``max_redirects`` redirects, each hop checked first."""
        chain = [url]
        for _ in range(int(self.cfg["max_redirects"]) + 1):
            if problem := url_problem(url, self.allow_private):
                return Fetched(problem.split(":")[0], problem, final_url=url)
            with self._host_slot(url):
                outcome = self._request(url)
            if isinstance(outcome, Fetched):
                return outcome
            url = urljoin(url, outcome)
            if url in chain:
                return Fetched("redirect_loop", " -> ".join(chain + [url])[:500], final_url=url)
            chain.append(url)
        return Fetched("too_many_redirects", f"more than {self.cfg['max_redirects']}", final_url=url)

    def _request(self, url: str) -> str | Fetched:
        """GET ``url``: a redirect's Location, or the final :class:`Fetched`; raises :class:`Transient`."""
        response, outcome = None, None
        try:
            response = self.http.request("GET", url, preload_content=False, redirect=False, retries=False)
            outcome = self._response(url, response)
            return outcome
        except TimeoutError as err:
            raise Transient(Fetched("timeout", type(err).__name__, final_url=url)) from None
        except ProtocolError as err:  # IncompleteRead: fewer bytes than Content-Length; else a reset connection
            status = "truncated" if "IncompleteRead" in repr(err) else "connect_error"
            raise Transient(Fetched(status, str(err)[:200], final_url=url)) from None
        except (NewConnectionError, OSError) as err:
            raise Transient(Fetched("connect_error", str(err)[:200], final_url=url)) from None
        except HTTPError as err:
            return Fetched("http_error", f"{type(err).__name__}: {str(err)[:200]}", final_url=url)
        finally:
            if response is not None:
                if not (isinstance(outcome, Fetched) and outcome.status == "ok"):
                    response.close()  # an unread body (error page, redirect, abort): drop the connection
                response.release_conn()

    def _response(self, url: str, response: urllib3.BaseHTTPResponse) -> str | Fetched:
        code = response.status
        base = {"http_status": code, "final_url": url}
        if 300 <= code < 400 and "location" in response.headers:
            return response.headers["location"]
        if code == 429 or code >= 500:
            status = "http_429" if code == 429 else "http_5xx"
            raise Transient(Fetched(status, f"HTTP {code}", **base),
                            retry_after_seconds(response.headers.get("retry-after")))
        if code != 200:
            return Fetched(f"http_{code}", f"HTTP {code}", **base)
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith(ACCEPTED_TYPES):
            return Fetched("not_image", f"content type {ctype}", content_type=ctype, **base)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return Fetched("too_large", f"Content-Length {declared} > {self.max_bytes}", content_type=ctype,
                           **base)
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        if declared.isdigit() and not encoded:  # within the cap: one read, urllib3 enforces the declared length
            body = response.read()
        else:
            body = self._read_capped(response)
        if body is None:  # stopped reading past the cap: the rest is never downloaded
            return Fetched("too_large", f"more than {self.max_bytes} bytes", content_type=ctype, **base)
        ext = image_extension(body)
        if not ext:
            return Fetched("not_image", f"magic bytes {bytes(body[:8]).hex()}", content_type=ctype, **base)
        return Fetched("ok", "", content_type=ctype, data=body, ext=ext, **base)

    def _read_capped(self, response: urllib3.BaseHTTPResponse) -> bytearray | None:
        """The (decoded) body of a response without a Content-Length or with a Content-Encoding (a small gzip body
        may inflate past the cap), or None as soon as it exceeds the cap."""
        body = bytearray()
        for chunk in response.stream(CHUNK):
            body += chunk
            if len(body) > self.max_bytes:
                return None
        return body
