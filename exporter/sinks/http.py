"""HTTP plumbing shared by the Loki and Elasticsearch sinks: auth, TLS, status classes.

urllib3's PoolManager is thread-safe, so the delivery workers share one pool
of keep-alive connections per sink.
"""

from __future__ import annotations

import base64
from urllib.parse import urlsplit

import urllib3

from exporter.config import secret_value
from exporter.sinks.delivery import RejectedError, RequestTooLargeError, RetryableError, parse_retry_after

# 4xx answers that come from a wrong URL, credentials or a proxy rather than from the data:
# retrying (loudly) keeps the flows until the operator fixes it, instead of dead-lettering everything.
RETRY_4XX = frozenset({401, 403, 404, 407, 408, 409, 425, 429})


def auth_headers(username: str | None, password: str | None, bearer_token: str | None = None,
                 api_key: str | None = None) -> dict[str, str]:
    """Authorization header from secret references (``env:NAME`` / ``file:PATH``)."""
    if api_key:
        key = secret_value(api_key) or ""
        return {"Authorization": f"ApiKey {key}"}
    if bearer_token:
        return {"Authorization": f"Bearer {secret_value(bearer_token)}"}
    if username:
        user = secret_value(username) or ""
        pw = secret_value(password) or ""
        token = base64.b64encode(f"{user}:{pw}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    return {}


def url_credentials_problem(key: str, url: object) -> str | None:
    """Credentials written into a URL are not sent and would be logged with it: ask for the auth keys instead."""
    if isinstance(url, str) and "@" in urlsplit(url).netloc:
        return (f"{key}: remove the user name and password from the URL (the URL is logged); set username and "
                "password (or bearer_token / api_key) as env:NAME or file:PATH references")
    return None


def resolve_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """Extra request headers, with ``env:NAME`` / ``file:PATH`` values resolved (tokens for proxies)."""
    return {name: secret_value(value) or "" for name, value in (headers or {}).items()}


def pool(tls_ca_file: str | None, tls_verify: bool, maxsize: int) -> urllib3.PoolManager:
    kw: dict = {"maxsize": maxsize, "block": False, "retries": False}
    if tls_ca_file:
        kw["ca_certs"] = tls_ca_file
    if not tls_verify:
        kw["cert_reqs"] = "CERT_NONE"
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return urllib3.PoolManager(**kw)


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


def raise_for_status(resp: urllib3.BaseHTTPResponse, classify=None) -> None:  # noqa: ANN001
    """Turn a non-2xx answer into the delivery exception it stands for."""
    status = resp.status
    if 200 <= status < 300:
        return
    text = resp.data[:2000].decode("utf-8", "replace").strip()
    if status == 413:
        raise RequestTooLargeError(f"HTTP 413: {text}")
    if status >= 500 or status in RETRY_4XX:
        raise RetryableError(f"http_{status}", f"HTTP {status}: {text}",
                             parse_retry_after(resp.headers.get("Retry-After")))
    reason = classify(text) if classify else None
    raise RejectedError(reason or f"http_{status}", f"HTTP {status}: {text}", status)
