"""Sign in through a flow executor with authentik's official Python client.

Run by tests/official_client.rs against flowgate; exits non-zero, with the
reason on stderr, when anything the client reads does not validate or does
not say what a real authentik would. Every response goes through the
client's own (pydantic) models, so a field of the wrong type, a missing
required field or an unknown component fails here as it would for anyone
using the client.

One step differs from calling `flows_executor_get` as it stands: the
generated `ChallengeTypes.from_json` tries every challenge model and
refuses any answer that more than one accepts, which is every answer a real
authentik sends too (`control` below shows it on the recorded challenges).
The generated class also leaves its discriminator map empty. So the answer
is read as the schema's discriminator says (its `mapping`, from the
schema's components in FIXTURES), and as authentik's own web client does:
the model named by its `component`.

And one setting: authentik answers `302` to the executor URL each time a
stage passes (recorded in transcripts/login_success.json). Browsers, and
authentik's web client through them, follow it with a GET; urllib3 sends
the POST again, body and all, to the next stage. So redirects are not
followed by urllib3 (`retries`), and a 302 to the executor is asked again
with GET here, as the protocol says a client must.

    authentik_client_login.py FIXTURES BASE_URL CA_FILE SLUG PASSWORD_USER \
        PASSWORD TOTP_USER TOTP_PASSWORD TOTP_BASE32

FIXTURES is tests/fixtures/authentik.
BASE_URL is the API root (`https://host:port/api/v3`); CA_FILE the roots
to trust, or `-` for the system's.
"""

import base64
import hashlib
import hmac
import http.cookies
import struct
import sys
import time

import json
import os
import pathlib

