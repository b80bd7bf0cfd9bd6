"""Entra ID / OIDC tokens checked against the JWKS the site was given, and client
certificates against the CTL and CRL of the policy."""
import http.client
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmgtest import SLOW, curl, poll
from sitetest import Deployment, IdP


@pytest.fixture
def dep(procs, tmp_path, svc):
    return Deployment(procs, tmp_path, svc)


@pytest.fixture
def idp(dep, tmp_path):
    idp = IdP(tmp_path)
    v = dep.policy_version()
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', idp.jwks)
    dep.wait_policy(after=v)
    return idp


def bearer(dep, token, rest='echo-headers'):
    return curl(dep.site, dep.token_path(rest), '-H', f'Authorization: Bearer {token}', cert=False)


def test_oidc_tokens_of_the_idp_get_through(dep, idp):
    for key in ('rsa', 'ec'):
        r = bearer(dep, idp.token(key))
        assert r.status == 200, r
        headers = {k.lower(): v for k, v in json.loads(r.body)['headers']}
        assert headers['cmg-client-auth'] == 'oidc'
        assert headers['cmg-client-user'] == 'alice@example.test'
        assert headers['cmg-client-tenant'] == idp.TENANT
    # Within the clock-skew allowance
    assert bearer(dep, idp.token(exp=int(time.time()) - 30)).status == 200


@pytest.mark.parametrize('case', ['other_key', 'wrong_tenant', 'expired', 'wrong_aud',
                                  'not_yet', 'unknown_kid'])
def test_bad_oidc_tokens_are_refused(dep, idp, svc, case):
    from sitetest import sign_jwt
    now = int(time.time())
    token = {
        'other_key': lambda: sign_jwt(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                      idp.claims(), kid='rsa-1'),
        'wrong_tenant': lambda: idp.token(tid='00000000-other-tenant'),
        'expired': lambda: idp.token(exp=now - 3600, nbf=now - 7200, iat=now - 7200),
        'wrong_aud': lambda: idp.token(aud='api://someone-else'),
        'not_yet': lambda: idp.token(nbf=now + 3600),
        'unknown_kid': lambda: sign_jwt(idp.rsa, idp.claims(), kid='rsa-9'),
    }[case]()
    before = svc.count
    r = bearer(dep, token, 'policy.xml')
    assert r.status == 401 and b'CMGService_' in r.body, r
    assert svc.count == before


def test_oidc_not_allowed_on_a_mapping_without_it(dep, idp, procs):
    from cmgtest import InternalService
    other = InternalService(procs, 'svc-c')
    role = json.loads(dep.cmg_site('mapping', 'add', '--type', 'mp', '--url', other.url,
                                   '--auth', 'cert,token', '--json').stdout)['role']
    path = f'/CCM_Proxy_ServerAuth/{role}/whoami'
    r = poll(lambda: (lambda r: r if r.status != 404 else None)(
        curl(dep.site, path, '-H', f'Authorization: Bearer {idp.token()}', cert=False)),
        5 * SLOW, 'the new mapping')
    assert r.status == 403 and b'CMGService_Auth_Mode_Not_Allowed' in r.body, r


def mtls(dep, crt, key, rest='policy.xml', *args):
    return curl(dep.site, dep.site.path(rest), *args, cert=(crt, key))


def test_revoked_certificate_refused_when_checking_is_on(dep, svc, tmp_path):
    out = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-1', '--json').stdout)
    crt, key = out['cert'], out['key']
    assert mtls(dep, crt, key).status == 200
    v = dep.policy_version()
    dep.cmg_site('cert', 'check-revocation', 'on')
    dep.wait_policy(after=v)
    assert mtls(dep, crt, key).status == 200          # on, but not revoked
    dep.cmg_site('cert', 'revoke', '--device', 'lab-1')
    r = poll(lambda: (lambda r: r if r.status == 403 else None)(mtls(dep, crt, key)), 5 * SLOW,
             'the revoked certificate to be refused')
    assert b'CMGService_Client_Certificate_Revoked' in r.body
    before = svc.count
    assert mtls(dep, crt, key).status == 403
    assert svc.count == before
    assert mtls(dep, dep.site.device_cert, dep.site.device_key).status == 200  # others unaffected
    dep.cmg_site('cert', 'check-revocation', 'off')
    poll(lambda: mtls(dep, crt, key).status == 200, 5 * SLOW, 'checking off: accepted again')
    listed = json.loads(dep.cmg_site('cert', 'list', '--revoked', '--json').stdout)
    assert [c['serial'] for c in listed] == [out['serial']]


def test_rsa_1024_client_certificate_refused(dep, tmp_path, svc):
    ca_key = serialization.load_pem_private_key((dep.site.dir / 'ca.key').read_bytes(), None)
    ca = x509.load_pem_x509_certificate((dep.site.dir / 'ca.crt').read_bytes())
    now = __import__('datetime').datetime.now(__import__('datetime').timezone.utc)
    day = __import__('datetime').timedelta(days=1)

    def issue(bits, name):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - day)
                .not_valid_after(now + day)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        crt, k = Path(tmp_path) / f'{name}.crt', Path(tmp_path) / f'{name}.key'
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return crt, k
    before = svc.count
    # curl (OpenSSL at level 2) would not even present a 1024-bit key: Python at level 0 does.
    crt, key = issue(1024, 'weak')
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    ctx.set_ciphers('DEFAULT:@SECLEVEL=0')
    ctx.load_cert_chain(str(crt), str(key))
    conn = http.client.HTTPSConnection(dep.site.name, dep.site.port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(socket.create_connection(('127.0.0.1', dep.site.port)),
                                server_hostname=dep.site.name)
    conn.request('GET', dep.site.path('policy.xml'))
    r = conn.getresponse()
    body = r.read()
    conn.close()
    assert r.status == 401 and b'CMGService_Invalid_Client_Certificate' in body, (r.status, body)
    assert svc.count == before
    assert mtls(dep, *issue(2048, 'strong')).status == 200


def test_revoke_by_serial_as_openssl_prints_it(dep, tmp_path):
    import subprocess
    out = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-2', '--json').stdout)
    printed = subprocess.run(['openssl', 'x509', '-noout', '-serial', '-in', out['cert']],
                             capture_output=True, text=True).stdout.strip()   # serial=HEX
    assert printed.lower().startswith('serial=')
    dep.cmg_site('cert', 'revocation', 'on')
    dep.cmg_site('cert', 'revoke', printed.split('=', 1)[1].lower())
    r = poll(lambda: (lambda r: r if r.status == 403 else None)(mtls(dep, out['cert'], out['key'])),
             5 * SLOW, 'the revoked certificate to be refused')
    assert b'CMGService_Client_Certificate_Revoked' in r.body
    again = dep.cmg_site('cert', 'revoke', '--cert', out['cert'], check=False)
    assert again.returncode != 0 and 'already' in again.stderr


def test_oidc_jwks_of_one_key_without_kid(dep, tmp_path):
    from sitetest import public_jwk, sign_jwt
    idp = IdP(tmp_path)
    jwk = public_jwk(idp.ec, 'x')
    del jwk['kid']
    jwks = tmp_path / 'one.json'
    jwks.write_text(json.dumps({'keys': [jwk]}))
    v = dep.policy_version()
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', jwks)
    dep.wait_policy(after=v)
    assert bearer(dep, sign_jwt(idp.ec, idp.claims())).status == 200
    assert bearer(dep, sign_jwt(idp.ec, idp.claims(), kid='whatever')).status == 200
    assert bearer(dep, sign_jwt(idp.rsa, idp.claims(), kid='whatever')).status == 401
