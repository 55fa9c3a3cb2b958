"""Webhook signing: the Standard Webhooks scheme, and the tenant's secret over the API; where webhooks may go."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from prunekit.core.config import Settings
from prunekit.core.webhooks import deliver, sign, unreachable_destination

JOB = {"model": "local:tiny-llama", "method": "wanda", "sparsity": 0.5}


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


def test_webhooks_to_addresses_inside_the_network_are_refused_at_submission(
        client: TestClient, auth: dict[str, str], settings: Settings) -> None:
    """The service sends webhooks from inside its own network: a job may not aim one at this machine, a private
    network or the cloud metadata endpoint (SSRF)."""
    for url in ["http://127.0.0.1:8000/hook", "http://localhost/hook", "http://api.localhost/hook",
                "http://10.1.2.3/hook", "http://192.168.0.1/hook", "http://172.16.5.4/hook",
                "http://169.254.169.254/latest/meta-data/", "http://0.0.0.0/hook", "http://[::1]/hook",
                "http://[::ffff:127.0.0.1]/hook", "http://[fd00::1]/hook", "http://100.64.0.1/hook"]:
        response = client.post("/v1/jobs", json={**JOB, "webhook": {"url": url}}, headers=auth)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["param"] == "webhook.url" and "public addresses only" in response.json()["detail"]
    # A public address or a name (resolved when the webhook is sent) is accepted.
    for url in ["https://93.184.216.34/hook", "https://hooks.example.com/prunekit"]:
        assert client.post("/v1/jobs", json={**JOB, "webhook": {"url": url}}, headers=auth).status_code == 201
    # An operator whose receivers live on a private network allows them.
    allowing = settings.model_copy(update={"webhook_allow_private_hosts": True})
    with TestClient(create_app(allowing)) as private:
        response = private.post("/v1/jobs", json={**JOB, "webhook": {"url": "http://10.1.2.3/hook"}}, headers=auth)
        assert response.status_code == 201, response.text


def test_a_name_is_checked_by_every_address_it_resolves_to() -> None:
    def resolving_to(*addresses: str) -> Callable[[str], list[str]]:
        return lambda _host: list(addresses)

    url = "https://hooks.example.com/prunekit"
    assert unreachable_destination(url, resolving_to("93.184.216.34", "2606:2800:220:1::1")) is None
    for addresses in [("127.0.0.1",), ("93.184.216.34", "10.0.0.7"), ("fe80::1%eth0",), ("::ffff:169.254.169.254",),
                      ("224.0.0.1",)]:
        refusal = unreachable_destination(url, resolving_to(*addresses))
        assert refusal is not None and "hooks.example.com resolves to it" in refusal, addresses

    def failing(_host: str) -> list[str]:
        raise OSError("Name or service not known")

    assert "does not resolve" in (unreachable_destination(url, failing) or "")


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[str]]]:
    received: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            received.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_a_refused_destination_is_not_sent_to_nor_retried(receiver: tuple[str, list[str]]) -> None:
    url, received = receiver
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    refused = deliver(url, secret, "msg_1", {"type": "pruning.job.succeeded"})
    assert (refused.ok, refused.retry, refused.status_code) == (False, False, None)
    assert "127.0.0.1 is not a public address" in refused.detail and received == []
    allowed = deliver(url, secret, "msg_1", {"type": "pruning.job.succeeded"}, allow_private_hosts=True)
    assert allowed.ok and allowed.status_code == 204 and received == ["/hook"]
