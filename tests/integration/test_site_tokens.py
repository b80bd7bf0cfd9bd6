"""Site-issued tokens through the gateway: bulk registration token -> registration ->
device token bound to the device's own certificate; every way a token can be wrong is
refused at the gateway, and the internal service sees none of those requests."""
import json
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cmgtest import SLOW, curl, poll
from sitetest import Deployment, Device, jwt_claims, sign_jwt, unb64u


@pytest.fixture
def dep(procs, tmp_path, svc):
    return Deployment(procs, tmp_path, svc)


def site_key(dep):
    return serialization.load_pem_private_key((dep.site.dir / 'site-signing.key').read_bytes(), None)


def forged(dep, device, key=None, alg=None, header_extra=None, **over):
    """A device token like the site's, with claims changed, signed with key (default: the
    site's own key, so only the changed claims are wrong)."""
    real = jwt_claims(device.token)
    real.update(over)
    claims = {k: v for k, v in real.items() if v is not None}
    kid = json.loads(unb64u(device.token.split('.')[0]))['kid']
    return sign_jwt(key or site_key(dep), claims, alg=alg, kid=kid, header_extra=header_extra)


def test_register_with_bulk_token_then_device_token_works(dep, tmp_path):
    guid, bulk = dep.bulk_token()
    claims = jwt_claims(bulk)
    assert claims['jti'] == guid and claims['cmg_use'] == 'bulk'
    assert 3 * 86400 - 60 <= claims['exp'] - claims['iat'] <= 3 * 86400
    dev = Device(tmp_path, 'laptop-1')
    dep.register(dev, bulk)
    c = jwt_claims(dev.token)
    assert c['sub'] == dev.device_id and c['aud'] == dep.site.name
    assert 89 * 86400 < c['exp'] - c['iat'] <= 90 * 86400
    assert c['cnf']['x5t#S256']
    r = dep.get(dev, dep.token_path('policy.xml'))
    assert r.status == 200, r
    # The internal service is told who it is, and a spoofed identity is dropped.
    r = curl(dep.site, dep.token_path('echo-headers'), '-H', f'Authorization: Bearer {dev.token}',
             '-H', 'CMG-Client-Device-Id: GUID:spoofed', '-H', 'CMG-Client-Auth: cert',
             cert=dev.cert)
    assert r.status == 200, r
    headers = {k.lower(): v for k, v in json.loads(r.body)['headers']}
    assert headers['cmg-client-device-id'] == dev.device_id
    assert headers['cmg-client-auth'] == 'site-token'
    # The device appears in the registry.
    listed = json.loads(dep.cmg_site('device', 'list', '--json').stdout)
    assert [d['id'] for d in listed] == [dev.device_id]


def test_renewal_gives_a_new_working_token(dep, tmp_path):
    _, bulk = dep.bulk_token()
    dev = Device(tmp_path, 'renewer')
    dep.register(dev, bulk)
    old = dev.token
    time.sleep(1.1)                  # iat is in seconds
    r = curl(dep.site, dep.reg_path('renew'), '-X', 'POST', '-H', f'Authorization: Bearer {old}',
             '--data', '{}', cert=dev.cert)
    assert r.status == 200, r
    doc = json.loads(r.body)
    assert doc['device_id'] == dev.device_id and doc['token'] != old
    assert dep.get(dev, token=doc['token']).status == 200


def test_device_token_is_bound_to_its_certificate(dep, tmp_path, svc):
    _, bulk = dep.bulk_token()
    dev, thief = Device(tmp_path, 'owner'), Device(tmp_path, 'thief')
    dep.register(dev, bulk)
    before = svc.count
    r = dep.get(dev, cert=thief.cert)
    assert r.status == 401 and b'CMGService_Token_Certificate_Mismatch' in r.body, r
    r = dep.get(dev, cert=False)
    assert r.status == 401, r
    r = dep.get(dev, cert=True)      # the site's sample PKI device certificate
    assert r.status == 401, r
    for cert in (thief.cert, True, False):     # the same over HTTP/2
        r = curl(dep.site, dep.token_path(), '-H', f'Authorization: Bearer {dev.token}',
                 http='2', cert=cert)
        assert r.status == 401 and r.rc == 0 and r.version == '2', r
    assert svc.count == before


