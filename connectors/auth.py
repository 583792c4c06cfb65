"""Credentials for the API connectors: ``Secret``, token providers and ``BearerAuth``.

Usage::

    from connectors.auth import BearerAuth, ClientCredentials, Secret, StaticToken

    provider = ClientCredentials(client, "/services/oauth2/token", client_id="3MV...",
                                 client_secret=Secret("..."))
    auth = BearerAuth(provider)                  # pass per request: client.get(url, auth=auth)
    auth = BearerAuth(StaticToken(Secret("pat-na1-...")))    # HubSpot private app token

A provider caches its token and fetches a new one ``margin`` (default 60 s) before it
expires. ``BearerAuth`` adds ``Authorization: Bearer ...`` and, on a 401, invalidates the
token once and retries once; a second 401 comes back to the caller, whose
``classify_http`` makes it an ``AuthError``. Token endpoint refusals raise ``AuthError``;
its 5xx/429/network failures raise retryable errors. Messages never contain secrets.

Pass the auth per request (``auth=``), not as the client's default, so a provider may
share the client it authenticates for without recursing into itself.

``JwtBearer`` signs its assertion with a pluggable ``signer`` (bytes -> signature bytes):
RS256 needs a signer built from the app's private key by the caller (the ``cryptography``
package is not a dependency); ``hs256_signer`` serves tests and the sandbox emulator.
``Secret`` is ``agent.model.Secret``, re-exported here for the connectors.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Generator, Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

import httpx

from agent.errors import AuthError
from agent.model import Secret, utcnow
from connectors.http import HttpStatusFailure, classify_http, json_body, raise_for_status

Signer = Callable[[bytes], bytes]

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@runtime_checkable
class TokenProvider(Protocol):
    """Hands out a bearer token, cached and refreshed ahead of expiry."""

    def token(self) -> str:
        """Return a currently valid access token (fetching a new one when needed)."""
        ...

    def invalidate(self) -> None:
        """Forget the cached token (the server refused it); the next ``token()`` fetches anew."""
        ...


class StaticToken:
    """A token that never expires (HubSpot private app / service key)."""

    def __init__(self, secret: Secret) -> None:
        self._secret = secret

    def token(self) -> str:
        """Return the static token."""
        return self._secret.reveal()

    def invalidate(self) -> None:
        """Do nothing: a static token cannot be refreshed, so a second 401 is final."""


class BearerAuth(httpx.Auth):
    """httpx auth flow: add the bearer token; on a 401 invalidate once and retry once."""

    requires_request_body = True

    def __init__(self, provider: TokenProvider) -> None:
        self.provider = provider

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send with the current token, and resend once with a fresh token after a 401."""
        request.headers["Authorization"] = f"Bearer {self.provider.token()}"
        response = yield request
        if response.status_code == 401:
            self.provider.invalidate()
            request.headers["Authorization"] = f"Bearer {self.provider.token()}"
            yield request


class _OAuthToken:
    """Token cache shared by the OAuth grants: one fetch at a time, refreshed ahead of expiry."""

    def __init__(
        self,
        client: httpx.Client,
        token_url: str,
        *,
        clock: Callable[[], datetime],
        margin: timedelta,
        session_lifetime: timedelta,
    ) -> None:
        self._client = client
        self._token_url = token_url
        self._clock = clock
        self._margin = margin
        self._session_lifetime = session_lifetime
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at: datetime | None = None
        self._fields: Mapping[str, Any] = {}
        self.fetches = 0

    @property
    def instance_url(self) -> str | None:
        """The ``instance_url`` of the last token response (Salesforce), if any."""
        value = self._fields.get("instance_url")
        return value if isinstance(value, str) else None

    def token(self) -> str:
        """Return the cached token, fetching a new one when absent or within the margin."""
        with self._lock:
            if self._token is None or self._refresh_at is None or self._clock() >= self._refresh_at:
                return self._fetch()
            return self._token

    def invalidate(self) -> None:
        """Forget the cached token."""
        with self._lock:
            self._token = None
            self._refresh_at = None

    def _form(self) -> dict[str, str]:
        raise NotImplementedError

    def _request_kwargs(self) -> dict[str, Any]:
        return {}

    def _fetch(self) -> str:
        issued = self._clock()
        with classify_http(rules=_token_endpoint_rule, clock=self._clock):
            response = self._client.post(
                self._token_url, data=self._form(), auth=httpx.Auth(), **self._request_kwargs()
            )
            raise_for_status(response)
        self.fetches += 1
        try:
            body = json_body(response)
        except ValueError as exc:
            raise AuthError(f"token endpoint {self._token_url} answered non-JSON") from exc
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise AuthError(f"token endpoint {self._token_url} answered without an access_token")
        lifetime = self._session_lifetime
        expires_in = body.get("expires_in")
        if expires_in is not None:
            try:
                lifetime = timedelta(seconds=float(expires_in))
            except (TypeError, ValueError):
                pass
        token: str = body["access_token"]
        self._token = token
        self._fields = {k: v for k, v in body.items() if k != "access_token"}
        self._refresh_at = issued + max(lifetime - self._margin, timedelta(0))
        return token


