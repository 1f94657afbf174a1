"""HTTP pieces shared by the HTTP-based sinks (loki, elasticsearch, http): auth and TLS config, requests, status classes.

urllib3's PoolManager is thread-safe, so the delivery workers share one pool
of keep-alive connections per sink.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

import urllib3

from flowship.secrets import Secret, reveal
from flowship.sinks.delivery import RejectedError, RequestTooLargeError, RetryableError, parse_retry_after

# 4xx answers that come from a wrong URL, credentials or a proxy rather than from the data:
# retrying (loudly) keeps the flows until the operator fixes it, instead of dead-lettering everything.
RETRY_4XX = frozenset({401, 403, 404, 407, 408, 409, 425, 429})
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)


@dataclass
class HttpClientConfig:
    """Endpoint auth and TLS of an HTTP sink, written once for all of them.

    The keys sit directly in the sink's section (``username:``, ``tls_ca_file:``...). A sink
    that takes a token names its field in ``token_key`` and the ``Authorization`` scheme in
    ``token_scheme`` (Loki: ``bearer_token``/``Bearer``, Elasticsearch: ``api_key``/``ApiKey``).
    Timeouts are ``retry.request_timeout`` (see :class:`flowship.sinks.delivery.RetryConfig`).
    """

    username: Secret | None = None  # basic auth; secrets as env:NAME or file:PATH
    password: Secret | None = None
    headers: dict[str, Secret] = field(default_factory=dict)  # extra request headers (tokens for proxies)
    tls_ca_file: str | None = None
    tls_verify: bool = True

    token_key: ClassVar[str | None] = None
    token_scheme: ClassVar[str] = "Bearer"

    def token(self) -> Secret | None:
        return getattr(self, self.token_key) if self.token_key else None

    def http_problems(self) -> list[str]:
        problems = []
        if self.username and not self.password:
            problems.append("password: required with username")
        if self.token_key and self.username and self.token():
            problems.append(f"{self.token_key}: use either username/password or {self.token_key}")
        for name in self.headers or {}:
            if not _HEADER_NAME.match(str(name)):
                problems.append(f"headers.{name}: not a valid HTTP header name")
        return problems

    def request_headers(self) -> dict[str, str]:
        """``Authorization`` (token, else basic auth) and the extra headers, references resolved now."""
        out: dict[str, str] = {}
        if token := self.token():
            out["Authorization"] = f"{self.token_scheme} {token.reveal()}"
        elif self.username:
            user = reveal(self.username) or ""
            pw = reveal(self.password) or ""
            out["Authorization"] = "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        out.update({name: reveal(value) or "" for name, value in (self.headers or {}).items()})
        return out


def url_problem(key: str, url: object, expected: str) -> str | None:
    """What is wrong with an endpoint URL (credentials written into it, not http(s)://host), or None."""
    if credentials := url_credentials_problem(key, url):
        return credentials
    if not isinstance(url, str) or not re.match(r"^https?://[^/?#]+", url):
        return f"{key}: expected {expected}, got {url!r}"
    return None


def url_credentials_problem(key: str, url: object) -> str | None:
    """Credentials written into a URL are not sent and would be logged with it: ask for the auth keys instead."""
    if isinstance(url, str) and "@" in urlsplit(url).netloc:
        return (f"{key}: remove the user name and password from the URL (the URL is logged); set username and "
                "password (or bearer_token / api_key) as env:NAME or file:PATH references")
    return None


def pool(c: HttpClientConfig, maxsize: int) -> urllib3.PoolManager:
    kw: dict = {"maxsize": maxsize, "block": False, "retries": False}
    if c.tls_ca_file:
        kw["ca_certs"] = c.tls_ca_file
    if not c.tls_verify:
        kw["cert_reqs"] = "CERT_NONE"
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return urllib3.PoolManager(**kw)


def tls_options(c: HttpClientConfig) -> dict[str, Any]:
    """The same TLS settings as elastic-transport ``NodeConfig`` options (https nodes)."""
    kw: dict[str, Any] = {"verify_certs": c.tls_verify}
    if c.tls_ca_file:
        kw["ca_certs"] = c.tls_ca_file
    if not c.tls_verify:
        kw["ssl_show_warn"] = False
    return kw


def post(http: urllib3.PoolManager, url: str, body: bytes, headers: dict[str, str],
         timeout: float) -> urllib3.BaseHTTPResponse:
    """POST and map transport failures to RetryableError."""
    try:
        return http.request("POST", url, body=body, headers=headers, retries=False, redirect=False,
                            timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout))
    except urllib3.exceptions.HTTPError as exc:
        raise RetryableError("transport", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise RetryableError("transport", f"{type(exc).__name__}: {exc}") from None


def raise_for_status(status: int, body: bytes | str, retry_after: str | None = None,
                     classify: Callable[[str], str | None] | None = None) -> None:
    """Turn a non-2xx answer into the delivery exception it stands for.

    ``retry_after`` is the answer's Retry-After header; ``classify`` names the reason of a
    refusal from the server's words (a short bounded label, None for ``http_<status>``).
    """
    if 200 <= status < 300:
        return
    raw = body[:2000]
    text = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)).strip()
    if status == 413:
        raise RequestTooLargeError(f"HTTP 413: {text}")
    if status >= 500 or status in RETRY_4XX:
        raise RetryableError(f"http_{status}", f"HTTP {status}: {text}", parse_retry_after(retry_after))
    reason = classify(text) if classify else None
    raise RejectedError(reason or f"http_{status}", f"HTTP {status}: {text}", status)
