"""Revocation that works by default: the site publishes a fresh CRL and gateways check it
unless told not to; a gateway whose clock is 60 s behind the site still accepts the CRL
(its thisUpdate is in the gateway's future), so `cert revoke` and `device block` work and
nothing else is refused; a CRL the gateway cannot use answers CMGService_CRL_Unavailable
and warns; every certificate the site issued can be revoked; `device block` applies to
certificate devices (by name or thumbprint) and to OIDC identities."""
import base64
import glob
import json
import ssl
import urllib.request

from cryptography import x509

import cmgtest
from cmgtest import CMG, SLOW, curl, poll
from sitetest import Deployment, Device, IdP

# libfaketime (Debian package faketime), wherever the multiarch directory puts it
FAKETIME_LIB = next(iter(sorted(glob.glob('/usr/lib/*/faketime/libfaketime.so.1'))), None)


def start_gateway_at(procs, site, offset):
    """The gateway with its wall clock moved by `offset` (libfaketime: '-60s', '+8d');
    its timers (monotonic clock) keep real time."""
    assert FAKETIME_LIB, 'libfaketime is missing (Debian package faketime)'
    env = {'LD_PRELOAD': FAKETIME_LIB, 'FAKETIME': offset, 'FAKETIME_DONT_FAKE_MONOTONIC': '1',
           'FAKETIME_NO_CACHE': '1',
           'ASAN_OPTIONS': 'detect_leaks=1:abort_on_error=0:verify_asan_link_order=0'}
    proc = procs.start('gateway', [CMG, 'gateway', '-c', site.gateway_conf], env=env)
    poll(lambda: 'listening for connectors on' in proc.log_text(), 10 * SLOW,
         'the gateway to listen for connectors', check=procs.check)
    return proc


