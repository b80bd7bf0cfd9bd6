"""OIDC keys that follow the provider: `oidc set --discovery URL --ca FILE` against a local
provider (its discovery document and key set over HTTPS from a private CA made here); the
running site refreshes the keys on a schedule (site.conf `oidc_refresh`, short here), so a
rotation at the provider needs no admin; a provider that is down, answers garbage or hangs
leaves the last good keys in force, says why in the log, and never stalls the admin API."""
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmgtest import SLOW, curl, ini_set, make_cert, poll
import cmgtest
from sitetest import Deployment, IdP, public_jwk, sign_jwt

REFRESH = 2      # site.conf oidc_refresh in these tests, seconds


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass   # clients that the site killed mid-answer are expected here


class Provider:
    """An OIDC provider on loopback over HTTPS (a certificate of its own CA): its discovery
    document names its issuer and jwks_uri; `keys` are what the JWKS URL serves, `mode`
    makes it fail ('down': 503, 'garbage': not JSON, 'empty': no usable key, 'huge': a
    3 MiB key set, 'trickle': a byte a second, never done), `headers` are added to the JWKS answer."""

    def __init__(self, tmp):
        ca_cert, ca_key, (self.ca, _) = make_cert(tmp / 'idp-ca', 'Test IdP CA', ca=True)
        _, _, (crt, key) = make_cert(tmp / 'idp-server', '127.0.0.1', ca_cert, ca_key,
                                     eku=(ExtendedKeyUsageOID.SERVER_AUTH,), san=('127.0.0.1',))
        # (kid -> private key, headers of the JWKS answer): one value, so that an answer
        # never pairs new keys with old headers or the other way round
        self.published = ({}, {})
        self.mode = 'ok'
        self.jwks_hits = 0
        self.hanging = threading.Event()
        self.release = threading.Event()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                provider.serve(self)

        self.httpd = QuietServer(('127.0.0.1', 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.base = f'https://127.0.0.1:{self.httpd.server_address[1]}/tenant/v2.0'
        self.discovery = self.base + '/.well-known/openid-configuration'
        self.jwks_uri = self.base + '/discovery/keys'
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def keys(self):
        return self.published[0]

    @property
    def headers(self):
        return self.published[1]

    @headers.setter
    def headers(self, value):
        self.published = (self.published[0], value)

    def rotate(self, kid, headers=None):
        """The provider's keys become one new RSA key, kid; with headers, its answers carry
        those from the same moment on."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.published = ({kid: key}, self.headers if headers is None else headers)

    def token(self, kid, **claims):
        c = IdP.claims(IdP, **claims)
        return sign_jwt(self.keys[kid], c, kid=kid)

    def serve(self, h):
        if h.path == '/tenant/v2.0/.well-known/openid-configuration':
            body = json.dumps({'issuer': IdP.ISSUER, 'jwks_uri': self.jwks_uri,
                               'authorization_endpoint': self.base + '/authorize'}).encode()
            return self.answer(h, 200, body)
        if h.path != '/tenant/v2.0/discovery/keys':
            return self.answer(h, 404, b'{}')
        self.jwks_hits += 1
        if self.mode == 'down':
            return self.answer(h, 503, b'{"error":"maintenance"}')
        if self.mode == 'garbage':
            return self.answer(h, 200, b'<html>not a key set</html>')
        if self.mode == 'empty':
            return self.answer(h, 200, b'{"keys":[]}')
        if self.mode == 'huge':
            return self.answer(h, 200, b'{"keys":[' + b' ' * (3 << 20) + b']}')
        if self.mode == 'trickle':      # a byte every second: no read ever waits long
            self.hanging.set()
            h.send_response(200)
            h.send_header('Content-Length', '1000')
            h.end_headers()
            while not self.release.wait(1):
                h.wfile.write(b' ')
                h.wfile.flush()
            return None
        published, headers = self.published
        keys = [public_jwk(k, kid) for kid, k in published.items()]
        return self.answer(h, 200, json.dumps({'keys': keys}).encode(), headers)

    @staticmethod
    def answer(h, status, body, headers=None):
        h.send_response(status)
        h.send_header('Content-Type', 'application/json')
        h.send_header('Content-Length', str(len(body)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture
def provider(tmp_path):
    p = Provider(tmp_path)
    p.rotate('key-A')
    yield p
    p.close()


def deployment(procs, tmp_path, svc, refresh=REFRESH):
    dep = Deployment(procs, tmp_path, svc, start=False)
    ini_set(dep.site.dir / 'site.conf', 'site', 'oidc_refresh', str(refresh))
    dep.start_site()
    dep.gateway, dep.connector = cmgtest.bring_up(procs, dep.site)
    dep.wait_policy()
    return dep


@pytest.fixture
def dep(procs, tmp_path, svc):
    return deployment(procs, tmp_path, svc)


def oidc_set(dep, provider, *extra, check=True):
    return dep.cmg_site('oidc', 'set', '--discovery', provider.discovery, '--ca', provider.ca,
                        '--audience', IdP.AUDIENCE, '--tenant', IdP.TENANT, *extra, check=check)


def status(dep, token):
    return curl(dep.site, dep.token_path('echo-headers'), '-H', f'Authorization: Bearer {token}',
                cert=False).status


def site_log(dep):
    return dep.site_proc.log_text()


def test_rotation_at_the_provider_needs_no_admin(dep, provider, svc):
    v = dep.policy_version()
    r = oidc_set(dep, provider, '--json')
    out = json.loads(r.stdout)
    assert out['issuer'] == IdP.ISSUER and out['jwks_uri'] == provider.jwks_uri, out
    dep.wait_policy(after=v)
    assert status(dep, provider.token('key-A')) == 200
    shown = dep.cmg_site('oidc', 'show').stdout
    assert provider.discovery in shown and 'key-A' in shown, shown

    # The provider rotates: key A gone, key B in; its cache headers say 3 s.
    key_a = provider.keys['key-A']
    provider.rotate('key-B', {'Cache-Control': 'public, max-age=3'})
    start = time.monotonic()
    # No token of key B is shown before the site has it: the schedule alone finds it.
    poll(lambda: 'added kid key-B' in site_log(dep), 70 * SLOW, 'the site to fetch key B',
         interval=0.1, check=dep.procs.check)
    token_b = provider.token('key-B')
    poll(lambda: status(dep, token_b) == 200, 10 * SLOW, 'a token of key B accepted',
         interval=0.1, check=dep.procs.check)
    took = time.monotonic() - start
    print(f'key B accepted {took:.1f} s after the rotation')
    assert took < 70
    log = site_log(dep)
    assert 'added kid key-B, removed kid key-A' in log, log
    assert 'next refresh in 3 s' in log, log          # the provider's max-age, honoured
    assert 'a gateway saw a token' not in log, log
    # Key A is no longer trusted: its tokens are refused, nothing forwarded.
    before = svc.count
    assert status(dep, sign_jwt(key_a, IdP.claims(IdP), kid='key-A')) == 401
    assert svc.count == before
    assert 'key-B' in dep.cmg_site('oidc', 'show').stdout


FAILURES = [('down', 'HTTP status 503, expected 200'),
            ('garbage', 'is not a JSON object'),
            ('empty', 'no usable key'),
            ('huge', 'response body larger than 1048576 bytes')]


def test_a_failing_provider_leaves_the_last_good_keys(dep, provider):
    v = dep.policy_version()
    oidc_set(dep, provider)
    dep.wait_policy(after=v)
    token = provider.token('key-A')
    assert status(dep, token) == 200
    for mode, why in FAILURES:
        hits = provider.jwks_hits
        provider.mode = mode
        poll(lambda: why in dep.api('GET', '/v1/status')['oidc_refresh']['last_error'],
             10 * REFRESH * SLOW, f'the refresh to fail ({why})', interval=0.1,
             check=dep.procs.check)
        line = [ln for ln in site_log(dep).splitlines()
                if 'cannot refresh from' in ln and why in ln][0]
        assert provider.discovery in line and provider.jwks_uri in line, line
        assert 'the keys in force stay' in line, line
        # Retried (every 30 s, or the configured interval when shorter); the keys hold.
        poll(lambda: provider.jwks_hits >= hits + 2, 10 * REFRESH * SLOW, 'retries',
             interval=0.1, check=dep.procs.check)
        assert status(dep, token) == 200
    # The provider recovers with a new key: followed, and said so.
    provider.rotate('key-C')
    provider.mode = 'ok'
    poll(lambda: status(dep, provider.token('key-C')) == 200, 10 * REFRESH * SLOW,
         'key C accepted', interval=0.2, check=dep.procs.check)
    assert 'works again' in site_log(dep)
    state = dep.api('GET', '/v1/status')['oidc_refresh']
    assert state['last_error'] == '' and state['last_ok'] > time.time() - 60, state


def test_a_trickling_provider_does_not_stall_the_site(dep, provider):
    """A byte a second: no single read waits long, so only the fetch's 20 s deadline ends
    it. Meanwhile the admin API, admin changes and the keys in force work as ever."""
    v = dep.policy_version()
    oidc_set(dep, provider)
    dep.wait_policy(after=v)
    provider.mode = 'trickle'
    assert provider.hanging.wait(10 * REFRESH * SLOW), 'no refresh reached the provider'
    start = time.monotonic()
    worst = 0
    for _ in range(20):
        t = time.monotonic()
        dep.api('GET', '/v1/status')
        worst = max(worst, time.monotonic() - t)
    print(f'admin API while the provider trickles: worst {worst * 1000:.0f} ms')
    assert worst < 1 * SLOW
    assert dep.api('GET', '/v1/status')['oidc_refresh']['fetching']
    v = dep.policy_version()
    dep.cmg_site('device', 'block', 'oidc:someone')
    poll(lambda: dep.policy_version() > v, 5 * SLOW, 'a new policy', check=dep.procs.check)
    assert status(dep, provider.token('key-A')) == 200
    poll(lambda: 'no answer within 20 s' in site_log(dep), 40 * SLOW, 'the fetch deadline',
         interval=0.2, check=dep.procs.check)
    took = time.monotonic() - start
    print(f'fetch ended by its deadline {took:.1f} s after the trickle began')
    assert took >= 15
    assert status(dep, provider.token('key-A')) == 200


def test_jwks_url_with_a_private_ca(dep, provider):
    base = ['oidc', 'set', '--issuer', IdP.ISSUER, '--audience', IdP.AUDIENCE,
            '--jwks', provider.jwks_uri]
    r = dep.cmg_site(*base, check=False)
    assert r.returncode != 0 and provider.jwks_uri in r.stderr and 'certificate' in r.stderr, r
    v = dep.policy_version()
    dep.cmg_site(*base, '--ca', provider.ca)
    dep.wait_policy(after=v)
    assert status(dep, provider.token('key-A')) == 200
    provider.rotate('key-D')
    poll(lambda: status(dep, provider.token('key-D')) == 200, 10 * REFRESH * SLOW,
         'key D accepted', interval=0.2, check=dep.procs.check)


def test_discovery_errors_are_clear(dep, provider, tmp_path):
    r = oidc_set(dep, provider, '--issuer', 'https://someone.else/v2.0', check=False)
    assert r.returncode != 0, r
    assert IdP.ISSUER in r.stderr and 'https://someone.else/v2.0' in r.stderr, r.stderr
    r = dep.cmg_site('oidc', 'set', '--discovery', provider.discovery, '--audience',
                     IdP.AUDIENCE, check=False)
    assert r.returncode != 0 and provider.discovery in r.stderr, r.stderr   # untrusted CA
    not_pem = tmp_path / 'not-a-ca.pem'
    not_pem.write_text('hello\n')
    r = dep.cmg_site('oidc', 'set', '--discovery', provider.discovery, '--ca', not_pem,
                     '--audience', IdP.AUDIENCE, check=False)
    assert r.returncode != 0 and 'PEM' in r.stderr, r.stderr
    r = dep.cmg_site('oidc', 'set', '--audience', IdP.AUDIENCE, check=False)
    assert r.returncode == 2 and '--discovery' in r.stderr, r.stderr


def test_an_unknown_kid_at_a_gateway_refreshes_at_once(procs, tmp_path, svc, provider):
    """With an hourly schedule, the gateway's report of a token's unknown key id (up its
    tunnel, on through the connector's mutual-TLS feed) makes the site refresh at once;
    more unknown kids within the minute reach the provider no more."""
    dep = deployment(procs, tmp_path, svc, refresh=3600)
    # The refresh a second after start has found nothing to follow: the next is an hour away.
    poll(lambda: dep.api('GET', '/v1/status')['oidc_refresh']['next_in'] > 60, 5 * SLOW,
         'the first refresh', check=dep.procs.check)
    v = dep.policy_version()
    oidc_set(dep, provider)
    dep.wait_policy(after=v)
    assert status(dep, provider.token('key-A')) == 200
    provider.rotate('key-B')
    hits = provider.jwks_hits
    token_b = provider.token('key-B')
    start = time.monotonic()
    assert status(dep, token_b) == 401       # not yet: the report goes up
    poll(lambda: status(dep, token_b) == 200, 10 * SLOW, 'a token of key B accepted',
         interval=0.2, check=dep.procs.check)
    print(f'key B accepted {time.monotonic() - start:.1f} s after its first token')
    assert 'reported to the site through 1 tunnel' in dep.gateway[0].log_text()
    assert 'key id key-B' in dep.connector.log_text()
    log = site_log(dep)
    assert 'a gateway saw a token signed with key id key-B' in log, log
    assert 'added kid key-B, removed kid key-A' in log, log
    assert provider.jwks_hits == hits + 1
    # Tokens with made-up key ids: refused, and the provider is not asked again.
    for i in range(20):
        forged = sign_jwt(provider.keys['key-B'], IdP.claims(IdP), kid=f'made-up-{i}')
        assert status(dep, forged) == 401
    time.sleep(2)
    assert provider.jwks_hits == hits + 1
    assert 'made-up' not in site_log(dep)


def test_cache_headers_set_the_next_refresh_within_bounds(dep, provider):
    """Cache-Control no-store: the lower bound (here oidc_refresh itself, 2 s); Expires
    minus Date: as said; max-age over a day: a day."""
    from email.utils import formatdate
    v = dep.policy_version()
    oidc_set(dep, provider)
    dep.wait_policy(after=v)

    def rotate_and_read(kid, headers):
        # together: a refresh between the two would cache the old keys under the new
        # headers (Expires in 40 s) and not look again within this poll
        provider.rotate(kid, headers)
        line = poll(lambda: ([ln for ln in site_log(dep).splitlines()
                              if f'added kid {kid}' in ln] or [None])[0],
                    10 * REFRESH * SLOW, f'the site to fetch {kid}', interval=0.1,
                    check=dep.procs.check)
        return int(line.rsplit('next refresh in ', 1)[1].split()[0])

    assert rotate_and_read('key-N', {'Cache-Control': 'no-store'}) == REFRESH
    expires = rotate_and_read('key-E', {'Expires': formatdate(time.time() + 40, usegmt=True)})
    assert 38 <= expires <= 41, expires
    # Expires in 40 s holds the next scheduled refresh back ...
    provider.rotate('key-M', {'Cache-Control': 'max-age=999999'})
    time.sleep(3 * REFRESH)
    assert 'added kid key-M' not in site_log(dep)
    # ... until a gateway reports key M; the provider's "999999 s" is held to a day.
    status(dep, provider.token('key-M'))
    line = poll(lambda: ([ln for ln in site_log(dep).splitlines() if 'added kid key-M' in ln]
                         or [None])[0], 10 * SLOW, 'the site to fetch key M', interval=0.1,
                check=dep.procs.check)
    assert 'next refresh in 86400 s' in line, line