import authentik_client
import urllib3
from authentik_client.models import (
    AuthenticatorValidationChallengeResponseRequest,
    ChallengeTypes,
    FlowChallengeResponseRequest,
    IdentificationChallengeResponseRequest,
    PasswordChallengeResponseRequest,
)


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def totp(secret_base32, at=None):
    key = base64.b32decode(secret_base32 + "=" * (-len(secret_base32) % 8))
    counter = int((time.time() if at is None else at) // 30)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    code = struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF
    return f"{code % 1_000_000:06d}"


class Browser:
    """One client with the cookies a browser would keep (the generated
    client sends a fixed cookie string and keeps none itself)."""

    def __init__(self, base_url, ca_file):
        config = authentik_client.Configuration(host=base_url)
        config.retries = urllib3.Retry(total=2, redirect=0, raise_on_redirect=False)
        if ca_file != "-":
            config.ssl_ca_cert = ca_file
        self.api = authentik_client.ApiClient(config)
        self.flows = authentik_client.FlowsApi(self.api)
        self.core = authentik_client.CoreApi(self.api)
        self.jar = {}

    def keep(self, response):
        for name, value in response.headers.items():  # also urllib3's
            if name.lower() != "set-cookie":
                continue
            for morsel in http.cookies.SimpleCookie(value).values():
                if morsel["max-age"] == "0":
                    self.jar.pop(morsel.key, None)
                else:
                    self.jar[morsel.key] = morsel.value
        self.api.cookie = "; ".join(f"{k}={v}" for k, v in self.jar.items()) or None
        return response.data

    def csrf_headers(self):
        token = next((v for k, v in self.jar.items() if k.endswith("csrf")), None)
        return {"X-authentik-CSRF": token} if token else None

    def challenge(self, response):
        if TRACE:
            print(f"< {response.status} {response.data[:300]!r}", file=sys.stderr)
        if response.status != 200:
            fail(f"executor answered {response.status}: {response.data[:200]!r}")
        self.keep(response)
        return challenge_model(json.loads(response.data))

    def get(self, slug, query):
        response = self.flows.flows_executor_get_without_preload_content(slug, query)
        return self.challenge(self.followed(slug, query, response))

    def followed(self, slug, query, response):
        """A 302 after an answer: the next stage, asked with GET."""
        rounds = 0
        while response.status == 302:
            location = response.headers.get("location", "")
            if f"/flows/executor/{slug}/" not in location:
                fail(f"302 to {location!r}, not to the executor")
            rounds += 1
            if rounds > 10:
                fail("more than 10 redirects")
            self.keep(response)
            response = self.flows.flows_executor_get_without_preload_content(slug, query)
        return response

    def solve(self, slug, query, answer):
        request = FlowChallengeResponseRequest(actual_instance=answer)
        if TRACE:
            print(f"> POST {slug} {request.to_json()}", file=sys.stderr)
        response = self.flows.flows_executor_solve_without_preload_content(
            slug, query, request, _headers=self.csrf_headers()
        )
        return self.challenge(self.followed(slug, query, response))

    def me(self):
        return self.keep(self.core.core_users_me_retrieve_with_http_info())


MAPPING = {}
TRACE = bool(os.environ.get("FLOWGATE_CLIENT_TRACE"))


def challenge_model(body):
    """The client's model for a challenge, chosen by its `component`."""
    name = MAPPING.get(body.get("component"))
    if name is None:
        fail(f"no model in the client for component {body.get('component')!r}")
    model = getattr(authentik_client.models, name)
    return model.from_dict(body)


def control(fixtures):
    """Recorded authentik challenges read the same way: if these failed,
    the fault would be this script's, not flowgate's."""
    schema = json.loads((pathlib.Path(fixtures) / "schema-components.json").read_text())
    mapping = schema["2026.8.3"]["ChallengeTypes"]["discriminator"]["mapping"]
    MAPPING.update({c: ref.rsplit("/", 1)[1] for c, ref in mapping.items()})
    read = 0
    for path in sorted((pathlib.Path(fixtures) / "challenges").glob("ak-stage-*.json")):
        body = json.loads(path.read_text())
        try:
            ChallengeTypes.from_dict(body)
            fail(f"ChallengeTypes.from_json now reads {path.name}: read answers with it")
        except ValueError:
            pass
        challenge_model(body)
        read += 1
    if read == 0:
        fail(f"no recorded challenges in {fixtures}")
    print(f"control: {read} recorded authentik challenges read by component")


def expect(challenge, component):
    if challenge.component != component:
        fail(f"expected {component}, got {challenge.component}: {challenge!r}")
    return challenge


def sign_in(browser, slug, query, user, password, totp_secret=None):
    first = expect(browser.get(slug, query), "ak-stage-identification")
    if "username" not in first.user_fields:
        fail(f"identification without username: {first.user_fields}")
    step = browser.solve(
        slug, query, IdentificationChallengeResponseRequest(uid_field=user)
    )
    expect(step, "ak-stage-password")
    if step.pending_user != user:
        fail(f"pending_user {step.pending_user!r}, expected {user!r}")

    wrong = browser.solve(
        slug, query, PasswordChallengeResponseRequest(password=password + "-wrong")
    )
    expect(wrong, "ak-stage-password")
    errors = wrong.response_errors or {}
    if not errors.get("password"):
        fail(f"a wrong password gave no password error: {errors!r}")
    print(f"wrong password: {errors['password'][0].string}")

    step = browser.solve(slug, query, PasswordChallengeResponseRequest(password=password))
    if totp_secret is not None:
        expect(step, "ak-stage-authenticator-validate")
        classes = [c.device_class for c in step.device_challenges]
        if "totp" not in [getattr(c, "value", c) for c in classes]:
            fail(f"no totp device offered: {classes}")
        bad = browser.solve(
            slug, query, AuthenticatorValidationChallengeResponseRequest(code="000000")
            if totp(totp_secret) != "000000"
            else AuthenticatorValidationChallengeResponseRequest(code="111111"),
        )
        expect(bad, "ak-stage-authenticator-validate")
        if not (bad.response_errors or {}).get("code"):
            fail(f"a wrong code gave no code error: {bad.response_errors!r}")
        step = browser.solve(
            slug,
            query,
            AuthenticatorValidationChallengeResponseRequest(code=totp(totp_secret)),
        )
    done = expect(step, "xak-flow-redirect")
    print(f"{user}: signed in, redirect to {done.to}")
    return done


def main():
    if len(sys.argv) != 10:
        fail(__doc__)
    fixtures, base, ca_file, slug, user, password, totp_user, totp_password, secret = sys.argv[1:]
    control(fixtures)
    query = "next=%2Freports"

    browser = Browser(base, ca_file)
    try:
        browser.me()
        fail("users/me answered an anonymous client")
    except authentik_client.ApiException as error:
        if error.status != 403:
            fail(f"anonymous users/me: {error.status}, expected 403")

    done = sign_in(browser, slug, query, user, password)
    if done.to != "/reports":
        fail(f"redirect to {done.to!r}, expected '/reports'")
    me = browser.me()
    if me.user.username != user or not me.user.is_current:
        fail(f"users/me says {me.user.username!r} (is_current {me.user.is_current})")
    if [u.username for u in me.users] != [user]:
        fail(f"users/me lists {[u.username for u in me.users]}")
    print(f"users/me: {me.user.username} groups={sorted(g.name for g in me.user.groups)}")

    # Signed in, the flow runs again only with the CSRF token (§1.8).
    again = browser.get(slug, query)
    print(f"signed in, the flow again: {again.component}")

    # Sign out by the invalidation flow, as authentik's own UI does.
    out = browser.get("default-invalidation-flow", "")
    expect(out, "xak-flow-redirect")
    try:
        browser.me()
        fail("users/me still answers after the invalidation flow")
    except authentik_client.ApiException as error:
        if error.status != 403:
            fail(f"users/me after sign-out: {error.status}, expected 403")
    print("signed out")

    second = Browser(base, ca_file)
    sign_in(second, slug, query, totp_user, totp_password, secret)
    me = second.me()
    if me.user.username != totp_user:
        fail(f"users/me says {me.user.username!r}, expected {totp_user!r}")
    print(f"users/me: {me.user.username} groups={sorted(g.name for g in me.user.groups)}")
    print("ok")


if __name__ == "__main__":
    main()
