"""Authentication rules of SPEC §4 and seeds 000/004: credentials, JWTs and X-Team-ID."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.gateway.auth import Authenticator as AsyncAuthenticator
from relay.gateway.auth import AuthError, Principal
from relay.gateway.store import Store
from tests.support.store_fixtures import now

SECRET = "a-test-hmac-secret-that-is-long-enough-0123456789"


class Authenticator(AsyncAuthenticator):
    """relay.gateway.auth.Authenticator with ``authenticate`` called to its end at once
    (the SQLite store never waits): these tests are about its rules."""

    def authenticate(self, authorization_header, x_team_id):  # type: ignore[override]
        return now(super().authenticate(authorization_header, x_team_id))


@pytest.fixture
def store(tmp_path: Path):
    s = Store.open(tmp_path / "data")
    yield s
    now(s.close())


@pytest.fixture
def team(store: Store):
    return now(store.create_team_with_keys("acme"))


@pytest.fixture
def other_team(store: Store):
    return now(store.create_team_with_keys("other"))


@pytest.fixture
def auth(store: Store) -> Authenticator:
    return Authenticator(store, jwt_key=SECRET)


def _jwt(claims: dict, key=SECRET, algorithm="HS256") -> str:
    claims = {"sub": "user-1", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(claims, key, algorithm=algorithm)


def _fails(auth: Authenticator, header, team_id=None) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.authenticate(header, team_id)
    return info.value


def _pem_public(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# --------------------------------------------------------------------------- credentials


@pytest.mark.parametrize("kind", ["sk", "dk"])
def test_team_keys_take_team_from_credential_and_ignore_x_team_id(auth, team, other_team,
                                                                  kind) -> None:
    t, keys = team
    for x_team_id in (None, other_team[0].id, "garbage", ""):
        p = auth.authenticate(f"Bearer {keys[kind]}", x_team_id)
        assert (p.kind, p.team_id) == (kind, t.id)
        assert p.subject == p.credential_id


def test_capabilities(auth, team) -> None:
    _, keys = team
    sk = auth.authenticate(f"Bearer {keys['sk']}", None)
    dk = auth.authenticate(f"Bearer {keys['dk']}", None)
    ak = auth.authenticate(f"Bearer {keys['ak']}", None)
    assert (sk.can_manage, sk.can_use_runtime) == (True, True)
    assert (dk.can_manage, dk.can_use_runtime) == (False, True)
    assert (ak.can_manage, ak.can_use_runtime) == (False, False)
    assert sk.require_manage() is sk
    assert dk.require_runtime() is dk
    assert ak.require_agent() is ak
    assert _status(dk.require_manage) == 403
    assert _status(ak.require_runtime) == 403
    assert _status(ak.require_manage) == 403
    assert _status(sk.require_agent) == 403


def _status(call) -> int:
    with pytest.raises(AuthError) as info:
        call()
    return info.value.status


def test_agent_key_gives_agent_principal(auth, team, other_team) -> None:
    t, keys = team
    p = auth.authenticate(f"Bearer {keys['ak']}", other_team[0].id)
    assert p.kind == "agent" and p.is_agent
    assert p.team_id == t.id


@pytest.mark.parametrize("header", [
    None, "", "   ", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token sk-abc",
    "Bearer sk-", "Bearer sk-unknown", "Bearer xk-abc", "Bearer abc", "Bearer a.b",
])
def test_missing_or_garbled_credentials_are_401(auth, team, header) -> None:
    err = _fails(auth, header, team[0].id)
    assert err.status == 401
    assert err.headers["WWW-Authenticate"].startswith("Bearer")


def test_scheme_is_case_insensitive(auth, team) -> None:
    assert auth.authenticate(f"bearer {team[1]['sk']}", None).kind == "sk"
    assert auth.authenticate(f"BEARER   {team[1]['sk']}  ", None).kind == "sk"


def test_revoked_and_near_miss_keys_are_401_and_never_echoed(store, auth, team) -> None:
    t, keys = team
    token = keys["sk"]
    near = token[:-1] + ("A" if token[-1] != "A" else "B")
    for bad in (near, token + "x", token[:-1]):
        err = _fails(auth, f"Bearer {bad}")
        assert (err.status, err.code) == (401, "invalid_credentials")
        assert bad not in err.message and bad not in repr(err)
    cred = now(store.lookup_credential(token))
    now(store.revoke_credential(t.id, cred.id))
    err = _fails(auth, f"Bearer {token}")
    assert err.status == 401
    assert token not in json.dumps(err.to_json())


def test_error_body_shape() -> None:
    err = AuthError(400, "missing_team_id", "X-Team-ID header is required")
    assert err.to_json() == {"error": {"code": "missing_team_id",
                                       "message": "X-Team-ID header is required"}}
    assert err.headers == {}


# --------------------------------------------------------------------------- JWT


def test_jwt_member_with_x_team_id(auth, team) -> None:
    t, _ = team
    token = _jwt({"teams": [t.id], "email": "u@example.com"})
    p = auth.authenticate(f"Bearer {token}", t.id.upper())
    assert isinstance(p, Principal)
    assert (p.kind, p.team_id, p.subject) == ("user", t.id, "user-1")
    assert p.claims["email"] == "u@example.com"
    assert p.can_manage and p.can_use_runtime
    assert token not in repr(p)


def test_jwt_single_team_id_claim(auth, team) -> None:
    t, _ = team
    p = auth.authenticate(f"Bearer {_jwt({'team_id': t.id})}", t.id)
    assert p.team_id == t.id


def test_jwt_without_x_team_id_is_400(auth, team) -> None:
    token = _jwt({"teams": [team[0].id]})
    for missing in (None, "", "  "):
        err = _fails(auth, f"Bearer {token}", missing)
        assert (err.status, err.code) == (400, "missing_team_id")


def test_jwt_with_malformed_x_team_id_is_400(auth, team) -> None:
    token = _jwt({"teams": [team[0].id]})
    for bad in ("acme", team[0].id + "0", "123", team[0].id.replace("-", "")):
        err = _fails(auth, f"Bearer {token}", bad)
        assert (err.status, err.code) == (400, "invalid_team_id")


def test_jwt_not_a_member_is_403(auth, team, other_team) -> None:
    token = _jwt({"teams": [team[0].id]})
    err = _fails(auth, f"Bearer {token}", other_team[0].id)
    assert (err.status, err.code) == (403, "not_a_member")
    # same answer whether or not the team exists: existence is not revealed
    err = _fails(auth, f"Bearer {token}", str(uuid.uuid4()))
    assert (err.status, err.code) == (403, "not_a_member")
    err = _fails(auth, f"Bearer {_jwt({})}", team[0].id)  # no membership claims at all
    assert (err.status, err.code) == (403, "not_a_member")


def test_jwt_member_of_team_unknown_to_gateway_is_403(auth) -> None:
    ghost = str(uuid.uuid4())
    err = _fails(auth, f"Bearer {_jwt({'teams': [ghost]})}", ghost)
    assert (err.status, err.code) == (403, "unknown_team")


def test_expired_jwt_is_401(auth, team) -> None:
    token = _jwt({"teams": [team[0].id], "exp": int(time.time()) - 10})
    err = _fails(auth, f"Bearer {token}", team[0].id)
    assert (err.status, err.code) == (401, "token_expired")


def test_wrong_signature_is_401(auth, team) -> None:
    token = _jwt({"teams": [team[0].id]}, key="another-secret-that-is-also-long-enough!!")
    err = _fails(auth, f"Bearer {token}", team[0].id)
    assert (err.status, err.code) == (401, "invalid_token")
    assert token not in err.message


def test_tampered_claims_are_401(auth, team, other_team) -> None:
    token = _jwt({"teams": [team[0].id]})
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["teams"] = [other_team[0].id]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    err = _fails(auth, f"Bearer {header}.{forged}.{signature}", other_team[0].id)
    assert err.status == 401


@pytest.mark.parametrize("claims, fragment", [
    ({"sub": None}, "sub"),
    ({"sub": ""}, "sub"),
    ({"exp": None}, "exp"),
    ({"teams": "not-a-list"}, "teams"),
])
def test_jwt_claim_requirements(auth, team, claims, fragment) -> None:
    full = {"sub": "user-1", "exp": int(time.time()) + 300, "teams": [team[0].id], **claims}
    token = jwt.encode({k: v for k, v in full.items() if v is not None}, SECRET, "HS256")
    err = _fails(auth, f"Bearer {token}", team[0].id)
    assert err.status == 401
    assert fragment in err.message


def test_jwt_without_configured_key_is_401(store, team) -> None:
    auth = Authenticator(store, jwt_key=None)
    assert not auth.jwt_enabled
    err = _fails(auth, f"Bearer {_jwt({'teams': [team[0].id]})}", team[0].id)
    assert err.status == 401
    # credentials keep working
    assert auth.authenticate(f"Bearer {team[1]['sk']}", None).kind == "sk"


def test_alg_none_is_rejected(auth, team) -> None:
    token = jwt.encode({"sub": "u", "exp": int(time.time()) + 60, "teams": [team[0].id]},
                       None, algorithm="none")
    assert _fails(auth, f"Bearer {token}", team[0].id).status == 401


def test_audience_and_issuer(store, team) -> None:
    t, _ = team
    auth = Authenticator(store, jwt_key=SECRET, jwt_audience="relay", jwt_issuer="https://idp")
    good = _jwt({"teams": [t.id], "aud": "relay", "iss": "https://idp"})
    assert auth.authenticate(f"Bearer {good}", t.id).kind == "user"
    for claims in ({"aud": "other", "iss": "https://idp"}, {"aud": "relay", "iss": "evil"},
                   {"iss": "https://idp"}):
        assert _fails(auth, f"Bearer {_jwt({'teams': [t.id], **claims})}", t.id).status == 401


@pytest.mark.parametrize("make_key, algorithm", [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
    (lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
])
def test_asymmetric_keys(store, team, make_key, algorithm) -> None:
    t, _ = team
    private = make_key()
    auth = Authenticator(store, jwt_key=_pem_public(private))
    assert auth.authenticate(f"Bearer {_jwt({'teams': [t.id]}, private, algorithm)}",
                             t.id).subject == "user-1"
    wrong = _jwt({"teams": [t.id]}, make_key(), algorithm)
    assert _fails(auth, f"Bearer {wrong}", t.id).status == 401


def test_public_key_cannot_be_used_as_hmac_secret(store, team) -> None:
    """Algorithm confusion: an HS256 token 'signed' with the RSA public key PEM."""
    t, _ = team
    pem = _pem_public(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    auth = Authenticator(store, jwt_key=pem, jwt_algorithms=("HS256", "RS256"))

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(
        {"sub": "mallory", "exp": int(time.time()) + 60, "teams": [t.id]}).encode())
    sig = hmac.new(pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    err = _fails(auth, f"Bearer {signing_input}.{b64(sig)}", t.id)
    assert err.status == 401


@pytest.mark.parametrize("key, algorithms", [
    ("short", ("HS256",)),
    (SECRET, ("RS256",)),
    ("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n", ("RS256",)),
])
def test_bad_key_configuration_fails_at_startup(store, key, algorithms) -> None:
    with pytest.raises(ValueError):
        Authenticator(store, jwt_key=key, jwt_algorithms=algorithms)


def test_authenticator_repr_hides_key(store) -> None:
    assert SECRET not in repr(Authenticator(store, jwt_key=SECRET))
