"""Helpers for tests of the site authority: a deployment with `cmg site serve` running,
devices with their own self-signed certificates, JWTs made here (for an OIDC identity
provider of the test's own, and for forged tokens)."""
import base64
import json
import ssl
import time
import urllib.request
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import cmgtest
from cmgtest import CMG, SLOW, Site, curl, free_port, make_cert, poll, run_cmg


def b64u(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def b64u_int(n):
    return b64u(n.to_bytes((n.bit_length() + 7) // 8, 'big'))


def unb64u(s):
    return base64.urlsafe_b64decode(s + '=' * (-len(s) % 4))


def jwt_claims(token):
    return json.loads(unb64u(token.split('.')[1]))


def sign_jwt(key, claims, alg=None, kid=None, header_extra=None):
    """A compact JWS of claims signed with key (EC P-256 → ES256, RSA → RS256, bytes → HS256)."""
    if alg is None:
        alg = 'ES256' if isinstance(key, ec.EllipticCurvePrivateKey) else 'RS256'
    header = {'alg': alg, 'typ': 'JWT'}
    if kid:
        header['kid'] = kid
    header.update(header_extra or {})
    signing_input = f'{b64u(json.dumps(header))}.{b64u(json.dumps(claims))}'.encode()
    if alg == 'none':
        sig = b''
    elif alg == 'HS256':
        import hmac
        sig = hmac.new(key, signing_input, 'sha256').digest()
    elif alg == 'ES256':
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, 'big') + s.to_bytes(32, 'big')
    else:
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return signing_input.decode() + '.' + b64u(sig)


def public_jwk(key, kid):
    pub = key.public_key()
    if isinstance(key, ec.EllipticCurvePrivateKey):
        n = pub.public_numbers()
        return {'kty': 'EC', 'crv': 'P-256', 'x': b64u(n.x.to_bytes(32, 'big')),
                'y': b64u(n.y.to_bytes(32, 'big')), 'kid': kid, 'use': 'sig', 'alg': 'ES256'}
    n = pub.public_numbers()
    return {'kty': 'RSA', 'n': b64u_int(n.n), 'e': b64u_int(n.e), 'kid': kid, 'use': 'sig',
            'alg': 'RS256'}


class IdP:
    """A local OIDC identity provider: one RSA and one EC key, a JWKS file."""
    ISSUER = 'https://login.example.test/7f1d0000-test-tenant/v2.0'
    TENANT = '7f1d0000-test-tenant'
    AUDIENCE = 'api://opencmg-test-server-app'

    def __init__(self, tmp):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.jwks = Path(tmp) / 'jwks.json'
        self.jwks.write_text(json.dumps({'keys': [public_jwk(self.rsa, 'rsa-1'),
                                                  public_jwk(self.ec, 'ec-1')]}))

    def claims(self, **over):
        now = int(time.time())
        c = {'iss': self.ISSUER, 'tid': self.TENANT, 'aud': self.AUDIENCE, 'sub': 'user-sub-1',
             'oid': 'object-id-1', 'upn': 'alice@example.test', 'iat': now, 'nbf': now - 10,
             'exp': now + 3600}
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, key='rsa', **over):
        k, kid = (self.rsa, 'rsa-1') if key == 'rsa' else (self.ec, 'ec-1')
        return sign_jwt(k, self.claims(**over), kid=kid)


class Device:
    """A device with its own key pair and self-signed client certificate."""

    def __init__(self, tmp, name):
        _, _, (self.crt, self.key) = make_cert(Path(tmp) / name, name, valid_days=3650)
        self.name = name
        self.token = None
        self.device_id = None

    @property
    def cert(self):
        return (self.crt, self.key)


class Deployment:
    """Site (with `cmg site serve`), gateway, connector and an internal service on loopback."""

    def __init__(self, procs, tmp, svc, start=True):
        self.procs = procs
        self.tmp = Path(tmp)
        self.admin_port = free_port()
        self.service_port = free_port()
        self.feed_port = free_port()
        self.site = Site(self.tmp / 'site', [svc.url], procs, init_args=[
            '--site-admin', f'127.0.0.1:{self.admin_port}',
            '--site-service', f'127.0.0.1:{self.service_port}',
            '--site-feed', f'127.0.0.1:{self.feed_port}'])
        conf = (self.site.dir / 'site.conf').read_text()
        self.site_role = [line.split('=', 1)[1].strip() for line in conf.splitlines()
                          if line.startswith('site_role')][0]
        self.admin_token = (self.site.dir / 'admin.token').read_text().strip()
        self.svc = svc
        self.site_proc = self.gateway = self.connector = None
        if start:
            self.start_site()
            self.gateway, self.connector = cmgtest.bring_up(procs, self.site)
            self.wait_policy()

    # ---- processes

    def start_site(self):
        self.site_proc = self.procs.start('site', [CMG, 'site', 'serve', self.site.dir])
        poll(lambda: self.api('GET', '/v1/status'), 10 * SLOW, 'the site to serve',
             check=self.procs.check)
        return self.site_proc

    def api(self, method, path, body=None, token=None):
        """The admin API (HTTPS, the site's certificate checked against its CA)."""
        req = urllib.request.Request(f'https://127.0.0.1:{self.admin_port}{path}', method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        req.add_header('Authorization', f'Bearer {token or self.admin_token}')
        ctx = ssl.create_default_context(cafile=str(self.site.ca))
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return json.loads(r.read())

    def policy_version(self):
        return self.api('GET', '/v1/status')['policy_version']

    def wait_policy(self, after=None, gateway=None, timeout=5):
        """Wait until the site publishes a version above `after` (if given), then until the
        gateway logs that the site's version is in force; return that version."""
        if after is not None:
            poll(lambda: self.policy_version() > after, timeout * SLOW,
                 f'the site to publish a policy after version {after}', check=self.procs.check)
        version = self.policy_version()
        gw = gateway or self.gateway[0]
        poll(lambda: f'policy version {version} in force' in gw.log_text(), timeout * SLOW,
             f'policy version {version} at the gateway', check=self.procs.check)
        return version

    # ---- admin commands

    def cmg_site(self, *args, check=True):
        r = run_cmg('site', *args, '--site', self.site.dir)
        if check:
            assert r.returncode == 0, f'cmg site {args}: {r.returncode}\n{r.stdout}\n{r.stderr}'
        return r

    def bulk_token(self, lifetime=None):
        args = ['token', 'bulk', 'create'] + (['--lifetime', lifetime] if lifetime else [])
        out = self.cmg_site(*args).stdout.splitlines()
        guid = [line.split(':', 1)[1].strip() for line in out if line.startswith('GUID:')][0]
        return guid, out[-1].strip()

    # ---- devices

    def reg_path(self, what='register'):
        return f'/CCM_Proxy_ServerAuth/{self.site_role}/{what}'

    def token_path(self, rest='policy.xml'):
        return f'/CCM_Proxy_ServerAuth/{self.site.role_ids[0]}/{rest}'

    def register(self, device, bulk, expect=200):
        r = curl(self.site, self.reg_path(), '-X', 'POST', '-H', f'Authorization: Bearer {bulk}',
                 '-H', 'Content-Type: application/json', '--data', json.dumps({'name': device.name}),
                 cert=device.cert)
        assert expect is None or r.status == expect, r
        if r.status == 200:
            doc = json.loads(r.body)
            device.token, device.device_id = doc['token'], doc['device_id']
        return r

    def get(self, device, path=None, token=None, cert='device'):
        """GET a token path as the device: its token (or `token`), its certificate (or `cert`)."""
        tok = token or device.token
        c = device.cert if cert == 'device' else cert
        return curl(self.site, path or self.token_path(), '-H', f'Authorization: Bearer {tok}',
                    cert=c)