@pytest.mark.parametrize('case', ['expired', 'wrong_key', 'alg_none', 'hs256_public_key',
                                  'wrong_aud', 'wrong_iss', 'no_token', 'garbage'])
def test_bad_tokens_are_refused(dep, tmp_path, svc, case):
    _, bulk = dep.bulk_token()
    dev = Device(tmp_path, 'victim')
    dep.register(dev, bulk)
    now = int(time.time())
    pub = (dep.site.dir / 'site-signing.pub').read_bytes()
    token = {
        'expired': lambda: forged(dep, dev, exp=now - 3600, iat=now - 7200),
        'wrong_key': lambda: forged(dep, dev, key=ec.generate_private_key(ec.SECP256R1())),
        'alg_none': lambda: forged(dep, dev, key=b'', alg='none'),
        'hs256_public_key': lambda: forged(dep, dev, key=pub, alg='HS256'),
        'wrong_aud': lambda: forged(dep, dev, aud='other.example.test'),
        'wrong_iss': lambda: forged(dep, dev, iss='opencmg-site:123'),
        'no_token': lambda: '',
        'garbage': lambda: 'eyJhbGciOiJFUzI1NiJ9.e30.AAAA',
    }[case]()
    before = svc.count
    r = curl(dep.site, dep.token_path(), *(['-H', f'Authorization: Bearer {token}'] if token else []),
             cert=dev.cert)
    assert r.status == 401 and b'CMGService_' in r.body, r
    assert svc.count == before


def test_bulk_token_only_registers(dep, tmp_path, svc):
    _, bulk = dep.bulk_token()
    dev = Device(tmp_path, 'sneaky')
    before = svc.count
    r = curl(dep.site, dep.token_path(), '-H', f'Authorization: Bearer {bulk}', cert=dev.cert)
    assert r.status == 403 and b'CMGService_Bulk_Token_Registration_Only' in r.body, r
    r = curl(dep.site, dep.reg_path('renew'), '-X', 'POST', '-H', f'Authorization: Bearer {bulk}',
             cert=dev.cert)
    assert r.status == 403, r
    assert svc.count == before


def test_blocked_bulk_token_and_blocked_device_within_5s(dep, tmp_path, svc):
    guid, bulk = dep.bulk_token()
    dev = Device(tmp_path, 'soon-blocked')
    dep.register(dev, bulk)
    assert dep.get(dev).status == 200

    dep.cmg_site('token', 'bulk', 'block', guid)
    r = poll(lambda: (lambda r: r if r.status == 403 else None)(
        curl(dep.site, dep.reg_path(), '-X', 'POST', '-H', f'Authorization: Bearer {bulk}',
             '--data', '{}', cert=Device(tmp_path, f'late-{uuid.uuid4().hex[:6]}').cert)),
        5 * SLOW, 'the blocked bulk token to be refused')
    assert b'CMGService_Token_Blocked' in r.body
    listed = json.loads(dep.cmg_site('token', 'bulk', 'list', '--json').stdout)
    assert [(t['guid'], t['blocked']) for t in listed] == [(guid, 1)]
    assert 'token' not in listed[0]

    dep.cmg_site('device', 'block', dev.device_id)
    r = poll(lambda: (lambda r: r if r.status == 403 else None)(dep.get(dev)), 5 * SLOW,
             'the blocked device to be refused')
    assert b'CMGService_Device_Blocked' in r.body
    before = svc.count
    assert dep.get(dev).status == 403
    assert svc.count == before

    dep.cmg_site('device', 'unblock', dev.device_id)
    poll(lambda: dep.get(dev).status == 200, 5 * SLOW, 'the unblocked device to get through')


