"""Credentials: Secret, token caching and refresh, BearerAuth's refresh-once-on-401, JWT assertions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import httpx
import pytest

from agent.errors import AuthError, RetryableError
from connectors.auth import (
    JWT_BEARER_GRANT,
    BearerAuth,
    ClientCredentials,
    JwtBearer,
    Secret,
    StaticToken,
    TokenProvider,
    encode_jwt,
    hs256_signer,
)
from connectors.http import classify_http, make_client, raise_for_status

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeOrg:
    """An in-process token endpoint and API behind httpx.MockTransport."""

    expires_in: int | None = 3600
    token_status: int = 200
    valid: set[str] = field(default_factory=set)
    forms: list[dict[str, str]] = field(default_factory=list)
    headers: list[httpx.Headers] = field(default_factory=list)
    api_calls: int = 0
    issued: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            self.forms.append({k: v[0] for k, v in parse_qs(request.content.decode()).items()})
            self.headers.append(request.headers)
            if self.token_status != 200:
                return httpx.Response(
                    self.token_status, json={"error": "invalid_client", "error_description": "no"}
                )
            self.issued += 1
            token = f"tok{self.issued}"
            self.valid.add(token)
            body: dict[str, object] = {"access_token": token, "instance_url": "https://acme.test"}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return httpx.Response(200, json=body)
        self.api_calls += 1
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in self.valid:
            return httpx.Response(
                401, json=[{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
            )
        return httpx.Response(200, json={"ok": True, "body": request.content.decode()})


def setup(org: FakeOrg, clock: Clock, **kwargs: object) -> tuple[httpx.Client, ClientCredentials]:
    client = make_client("https://acme.test", transport=httpx.MockTransport(org))
    provider = ClientCredentials(client, "/token", "cid", Secret("hunter2"), clock=clock, **kwargs)  # type: ignore[arg-type]
    return client, provider


def test_secret_hides_value_when_printed() -> None:
    secret = Secret("hunter2")
    assert "***" in repr(secret) and "***" in str(secret) and "hunter2" not in f"{secret}"
    assert "hunter2" not in repr({"password": secret})
    assert secret.reveal() == "hunter2"
    assert secret == Secret("hunter2") and secret != Secret("other")


def test_client_credentials_caches_token_when_called_twice() -> None:
    org, clock = FakeOrg(), Clock()
    _, provider = setup(org, clock)
    assert provider.token() == provider.token() == "tok1"
    assert org.issued == 1
    assert org.forms[0] == {
        "grant_type": "client_credentials",
        "client_id": "cid",
        "client_secret": "hunter2",
    }
    assert provider.instance_url == "https://acme.test"


@pytest.mark.parametrize(
    ("expires_in", "still_cached", "refreshed"),
    [
        (3600, timedelta(seconds=3539), timedelta(seconds=3540)),  # expires_in minus the 60 s margin
        (None, timedelta(seconds=7139), timedelta(seconds=7140)),  # no expires_in: 2 h session minus margin
    ],
)
def test_client_credentials_refreshes_ahead_of_expiry_when_margin_reached(
    expires_in: int | None, still_cached: timedelta, refreshed: timedelta
) -> None:
    org, clock = FakeOrg(expires_in=expires_in), Clock()
    _, provider = setup(org, clock)
    provider.token()
    clock.now = T0 + still_cached
    assert provider.token() == "tok1"
    clock.now = T0 + refreshed
    assert provider.token() == "tok2"


def test_client_credentials_uses_session_lifetime_when_configured() -> None:
    org, clock = FakeOrg(expires_in=None), Clock()
    _, provider = setup(org, clock, session_lifetime=timedelta(minutes=15))
    provider.token()
    clock.now = T0 + timedelta(minutes=14)
    assert provider.token() == "tok2"


def test_client_credentials_sends_basic_auth_when_asked() -> None:
    org, clock = FakeOrg(), Clock()
    _, provider = setup(org, clock, basic_auth=True, scope="api")
    provider.token()
    assert org.forms[0] == {"grant_type": "client_credentials", "scope": "api"}
    assert org.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"cid:hunter2").decode()


@pytest.mark.parametrize("status", [400, 401])
def test_client_credentials_raises_auth_error_without_secret_when_refused(status: int) -> None:
    org, clock = FakeOrg(token_status=status), Clock()
    _, provider = setup(org, clock)
    with pytest.raises(AuthError) as info:
        provider.token()
    assert "invalid_client" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_client_credentials_raises_retryable_when_token_endpoint_is_down() -> None:
    org, clock = FakeOrg(token_status=503), Clock()
    _, provider = setup(org, clock)
    with pytest.raises(RetryableError):
        provider.token()


def test_bearer_auth_refreshes_once_and_retries_when_token_rejected() -> None:
    org, clock = FakeOrg(), Clock()
    client, provider = setup(org, clock)
    auth = BearerAuth(provider)
    provider.token()
    org.valid.clear()  # the server ended the session early
    response = client.post("/api", content=b"payload", auth=auth)
    assert response.status_code == 200
    assert response.json()["body"] == "payload"  # the body was resent on the retry
    assert org.issued == 2 and org.api_calls == 2


def test_bearer_auth_gives_up_after_one_refresh_when_still_rejected() -> None:
    org, clock = FakeOrg(), Clock()
    client, provider = setup(org, clock)

    class Rejecting:
        """A provider whose tokens the server never accepts."""

        def token(self) -> str:
            return "bogus"

        def invalidate(self) -> None:
            org.issued += 1

    with pytest.raises(AuthError), classify_http():
        raise_for_status(client.get("/api", auth=BearerAuth(Rejecting())))
    assert org.api_calls == 2 and org.issued == 1
    assert isinstance(provider, TokenProvider)


def test_static_token_sends_the_token_when_used() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Authorization"])
        return httpx.Response(204)

    client = make_client("https://api.hubapi.test", transport=httpx.MockTransport(handler))
    client.get("/crm/v3/objects/deals", auth=BearerAuth(StaticToken(Secret("pat-na1-x"))))
    assert seen == ["Bearer pat-na1-x"]


def test_jwt_bearer_posts_signed_assertion_when_fetching() -> None:
    org, clock = FakeOrg(expires_in=None), Clock()
    client = make_client("https://acme.test", transport=httpx.MockTransport(org))
    provider = JwtBearer(
        client,
        "/token",
        client_id="3MVG9consumer",
        username="integration@acme.test",
        signer=hs256_signer(Secret("k3y")),
        clock=clock,
    )
    assert provider.token() == "tok1"
    form = org.forms[0]
    assert form["grant_type"] == JWT_BEARER_GRANT
    head, claims, sig = form["assertion"].split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    assert json.loads(base64.urlsafe_b64decode(pad(head))) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(pad(claims))) == {
        "iss": "3MVG9consumer",
        "sub": "integration@acme.test",
        "aud": "https://login.salesforce.com",
        "exp": int((T0 + timedelta(minutes=3)).timestamp()),
    }
    expected = hmac.new(b"k3y", f"{head}.{claims}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(pad(sig)) == expected


def test_encode_jwt_uses_signer_output_when_signing() -> None:
    token = encode_jwt({"alg": "none"}, {"a": 1}, lambda data: b"\x00\xff")
    assert token.endswith(".AP8")
