"""Who is calling: turn ``Authorization`` (+ ``X-Team-ID``) into a :class:`Principal`.

The rules (SPEC §4 "Identity and access", seeds 000 and 004):

* ``Bearer sk-…`` / ``Bearer dk-…``: a team credential. The team comes from the
  credential row; any ``X-Team-ID`` sent is ignored, even a malformed one.
* ``Bearer ak-…``: an agent credential, principal kind ``agent``. Only the agent endpoint
  accepts it; API endpoints answer 403 (see :meth:`Principal.require_runtime`).
* ``Bearer <JWT>``: a user session token, verified with PyJWT against the configured key
  (none configured → 401). It must carry ``sub`` and ``exp``. Team membership is read
  from the ``teams`` claim (a list of team UUIDs) and/or a single ``team_id`` claim. The
  caller MUST send ``X-Team-ID``: missing or not a UUID → 400; a team the token does not
  list → 403 ``not_a_member``.
* Anything else (no header, another scheme, an unknown, garbled or revoked credential, a
  bad/expired JWT) → 401.

Why 403 (not 404) for "not a member": ``X-Team-ID`` is the caller's choice of scope, not
a resource it asked for, and the answer is the same whether or not the team exists, so
it reveals nothing. Resources of another team (an agent, tunnel, service) still answer
404, decided by the endpoint that looks them up in the principal's team.

Error messages never contain the presented token.

Caches (the proxy and invoke authenticate every request on a keep-alive connection, and
a SQLite read plus row decoding per request was a sizeable share of their CPU): an
accepted sk-/dk-/ak- credential and a known team are kept in memory keyed by the token's
SHA-256 (as in the database: a hash lookup, the token itself is never a key or logged)
for as long as :meth:`Store.generation` stays the same; any commit to the database, by
this gateway or by another process (``relay admin`` revoking a key), empties them, so a
revoked key is refused on its very next request (PostgreSQL: once the commit's
notification arrived, see relay.gateway.store.postgres). :meth:`Authenticator.cached`
answers from these caches alone, for the proxies' per-request resolvers, which may not
wait; :meth:`Authenticator.authenticate` asks the store on a miss. A row read while
something else committed is not kept. Unknown or revoked tokens are never
cached (nothing for a guesser to fill memory with). A verified JWT's claims are kept by
token hash until its ``exp``; the caches are bounded (:data:`CACHE_MAX` entries each).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from relay.gateway.store import Credential, Store, hash_token, normalize_uuid, token_kind

__all__ = ["AuthError", "Authenticator", "Principal", "PRINCIPAL_KINDS"]

#: ``agent`` (ak-), ``sk``, ``dk``, ``user`` (JWT).
PRINCIPAL_KINDS: tuple[str, ...] = ("agent", "sk", "dk", "user")

#: Entries per in-memory cache (credentials, JWT claims); past it a cache starts over.
CACHE_MAX = 4096

# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
_MIN_HMAC_KEY_BYTES = 32


class AuthError(Exception):
    """Authentication or authorisation failed: answer ``status`` with
    ``{"error": {"code": code, "message": message}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        """The JSON error body of SPEC §7."""
        return {"error": {"code": self.code, "message": self.message}}

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers: RFC 6750 ``WWW-Authenticate`` on a 401."""
        return {"WWW-Authenticate": 'Bearer realm="relay"'} if self.status == 401 else {}

    def __repr__(self) -> str:
        return f"AuthError({self.status}, {self.code!r}, {self.message!r})"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller, always scoped to exactly one team.

    ``subject`` is the credential id for ``agent``/``sk``/``dk``, the JWT ``sub`` for
    ``user``. ``claims`` holds a user's verified JWT claims (empty for credentials).
    """

    kind: str
    team_id: str
    subject: str
    credential_id: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False,
                                      hash=False)

    @property
    def can_manage(self) -> bool:
        """May create/update/delete resources (tunnels, shares, webhooks …): sk and users."""
        return self.kind in ("sk", "user")

    @property
    def can_use_runtime(self) -> bool:
        """May use runtime endpoints (proxy, invoke, open/use tunnels): sk, dk and users."""
        return self.kind in ("sk", "dk", "user")

    @property
    def is_agent(self) -> bool:
        return self.kind == "agent"

    def require_runtime(self) -> Principal:
        """Return self, or raise 403 for an agent key on an API endpoint."""
        if not self.can_use_runtime:
            raise AuthError(403, "forbidden", "agent keys (ak-) may only connect as an agent")
        return self

    def require_manage(self) -> Principal:
        """Return self, or raise 403 unless the caller may manage the team's resources."""
        self.require_runtime()
        if not self.can_manage:
            raise AuthError(403, "forbidden",
                            "runtime keys (dk-) cannot manage resources; use an sk- key")
        return self

    def require_agent(self) -> Principal:
        """Return self, or raise 403 unless this is an agent key (the agent endpoint)."""
        if not self.is_agent:
            raise AuthError(403, "forbidden", "the agent endpoint needs an agent key (ak-)")
        return self


