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
    host = urlsplit(url).hostname
    if not host:
        return "the URL names no host"
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:  # UnicodeError: an empty or 64+ character label
        return f"its host {host!r} does not resolve: {exc}"
    for *_, address in found:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
        if not ip.is_global:
            return f"its host {host!r} resolves to {ip}, which is not a public address"
    return None


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
        if not self.settings.allow_private:
            # Checked again now: the name may resolve elsewhere than when it was accepted.
            problem = await asyncio.to_thread(public_address_problem, delivery.url)
            if problem is not None:
                return f"refused: {problem}"
        body = json.dumps(task_view(row), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE: sign(delivery.webhook_secret, int(time.time()), body),
            "X-Parity-Delivery": str(delivery.seq),
            "X-Parity-Event": "task.ended",
        }
        try:
            response = await self._client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"the receiver answered {response.status_code}"
