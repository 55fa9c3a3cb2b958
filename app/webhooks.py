"""Webhooks signed as Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature (v1, HMAC-SHA256)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import httpx

SECRET_PREFIX = "whsec_"
JOB_EVENT_TYPES = {"succeeded": "pruning.job.succeeded", "failed": "pruning.job.failed",
                   "cancelled": "pruning.job.cancelled"}


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


@dataclass(frozen=True)
class Delivery:
    ok: bool
    status_code: int | None
    detail: str


def deliver(url: str, secret: str, msg_id: str, payload: dict[str, Any], timeout_s: float = 10.0) -> Delivery:
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