class Authenticator:
    """Authenticates requests against the store's credentials and a JWT key.

    ``jwt_key`` is an HMAC secret (HS*) or a PEM public key / certificate (RS*/ES*/PS*/
    EdDSA). Only the configured algorithms of the key's own family are accepted, so an
    RSA public key can never be (mis)used as an HMAC secret. ``jwt_audience`` and
    ``jwt_issuer``, when set, must match ``aud``/``iss``; without an audience, ``aud`` is
    not checked.
    """

    def __init__(
        self,
        store: Store,
        jwt_key: str | None = None,
        jwt_algorithms: Iterable[str] = ("HS256", "RS256", "ES256"),
        jwt_audience: str | None = None,
        jwt_issuer: str | None = None,
        *,
        jwt_leeway: float = 0.0,
    ) -> None:
        self._store = store
        self._jwt_key, self._jwt_algorithms = _prepare_key(jwt_key, tuple(jwt_algorithms))
        self._jwt_audience = jwt_audience
        self._jwt_issuer = jwt_issuer
        self._jwt_leeway = jwt_leeway
        self._generation: Any = None
        self._credentials: dict[str, Credential] = {}  # token hash -> accepted credential
        #: Authorization header -> the principal of a credential in ``_credentials``
        #: (emptied with it): a repeated header costs one lookup, no parse, hash or new
        #: Principal. Raw headers as keys, as the service proxy's remembered answers.
        self._principals: dict[str | None, Principal] = {}
        self._teams: set[str] = set()  # teams known to exist
        self._jwt_claims: dict[str, tuple[float, dict[str, Any]]] = {}  # token hash -> (exp, claims)
        #: Moved by :meth:`forget`: callers that remember answers built on these caches
        #: (the service proxy's) compare it, since a fleet's invalidation moves no
        #: store generation here.
        self.epoch = 0

    def __repr__(self) -> str:  # never show the key
        return f"Authenticator(jwt_algorithms={list(self._jwt_algorithms)!r})"

    @property
    def jwt_enabled(self) -> bool:
        return self._jwt_key is not None

    def cached(self, authorization_header: str | None, x_team_id: str | None) -> Principal | None:
        """:meth:`authenticate` from memory only, for paths that must not wait (the
        proxies' per-request resolvers): the principal, or None when the store has to
        be asked (a credential or team not in the caches: then await
        :meth:`authenticate`). Raises :class:`AuthError` for what needs no store."""
        known = self._principals.get(authorization_header)
        if known is not None and self._store.generation() == self._generation:
            return known
        token = _bearer_token(authorization_header)
        if token_kind(token) is not None:
            self._fresh_caches()
            cred = self._credentials.get(hash_token(token))
            if cred is None:
                return None
            principal = _principal_of(cred)
            if len(self._principals) >= CACHE_MAX:
                self._principals.clear()
            self._principals[authorization_header] = principal
            return principal
        if token.count(".") == 2:
            team_id, subject, claims = self._user_claims(token, x_team_id)
            self._fresh_caches()
            if team_id not in self._teams:
                return None
            return Principal(kind="user", team_id=team_id, subject=subject, claims=claims)
        raise AuthError(401, "invalid_credentials", "unrecognised bearer token")

    def forget(self) -> None:
        """Empty the row caches now (another gateway of a fleet changed credentials)."""
        self._credentials.clear()
        self._principals.clear()
        self._teams.clear()
        self._generation = None
        self.epoch += 1

    async def authenticate(self, authorization_header: str | None,
                           x_team_id: str | None) -> Principal:
        """Resolve the caller, or raise :class:`AuthError` (400/401/403)."""
        principal = self.cached(authorization_header, x_team_id)
        if principal is not None:
            return principal
        token = _bearer_token(authorization_header)
        if token_kind(token) is not None:
            return await self._credential_principal(token)
        return await self._user_principal(token, x_team_id)

    async def agent_default(self, authorization_header: str | None) -> Callable[[], Principal]:
        """The built-in ``ak-`` check of a connecting agent, done now, as the
        ``default`` an ``authenticate`` hook may call (synchronously) to use it."""
        try:
            principal = (await self.authenticate(authorization_header, None)).require_agent()
        except AuthError as exc:
            error = exc

            def refuse() -> Principal:
                raise error

            return refuse
        return lambda: principal

    def _fresh_caches(self) -> None:
        """Empty the row caches if anything was committed to the database since they were
        filled (see the module docstring)."""
        generation = self._store.generation()
        if generation != self._generation:
            self._credentials.clear()
            self._principals.clear()
            self._teams.clear()
            self._generation = generation

    async def _credential_principal(self, token: str) -> Principal:
        before = self._store.generation()
        cred = await self._store.lookup_credential(token)  # compares the hash in constant time
        if cred is None:
            raise AuthError(401, "invalid_credentials", "unknown or revoked credential")
        self._fresh_caches()
        # Kept only if nothing was committed while the lookup ran: the row may be stale.
        if self._generation == before:
            if len(self._credentials) >= CACHE_MAX:
                self._credentials.clear()
            self._credentials[hash_token(token)] = cred
        return _principal_of(cred)

    def _user_claims(self, token: str, x_team_id: str | None) -> tuple[str, str, dict[str, Any]]:
        """``(team_id, subject, claims)`` of a user session token; every check that
        needs no store (the team's existence is the caller's)."""
        claims = self._verify_jwt(token)
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, "invalid_token", 'JWT "sub" claim must be a non-empty string')
        teams = _member_teams(claims)
        if x_team_id is None or not x_team_id.strip():
            raise AuthError(400, "missing_team_id",
                            "X-Team-ID header is required with a user session token")
        team_id = normalize_uuid(x_team_id)
        if team_id is None:
            raise AuthError(400, "invalid_team_id", "X-Team-ID must be a team UUID")
        if team_id not in teams:
            raise AuthError(403, "not_a_member", f"not a member of team {team_id}")
        return team_id, subject, claims

    async def _user_principal(self, token: str, x_team_id: str | None) -> Principal:
        team_id, subject, claims = self._user_claims(token, x_team_id)
        before = self._store.generation()
        if await self._store.get_team(team_id) is None:
            raise AuthError(403, "unknown_team", f"team {team_id} does not exist on this gateway")
        self._fresh_caches()
        if self._generation == before:
            if len(self._teams) >= CACHE_MAX:
                self._teams.clear()
            self._teams.add(team_id)
        return Principal(kind="user", team_id=team_id, subject=subject, claims=claims)

    def _verify_jwt(self, token: str) -> dict[str, Any]:
        if self._jwt_key is None:
            raise AuthError(401, "invalid_token",
                            "user session tokens (JWT) are not enabled on this gateway")
        key = hash_token(token)
        cached = self._jwt_claims.get(key)
        if cached is not None:
            if time.time() < cached[0]:
                return cached[1]
            del self._jwt_claims[key]  # expired: decode again, which answers token_expired
        claims = self._decode_jwt(token)
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            if len(self._jwt_claims) >= CACHE_MAX:
                self._jwt_claims.clear()
            # Valid until exp (+ leeway, as PyJWT accepts it); nbf/iat passed already.
            self._jwt_claims[key] = (float(exp) + self._jwt_leeway, claims)
        return claims

    def _decode_jwt(self, token: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token, self._jwt_key, algorithms=list(self._jwt_algorithms),
                audience=self._jwt_audience, issuer=self._jwt_issuer,
                leeway=self._jwt_leeway,
                options={"require": ["sub", "exp"],
                         "verify_aud": self._jwt_audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token_expired", "JWT has expired") from None
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name the failed check, never the token itself.
            raise AuthError(401, "invalid_token", f"invalid JWT: {exc}") from None


def _principal_of(cred: Credential) -> Principal:
    kind = "agent" if cred.kind == "ak" else cred.kind
    return Principal(kind=kind, team_id=cred.team_id, subject=cred.id, credential_id=cred.id)


def _bearer_token(header: str | None) -> str:
    if header is None or not header.strip():
        raise AuthError(401, "missing_credentials", "missing Authorization header")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":  # RFC 7235: the scheme is case-insensitive
        raise AuthError(401, "invalid_credentials", "Authorization must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise AuthError(401, "missing_credentials", "empty bearer token")
    return token


def _member_teams(claims: Mapping[str, Any]) -> set[str]:
    """Team UUIDs from the ``teams`` (list) and ``team_id`` (single) claims."""
    raw: list[Any] = []
    if "teams" in claims:
        if not isinstance(claims["teams"], list):
            raise AuthError(401, "invalid_token", 'JWT "teams" claim must be a list of team UUIDs')
        raw.extend(claims["teams"])
    if "team_id" in claims:
        raw.append(claims["team_id"])
    return {team for team in map(normalize_uuid, raw) if team is not None}


def _prepare_key(key: str | None, algorithms: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
    """Parse the configured key and keep only the algorithms of its family."""
    if key is None:
        return None, ()
    if "-----BEGIN" in key:
        public_key, families = _load_public_key(key)
        allowed = tuple(a for a in algorithms if a.startswith(families))
        if not allowed:
            raise ValueError(f"the JWT key cannot verify any of {list(algorithms)}")
        return public_key, allowed
    if len(key.encode()) < _MIN_HMAC_KEY_BYTES:
        raise ValueError(f"a JWT HMAC secret must be at least {_MIN_HMAC_KEY_BYTES} bytes")
    allowed = tuple(a for a in algorithms if a.startswith("HS"))
    if not allowed:
        raise ValueError(f"an HMAC secret was given but none of {list(algorithms)} is HS*")
    return key, allowed


def _load_public_key(pem: str) -> tuple[Any, tuple[str, ...]]:
    # Imported here: only asymmetric JWT keys need cryptography.
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = pem.encode()
    public_key: PublicKeyTypes  # a certificate's key types are among these
    try:
        if b"CERTIFICATE" in data:
            public_key = x509.load_pem_x509_certificate(data).public_key()
        else:
            public_key = load_pem_public_key(data)
    except ValueError:
        raise ValueError("the JWT key is not a PEM public key or certificate "
                         "(a private key does not belong on a verifier)") from None
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key, ("RS", "PS")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key, ("ES",)
    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return public_key, ("EdDSA",)
    raise ValueError(f"unsupported JWT key type {type(public_key).__name__}")
