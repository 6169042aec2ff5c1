"""Budget alerts and where they go.

An alert fires once per kind (threshold, level, blocked) per budget window, across
processes: the budget book stores the alert row under a unique key first and only the
process whose insert won calls the sinks. A sink is any callable taking an
:class:`Alert`; :class:`LoggingSink` and :class:`WebhookSink` are ready-made.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import math
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from budgetkit.errors import BudgetkitError, ConfigurationError

__all__ = ["Alert", "AlertSink", "LoggingSink", "WebhookSink", "WebhookFailed"]

logger = logging.getLogger("budgetkit.alerts")

AlertSink = Callable[["Alert"], None]


@dataclass(frozen=True)
class Alert:
    """A budget crossed a threshold or level, or stopped a call.

    ``kind`` is ``"threshold"`` (``threshold`` is the fraction of the limit, from
    ``Budget.alert_at``), ``"level"`` (``level`` is moderate / high / critical) or
    ``"blocked"`` (a call was stopped). Amounts are in the budget's unit: dollars or tokens.
    """

    budget: str
    kind: str
    level: str
    threshold: float | None
    period: str
    unit: str
    scope_key: str
    window_start: dt.datetime
    spent: float
    reserved: float
    limit: float
    percentage: float
    message: str
    created_at: dt.datetime

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["window_start"] = self.window_start.isoformat()
        data["created_at"] = self.created_at.isoformat()
        return data


_LOG_LEVELS: Mapping[str, int] = {"normal": logging.WARNING, "moderate": logging.WARNING,
                                  "high": logging.ERROR, "critical": logging.CRITICAL}


class LoggingSink:
    """Logs each alert on ``budgetkit.alerts``: moderate as WARNING, high as ERROR,
    critical (and blocked calls) as CRITICAL."""

    def __init__(self, log: logging.Logger | None = None) -> None:
        self.log = log or logger

    def __call__(self, alert: Alert) -> None:
        self.log.log(_LOG_LEVELS.get(alert.level, logging.WARNING), "%s", alert.message)


class WebhookSink:
    """POSTs each alert as JSON to ``url`` from a background thread (needs ``httpx``:
    ``pip install 'budgetkit[webhook]'``).

    The call being admitted never waits for the webhook. Each alert is tried up to
    ``retries + 1`` times on connection errors, timeouts, 429 and 5xx answers, waiting
    ``backoff`` seconds, then twice that, and so on (at most 30 s); other answers are not
    retried. Every try has ``timeout`` seconds. Failures are logged and counted in
    :attr:`failed`, never raised. :meth:`flush` waits until every queued alert was sent
    or given up (tests, shutdown).

    Server-side request forgery: the host is resolved before every try and the alert is
    refused when *any* of its addresses is private (10/8, 172.16/12, 192.168/16, fc00::/7),
    loopback, link-local (169.254/16: cloud metadata services), multicast, reserved or
    unspecified; the request then goes to the address that was checked (so DNS cannot
    change between the check and the connection), and redirects are not followed (a 3xx
    answer is a failure). ``allow_private=True`` lifts the address check, for a receiver
    on your own network or a local test server.
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 timeout: float = 5.0, retries: int = 3, backoff: float = 0.5,
                 allow_private: bool = False,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - exercised without the extra only
            raise ImportError("WebhookSink needs httpx: pip install 'budgetkit[webhook]'"
                              ) from exc
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"webhook url must start with http:// or https:// and name a host, got {url!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"webhook retries must be a whole number >= 0, got "
                                     f"{retries!r}")
        for name, value in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < math.inf or (name == "timeout" and value == 0):
                raise ConfigurationError(f"webhook {name} must be a finite number of seconds "
                                         f"> 0, got {value!r}")
        self.url = url
        self.headers = {"Content-Type": "application/json", **dict(headers or {})}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.allow_private = allow_private
        self._sleep = sleep
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._parts = parts
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)
        self._retry_on = (httpx.TransportError,)
        self.sent = 0
        self.failed = 0
        self._queue: queue.Queue[Alert | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        if not allow_private:
            try:  # an address written in the URL is refused now, not at the first alert
                literal = ipaddress.ip_address(self._host)
            except ValueError:
                pass
            else:
                _refuse_unless_public(self._host, [literal])

    def __call__(self, alert: Alert) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="budgetkit-webhook",
                                                daemon=True)
                self._thread.start()
        self._queue.put(alert)

    def post(self, alert: Alert) -> None:
        """Send one alert now, on the caller's thread, with the retries; raises the last
        failure (:class:`ConfigurationError` for a refused address, ``httpx`` errors)."""
        body = json.dumps(alert.as_dict()).encode("utf-8")
        attempt = 0
        while True:
            try:
                response = self._post_once(body)
            except self._retry_on as exc:
                if attempt >= self.retries:
                    raise
                logger.info("budgetkit: webhook %s try %d failed (%s); retrying", self.url,
                            attempt + 1, exc)
            else:
                status = response.status_code
                if status < 300:
                    return
                retryable = status == 429 or status >= 500
                if not retryable or attempt >= self.retries:
                    what = ("a redirect, not followed" if 300 <= status < 400
                            else "an error")
                    raise WebhookFailed(f"webhook {self.url} answered {status} ({what})")
                logger.info("budgetkit: webhook %s answered %d; retrying", self.url, status)
            self._sleep(min(30.0, self.backoff * 2 ** attempt))
            attempt += 1

    def _post_once(self, body: bytes) -> Any:
        """One try: resolve, check every address, then connect to the checked one."""
        try:
            infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            import httpx

            raise httpx.ConnectError(f"cannot resolve {self._host!r}: {exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not self.allow_private:
            _refuse_unless_public(self._host, addresses)
        target = addresses[0]
        netloc = f"[{target}]" if target.version == 6 else str(target)
        url = self._parts._replace(netloc=f"{netloc}:{self._port}").geturl()
        host_header = self._parts.netloc.rsplit("@", 1)[-1]
        return self._client.post(url, content=body,
                                 headers={**self.headers, "Host": host_header},
                                 extensions={"sni_hostname": self._host})

    def _run(self) -> None:
        while True:
            alert = self._queue.get()
            try:
                if alert is None:
                    return
                self.post(alert)
                self.sent += 1
            except (ConfigurationError, WebhookFailed, *self._retry_on) as exc:
                self.failed += 1
                logger.warning("budgetkit: webhook %s failed: %s", self.url, exc)
            finally:
                self._queue.task_done()

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until queued alerts were sent (or failed). False on timeout."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)


    def close(self, timeout: float | None = 10.0) -> bool:
        """Send what is queued (see :meth:`flush`), then close the HTTP connections."""
        sent = self.flush(timeout)
        self._client.close()
        return sent


class WebhookFailed(BudgetkitError):
    """A webhook answered with a status that is not success (after the retries)."""


def _refuse_unless_public(host: str, addresses: list[Any]) -> None:
    """ConfigurationError naming the host and the address when any address is not a
    public one (see :class:`WebhookSink`)."""
    for address in addresses:
        mapped = getattr(address, "ipv4_mapped", None)
        checked = mapped if mapped is not None else address
        # (most specific first: 127.0.0.1 is also "private" to the ipaddress module)
        for kind, flag in (("unspecified", "is_unspecified"), ("loopback", "is_loopback"),
                           ("link-local", "is_link_local"), ("multicast", "is_multicast"),
                           ("reserved", "is_reserved"), ("private", "is_private")):
            if getattr(checked, flag):
                break
        else:
            if checked.is_global:
                continue
            kind = "not globally routable"
        raise ConfigurationError(
            f"webhook host {host!r} resolves to {address}, a {kind} address: refused "
            "(server-side request forgery); pass allow_private=True to send alerts to your "
            "own network")