def _token_endpoint_rule(failure: HttpStatusFailure) -> AuthError | None:
    if 400 <= failure.status < 500 and failure.status != 429:
        code = failure.error_code or "refused"
        return AuthError(f"token endpoint {failure.url} refused the credentials: {code}")
    return None


class ClientCredentials(_OAuthToken):
    """OAuth2 client-credentials grant (Salesforce, Entra ID, NetSuite-style).

    ``expires_in`` is honoured when the endpoint sends it; Salesforce does not, so the
    token lives ``session_lifetime`` (the org's session timeout, default 2 h).
    ``basic_auth=True`` sends the client id and secret as HTTP Basic instead of form fields.
    """

    def __init__(
        self,
        client: httpx.Client,
        token_url: str,
        client_id: str,
        client_secret: Secret,
        scope: str | None = None,
        extra: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = utcnow,
        *,
        margin: timedelta = timedelta(seconds=60),
        session_lifetime: timedelta = timedelta(hours=2),
        basic_auth: bool = False,
    ) -> None:
        super().__init__(client, token_url, clock=clock, margin=margin, session_lifetime=session_lifetime)
        self._client_id = client_id
        self._client_secret = client_secret
        self._scope = scope
        self._extra = dict(extra or {})
        self._basic = basic_auth

    def _form(self) -> dict[str, str]:
        form = {"grant_type": "client_credentials", **self._extra}
        if not self._basic:
            form["client_id"] = self._client_id
            form["client_secret"] = self._client_secret.reveal()
        if self._scope:
            form["scope"] = self._scope
        return form

    def _request_kwargs(self) -> dict[str, Any]:
        if not self._basic:
            return {}
        pair = f"{self._client_id}:{self._client_secret.reveal()}".encode()
        return {"headers": {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}}


class JwtBearer(_OAuthToken):
    """OAuth2 JWT bearer grant (Salesforce): a short-lived signed assertion buys a session.

    The assertion's ``iss`` is the connected app's consumer key (``client_id``), ``sub`` the
    integration user's ``username`` and ``aud`` the login host. ``signer`` signs the
    ``header.payload`` bytes; the header's ``alg`` is ``algorithm``, else the signer's own
    ``algorithm`` attribute (``hs256_signer`` sets ``"HS256"``), else RS256.
    """

    def __init__(
        self,
        client: httpx.Client,
        token_url: str,
        *,
        client_id: str,
        username: str,
        signer: Signer,
        audience: str = "https://login.salesforce.com",
        algorithm: str | None = None,
        assertion_lifetime: timedelta = timedelta(minutes=3),
        clock: Callable[[], datetime] = utcnow,
        margin: timedelta = timedelta(seconds=60),
        session_lifetime: timedelta = timedelta(hours=2),
    ) -> None:
        super().__init__(client, token_url, clock=clock, margin=margin, session_lifetime=session_lifetime)
        self._issuer = client_id
        self._subject = username
        self._audience = audience
        self._signer = signer
        self._algorithm = algorithm or str(getattr(signer, "algorithm", "RS256"))
        self._assertion_lifetime = assertion_lifetime

    def assertion(self) -> str:
        """Build and sign a fresh JWT assertion."""
        exp = int((self._clock() + self._assertion_lifetime).timestamp())
        claims = {"iss": self._issuer, "sub": self._subject, "aud": self._audience, "exp": exp}
        return encode_jwt({"alg": self._algorithm, "typ": "JWT"}, claims, self._signer)

    def _form(self) -> dict[str, str]:
        return {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion()}


def encode_jwt(header: Mapping[str, Any], claims: Mapping[str, Any], signer: Signer) -> str:
    """Encode and sign a compact JWT (``header.payload.signature``, base64url, no padding)."""
    signing_input = f"{_b64(_compact(header))}.{_b64(_compact(claims))}"
    return f"{signing_input}.{_b64(signer(signing_input.encode('ascii')))}"


def hs256_signer(key: Secret) -> Signer:
    """Return a signer computing HMAC-SHA256 with ``key`` (tests and the sandbox emulator)."""

    def sign(data: bytes) -> bytes:
        return hmac.new(key.reveal().encode(), data, hashlib.sha256).digest()

    sign.algorithm = "HS256"  # type: ignore[attr-defined]
    return sign


def _compact(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pem_signer(private_key: Secret, algorithm: str = "RS256") -> Signer:
    """Return a signer for RS256, PS256 or ES256 from a PEM private key.

    Needs the optional ``cryptography`` package (``pip install syncagent[jwt]``); without it
    the error says so instead of failing at the first token request. The key's text is
    parsed once and never logged.
    """
    try:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise AuthError(
            f"{algorithm} signing needs the 'cryptography' package: pip install syncagent[jwt]"
        ) from exc
    try:
        key: Any = serialization.load_pem_private_key(private_key.reveal().encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise AuthError("the private key is not an unencrypted PEM private key") from exc

    def sign(data: bytes) -> bytes:
        if algorithm == "RS256":
            return bytes(key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        if algorithm == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            return bytes(key.sign(data, pss, hashes.SHA256()))
        if algorithm == "ES256":
            r, s = utils.decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        raise AuthError(f"unsupported JWT algorithm {algorithm}")

    sign.algorithm = algorithm  # type: ignore[attr-defined]
    return sign
