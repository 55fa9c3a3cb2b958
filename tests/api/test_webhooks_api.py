"""Webhook signing: the Standard Webhooks scheme, and the tenant's secret over the API."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from app.webhooks import sign


def test_signature_matches_the_standard_webhooks_reference_vector() -> None:
    # The example in the Standard Webhooks specification.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    signature = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_secret_is_per_tenant_stable_and_rotates(client: TestClient, auth: dict[str, str],
                                                 new_key: Callable[[str], str]) -> None:
    first = client.get("/v1/webhooks/secret", headers=auth).json()["secret"]
    assert first.startswith("whsec_") and client.get("/v1/webhooks/secret", headers=auth).json()["secret"] == first
    other = {"Authorization": f"Bearer {new_key('tenant-b')}"}
    assert client.get("/v1/webhooks/secret", headers=other).json()["secret"] != first
    rotated = client.post("/v1/webhooks/secret/rotate", headers=auth).json()["secret"]
    assert rotated != first and client.get("/v1/webhooks/secret", headers=auth).json()["secret"] == rotated


def test_webhook_url_must_be_http(client: TestClient, auth: dict[str, str]) -> None:
    job = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}
    for url in ["ftp://example.com/hook", "javascript:alert(1)", "not a url"]:
        response = client.post("/v1/jobs", json={**job, "webhook": {"url": url}}, headers=auth)
        assert response.status_code == 422 and response.json()["param"] == "webhook.url"
