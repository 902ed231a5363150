"""Webhooks: an ended task's view, posted to its ``callback_url`` and signed with its key's
secret, retried with backoff; the deliveries live in the store (the outbox), so a restart
loses none.

A receiver checks ``X-Parity-Signature: t=UNIX_TIME,v1=HEX``, where ``HEX`` is the
HMAC-SHA256 under the key's webhook secret (``GET /v1/keys/me``) of ``f"{t}."`` followed by
the raw body, and refuses a ``t`` too far from its own clock (a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import socket
import time
from urllib.parse import urlsplit

import httpx

import parity_sandbox
from parity_sandbox._config import WebhookSettings
from parity_sandbox.service.store import Delivery, Store
from parity_sandbox.service.views import task_view

SIGNATURE = "X-Parity-Signature"
#: The longest wait between two attempts.
MAX_BACKOFF = 600.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``X-Parity-Signature`` value of ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def public_address_problem(url: str) -> str | None:
    """Why ``url``'s host may not be called back (it resolves to an address that is not
    public: loopback, private, link-local, reserved...), or ``None`` if it may."""
    return callback_addresses(url, allow_private=False)[1]


def callback_addresses(
    url: str, *, allow_private: bool
) -> tuple[list[ipaddress.IPv4Address | ipaddress.IPv6Address], str | None]:
    """The addresses ``url``'s host resolves to, and why it may not be called back (an
    address that is not public, unless ``allow_private``), or ``None`` if it may."""
    host = urlsplit(url).hostname
    if not host:
        return [], "the URL names no host"
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:  # UnicodeError: an empty or 64+ character label
        return [], f"its host {host!r} does not resolve: {exc}"
    addresses = []
    for *_, address in found:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
        if not ip.is_global and not allow_private:
            return [], f"its host {host!r} resolves to {ip}, which is not a public address"
        if ip not in addresses:
            addresses.append(ip)
    return addresses, None


def pinned(url: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``url`` with its host replaced by ``ip`` (the request names the host in ``Host``,
    and in TLS's SNI, itself)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
    return parts._replace(netloc=netloc).geturl()


class Deliverer:
    """Sends the store's due webhooks, a few at a time."""

    def __init__(self, store: Store, settings: WebhookSettings) -> None:
        self.store = store
        self.settings = settings
        self._client = httpx.AsyncClient(
            timeout=settings.timeout,
            follow_redirects=False,
            headers={"User-Agent": f"parity-sandbox/{parity_sandbox.__version__}"},
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def run(self, wake: asyncio.Event) -> None:
        while True:
            wake.clear()  # before the look: a task that ends meanwhile wakes the next one
            due = await asyncio.to_thread(self.store.due_deliveries, 16, self.settings.timeout + 30)
            if due:
                await asyncio.gather(*(self._deliver(delivery) for delivery in due))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), 0.5)

    async def _deliver(self, delivery: Delivery) -> None:
        error = await self._attempt(delivery)
        attempts = delivery.attempts + 1
        retry_in = None
        if error is not None and attempts < self.settings.max_attempts:
            retry_in = min(self.settings.retry_base * 2 ** (attempts - 1), MAX_BACKOFF)
        await asyncio.to_thread(
            lambda: self.store.delivery_done(delivery.seq, error=error, retry_in=retry_in)
        )

    async def _attempt(self, delivery: Delivery) -> str | None:
        """One attempt; the error, or ``None`` once the receiver took it (2xx)."""
        row = await asyncio.to_thread(self.store.task_any, delivery.task_id)
        if row is None:
            return "the task was deleted before its webhook could be sent"
        # Checked again now (the name may resolve elsewhere than when it was accepted), and the
        # connection goes to an address checked here: a second lookup could answer otherwise.
        addresses, problem = await asyncio.to_thread(
            lambda: callback_addresses(delivery.url, allow_private=self.settings.allow_private)
        )
        if problem is not None:
            return f"refused: {problem}"
        body = json.dumps(task_view(row), separators=(",", ":")).encode()
        parts = urlsplit(delivery.url)
        headers = {
            "Host": parts.netloc.rpartition("@")[2],
            "Content-Type": "application/json",
            SIGNATURE: sign(delivery.webhook_secret, int(time.time()), body),
            "X-Parity-Delivery": str(delivery.seq),
            "X-Parity-Event": "task.ended",
        }
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        error = "its host resolves to no address"
        for ip in addresses:  # in the resolver's order, as a client tries them
            try:
                response = await self._client.post(
                    pinned(delivery.url, ip), content=body, headers=headers, extensions=extensions
                )
            except httpx.ConnectError as exc:
                error = f"ConnectError: {exc}"[:500]
                continue  # the next address
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"[:500]
            if 200 <= response.status_code < 300:
                return None
            return f"the receiver answered {response.status_code}"
        return error