def deployment(procs, tmp_path, svc, offset=None):
    """A deployment whose gateway runs `offset` away from the site's clock."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    dep.start_site()
    dep.gateway = [start_gateway_at(procs, dep.site, offset) if offset
                   else cmgtest.start_gateway(procs, dep.site)]
    dep.connector = cmgtest.start_connector(procs, dep.site.connector_conf)
    cmgtest.wait_ready(procs, dep.site)
    dep.wait_policy()
    return dep


def mtls(dep, cert, rest='policy.xml'):
    return curl(dep.site, dep.site.path(rest), cert=cert)


def status_becomes(fn, status, what):
    return poll(lambda: (lambda r: r if r.status == status else None)(fn()), 5 * SLOW, what)


def policy_payload(dep):
    """The payload of the signed policy the site publishes (GET /v1/policy)."""
    req = urllib.request.Request(f'https://127.0.0.1:{dep.admin_port}/v1/policy')
    req.add_header('Authorization', f'Bearer {dep.admin_token}')
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        jws = r.read().decode()
    part = jws.split('.')[1]
    return json.loads(base64.urlsafe_b64decode(part + '=' * (-len(part) % 4)))


def test_checking_is_on_by_default_and_the_crl_is_fresh(procs, tmp_path, svc):
    dep = deployment(procs, tmp_path, svc)
    assert 'checking: on' in dep.cmg_site('cert', 'check-revocation').stdout
    policy = policy_payload(dep)
    assert policy['check_revocation'] is True
    crl = x509.load_pem_x509_crl(policy['crl'].encode())
    assert (crl.next_update - crl.last_update).days >= 2
    assert 'revocation check on' in dep.gateway[0].log_text()


def test_gateway_60s_behind_the_site(procs, tmp_path, svc):
    dep = deployment(procs, tmp_path, svc, offset='-60s')
    sample = (dep.site.device_cert, dep.site.device_key)
    issued = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-1', '--json').stdout)
    lab = (issued['cert'], issued['key'])
    device = Device(tmp_path, 'dev-skew')
    _, bulk = dep.bulk_token()
    assert dep.register(device, bulk).status == 200
    assert mtls(dep, sample).status == 200
    assert mtls(dep, lab).status == 200
    assert dep.get(device).status == 200

    v = dep.policy_version()
    dep.cmg_site('cert', 'revoke', '--device', 'lab-1')
    dep.wait_policy(after=v)           # a CRL signed 60 s in the gateway's future
    r = mtls(dep, lab)
    assert r.status == 403 and b'CMGService_Client_Certificate_Revoked' in r.body, r
    before = svc.count
    assert mtls(dep, sample).status == 200     # nothing else refused
    assert dep.get(device).status == 200
    assert svc.count == before + 2

    v = dep.policy_version()
    dep.cmg_site('device', 'block', device.device_id)
    dep.wait_policy(after=v)
    r = dep.get(device)
    assert r.status == 403 and b'CMGService_Device_Blocked' in r.body, r
    assert mtls(dep, sample).status == 200
    log = dep.gateway[0].log_text()
    assert 'CRL' not in log and 'CMGService_CRL_Unavailable' not in log, log


def test_a_crl_past_its_next_update_is_unavailable(procs, tmp_path, svc):
    # The site's CRL is good for days; a gateway 8 days ahead sees it expired.
    dep = deployment(procs, tmp_path, svc, offset='+8d')
    before = svc.count
    r = mtls(dep, (dep.site.device_cert, dep.site.device_key))
    assert r.status == 401 and b'CMGService_CRL_Unavailable' in r.body, r
    assert svc.count == before
    log = dep.gateway[0].log_text()
    assert 'warn' in log and 'CRL' in log and 'expired' in log, log
    # it is the CRL: without checking the same certificate gets through
    v = dep.policy_version()
    dep.cmg_site('cert', 'check-revocation', 'off')
    dep.wait_policy(after=v)
    assert mtls(dep, (dep.site.device_cert, dep.site.device_key)).status == 200


def test_revoke_with_checking_off_says_it_has_no_effect(procs, tmp_path, svc):
    dep = deployment(procs, tmp_path, svc)
    issued = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-2', '--json').stdout)
    dep.cmg_site('cert', 'check-revocation', 'off')
    out = dep.cmg_site('cert', 'revoke', '--device', 'lab-2').stdout
    assert 'no effect until' in out and 'check-revocation on' in out, out
    dep.cmg_site('cert', 'check-revocation', 'on')
    status_becomes(lambda: mtls(dep, (issued['cert'], issued['key'])), 403,
                   'the revocation to take effect once checking is on')
    out = dep.cmg_site('cert', 'issue', '--device', 'lab-3').stdout
    out = dep.cmg_site('cert', 'revoke', '--device', 'lab-3').stdout
    assert 'no effect' not in out, out


def test_every_certificate_the_site_issued_can_be_revoked(procs, tmp_path, svc):
    dep = deployment(procs, tmp_path, svc)
    site = dep.site.dir
    serials = set()

    def revoke(*args):
        out = json.loads(dep.cmg_site('cert', 'revoke', *args, '--json').stdout)
        serials.add(int(out['revoked'], 16))

    revoke('--cert', site / 'gateway.crt')
    revoke('--device', 'device1')
    status_becomes(lambda: mtls(dep, (dep.site.device_cert, dep.site.device_key)), 403,
                   'the sample device certificate to be refused')
    # the connector's last: it revokes connector-1, the only one carrying the policy
    revoke('--cert', site / 'connector.crt')
    assert len(serials) == 3
    listed = json.loads(dep.cmg_site('connector', 'list', '--json').stdout)
    assert [c['revoked'] is not None for c in listed] == [True], listed
    def crl_serials():
        return {r.serial_number
                for r in x509.load_pem_x509_crl(policy_payload(dep)['crl'].encode())}
    poll(lambda: crl_serials() == serials, 5 * SLOW, 'the published CRL to list all three')
    listed = json.loads(dep.cmg_site('cert', 'list', '--revoked', '--json').stdout)
    assert {int(c['serial'], 16) for c in listed} == serials
    # a certificate of another CA is not this site's to revoke
    _, _, (other, _) = cmgtest.make_cert(tmp_path / 'other', 'other')
    r = dep.cmg_site('cert', 'revoke', '--cert', other, check=False)
    assert r.returncode != 0 and 'no certificate' in r.stderr, r


def test_device_block_applies_to_certificate_and_oidc_devices(procs, tmp_path, svc):
    dep = deployment(procs, tmp_path, svc)
    sample = (dep.site.device_cert, dep.site.device_key)
    issued = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-4', '--json').stdout)
    lab = (issued['cert'], issued['key'])
    idp = IdP(tmp_path)
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', idp.jwks)

    def oidc(token):
        return curl(dep.site, dep.token_path('policy.xml'), '-H', f'Authorization: Bearer {token}',
                    cert=False)
    status_becomes(lambda: oidc(idp.token()), 200, 'OIDC tokens to be accepted')

    for ident, fn in ((dep.site.device_thumbprint().upper(), lambda: mtls(dep, sample)),
                      ('lab-4', lambda: mtls(dep, lab)),
                      ('oidc:alice@example.test', lambda: oidc(idp.token()))):
        dep.cmg_site('device', 'block', ident)
        r = status_becomes(fn, 403, f'{ident} to be blocked')
        assert b'CMGService_Device_Blocked' in r.body, r
    before = svc.count
    assert oidc(idp.token(upn='bob@example.test', oid='object-id-2')).status == 200
    assert svc.count == before + 1
    dep.cmg_site('device', 'unblock', 'lab-4')
    status_becomes(lambda: mtls(dep, lab), 200, 'lab-4 to be accepted again')
    r = dep.cmg_site('device', 'block', 'nobody-of-that-name', check=False)
    assert r.returncode != 0 and 'thumbprint' in r.stderr, r


def test_the_store_is_readable_by_its_owner_only(procs, tmp_path, svc):
    # what was revoked and who is blocked: site.db and its WAL files, mode 0600
    dep = deployment(procs, tmp_path, svc)
    dep.cmg_site('device', 'block', 'oidc:someone')     # a write, while the site serves
    files = [dep.site.dir / name for name in ('site.db', 'site.db-wal', 'site.db-shm')]
    assert all(f.exists() for f in files), files
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {'0o600'}
    # a store made before the rule is narrowed when it is next opened
    for f in files:
        f.chmod(0o644)
    dep.cmg_site('device', 'unblock', 'oidc:someone')
    assert {oct(f.stat().st_mode & 0o777) for f in files if f.exists()} == {'0o600'}