def test_bulk_token_lifetime_limits(dep):
    assert dep.cmg_site('token', 'bulk', 'create', '--lifetime', '8d', check=False).returncode != 0
    guid, tok = dep.bulk_token('7d')
    c = jwt_claims(tok)
    assert c['exp'] - c['iat'] == 7 * 86400
    guid, tok = dep.bulk_token('2h')
    c = jwt_claims(tok)
    assert c['exp'] - c['iat'] == 7200


def register_many(dep, devices, bulk, results):
    def one(dev):
        r = curl(dep.site, dep.reg_path(), '-X', 'POST', '-H', f'Authorization: Bearer {bulk}',
                 '--data', json.dumps({'name': dev.name}), cert=dev.cert, timeout=60)
        results[dev.name] = r
    threads = [threading.Thread(target=one, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    return threads


def test_fifty_devices_register_at_once(dep, tmp_path):
    _, bulk = dep.bulk_token()
    devices = [Device(tmp_path, f'dev-{i:02d}') for i in range(50)]
    results = {}
    for t in register_many(dep, devices, bulk, results):
        t.join()
    assert all(r.status == 200 for r in results.values()), [r for r in results.values() if r.status != 200][:3]
    docs = {name: json.loads(r.body) for name, r in results.items()}
    assert len({d['token'] for d in docs.values()}) == 50
    assert len({d['device_id'] for d in docs.values()}) == 50
    for dev in devices[:10]:
        dev.token = docs[dev.name]['token']
        assert dep.get(dev).status == 200
    listed = json.loads(dep.cmg_site('device', 'list', '--json').stdout)
    assert {d['id'] for d in listed} == {d['device_id'] for d in docs.values()}


def test_site_killed_mid_registration_leaves_a_consistent_store(dep, tmp_path):
    _, bulk = dep.bulk_token()
    devices = [Device(tmp_path, f'k-{i:02d}') for i in range(50)]
    results = {}
    threads = register_many(dep, devices, bulk, results)
    time.sleep(0.15)
    dep.site_proc.signal(signal.SIGKILL)
    for t in threads:
        t.join()
    handed_out = {json.loads(r.body)['device_id'] for r in results.values() if r.status == 200}
    refused = [r for r in results.values() if r.status != 200]
    assert all(r.status in (502, 503, 504) or r.rc != 0 for r in refused), refused[:3]
    listed = json.loads(dep.cmg_site('device', 'list', '--json').stdout)
    stored = {d['id']: d for d in listed}
    # Every token handed out belongs to a device on disk, with its token recorded.
    assert handed_out <= set(stored), handed_out - set(stored)
    assert all(stored[i]['token_expires'] for i in handed_out)
    # The site comes back and the rest can register.
    dep.start_site()
    late = [d for d in devices if d.name not in {n for n, r in results.items() if r.status == 200}]
    for dev in late[:5]:
        poll(lambda: dep.register(dev, bulk, expect=None).status == 200, 10 * SLOW,
             'registration after the site restarted')


def test_block_applies_to_a_kept_alive_connection(dep, tmp_path):
    """The gateway keeps a token's verdict per connection; a new policy voids it."""
    from cmgtest import DeviceConnection
    _, bulk = dep.bulk_token()
    dev = Device(tmp_path, 'kept-alive')
    dep.register(dev, bulk)
    conn = DeviceConnection(dep.site, cert=dev.crt, key=dev.key)
    auth = {'Authorization': f'Bearer {dev.token}'}

    def status():
        conn.request('GET', dep.token_path(), headers=auth)
        r = conn.getresponse()
        r.read()
        return r.status
    try:
        assert [status() for _ in range(3)] == [200] * 3
        sock = conn.sock
        dep.cmg_site('device', 'block', dev.device_id)
        poll(lambda: status() == 403, 5 * SLOW, 'the block on the same connection')
        assert conn.sock is sock, 'the connection should have stayed open'
    finally:
        conn.close()
