"""Webhooks signed as Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature (v1, HMAC-SHA256)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session

from prunekit.core.db.models import Tenant
from prunekit.vocabulary import ENDED

SECRET_PREFIX = "whsec_"
# One event type per way a job ends.
JOB_EVENT_TYPES = {status: f"pruning.job.{status}" for status in ENDED}


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def tenant_secret(session: Session, tenant_id: str, rotate: bool = False) -> str:
    """The tenant's signing secret, made on first use; rotating invalidates the old one at once."""
    tenant = session.get(Tenant, tenant_id)
    assert tenant is not None
    if tenant.webhook_secret is None or rotate:
        tenant.webhook_secret = new_secret()
        session.flush()
    return tenant.webhook_secret


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def resolve(host: str) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})


def unreachable_destination(url: str, lookup: Callable[[str], list[str]] | None = resolve) -> str | None:
    """Why a webhook may not be sent to this URL, or None. A job's webhook is a request the service makes on a
    user's behalf from inside its network, so it may not reach what only that network can: loopback, private,
    link-local (cloud metadata), shared, multicast or reserved addresses, given literally or, with `lookup`, by any
    address the name resolves to. (WEBHOOK_ALLOW_PRIVATE_HOSTS turns this off for a receiver on a private network.)
    """
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return f"{host} is this machine"
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        if lookup is None:
            return None
        try:
            addresses = lookup(host)
        except OSError as exc:
            return f"{host} does not resolve ({exc})"
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is not part of it
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            where = "" if address == host else f" ({host} resolves to it)"
            return f"{address} is not a public address{where}"
    return None


@dataclass(frozen=True)
class Delivery:
    ok: bool
    status_code: int | None
    detail: str
    retry: bool = True  # False: the same request would fail again (a refused destination)


def deliver(url: str, secret: str, msg_id: str, payload: dict[str, Any], timeout_s: float = 10.0,
            allow_private_hosts: bool = False) -> Delivery:
    # Checked again here, with the name resolved: it may point elsewhere now than when the job was submitted.
    refusal = None if allow_private_hosts else unreachable_destination(url)
    if refusal is not None:
        return Delivery(False, None, f"not sent: {refusal}", retry=False)
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "user-agent": "prunekit-webhooks/1", "webhook-id": msg_id,
               "webhook-timestamp": str(timestamp), "webhook-signature": sign(secret, msg_id, timestamp, body)}
    try:
        # Redirects are not followed: a receiver cannot bounce the signed payload to another host or scheme.
        response = httpx.post(url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        return Delivery(False, None, f"{type(exc).__name__}: {exc}")
    ok = 200 <= response.status_code < 300
    return Delivery(ok, response.status_code, f"HTTP {response.status_code}")
