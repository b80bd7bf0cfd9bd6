"""`cmg client` against a whole deployment: register with a bulk token, fetch with the
device token, renew, and what the device is told when the site blocks it."""
import json
import os
import subprocess

import pytest

from cmgtest import CMG, SLOW, poll
from internal_service import POLICY
from sitetest import Deployment, jwt_claims


@pytest.fixture
def dep(procs, tmp_path, svc, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path))     # register records its state dir there
    return Deployment(procs, tmp_path, svc)


def client(*args, env=None, timeout=60):
    return subprocess.run([CMG, 'client', *map(str, args)], capture_output=True,
                          timeout=timeout * SLOW, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, **(env or {})))


def register(dep, state, bulk, *extra):
    return client('register', '--gateway', f'127.0.0.1:{dep.site.port}', '--server-name',
                  dep.site.name, '--ca', dep.site.ca, '--bulk-token', bulk, '--state', state,
                  *extra)


def test_register_get_renew(dep, tmp_path, svc):
    _, bulk = dep.bulk_token()
    state = tmp_path / 'state'
    r = register(dep, state, bulk, '--name', 'kiosk-7')
    assert r.returncode == 0, r.stderr
    assert b'registered as device GUID:' in r.stdout
    assert bulk.encode() not in r.stdout + r.stderr        # tokens are never printed
    assert oct(state.stat().st_mode & 0o777) == '0o700'
    assert oct((state / 'device.key').stat().st_mode & 0o777) == '0o600'
    doc = json.loads((state / 'device.json').read_text())
    devices = json.loads(dep.cmg_site('device', 'list', '--json').stdout)
    assert [(d['id'], d['name']) for d in devices] == [(doc['device_id'], 'kiosk-7')]

    r = client('get', dep.token_path('policy.xml'), '--state', state)
    assert r.returncode == 0, r.stderr
    assert r.stdout == POLICY
    r = client('get', dep.token_path('echo-headers'), '--state', state)
    headers = {k.lower(): v for k, v in json.loads(r.stdout)['headers']}
    assert headers['cmg-client-auth'] == 'site-token'
    assert headers['cmg-client-device-id'] == doc['device_id']

    old = doc['token']
    r = client('renew', '--state', state)
    assert r.returncode == 0, r.stderr
    new = json.loads((state / 'device.json').read_text())['token']
    assert new != old and jwt_claims(new)['sub'] == doc['device_id']
    assert client('get', dep.token_path('policy.xml'), '--state', state).stdout == POLICY


def test_state_dir_of_the_last_registration(dep, tmp_path):
    _, bulk = dep.bulk_token()
    state = tmp_path / 'remembered'
    assert register(dep, state, bulk).returncode == 0
    assert (tmp_path / '.config/opencmg/client-state').read_text().strip() == str(state)
    r = client('get', dep.token_path('policy.xml'))
    assert r.returncode == 0 and r.stdout == POLICY, r.stderr


def test_state_dir_from_environment(dep, tmp_path):
    _, bulk = dep.bulk_token()
    state = tmp_path / 'env-state'
    assert register(dep, state, bulk).returncode == 0
    r = client('get', dep.token_path('policy.xml'), env={'CMG_CLIENT_STATE': str(state)})
    assert r.returncode == 0 and r.stdout == POLICY, r.stderr


def test_blocked_device_is_told_why(dep, tmp_path, svc):
    _, bulk = dep.bulk_token()
    state = tmp_path / 'state'
    assert register(dep, state, bulk).returncode == 0
    device_id = json.loads((state / 'device.json').read_text())['device_id']
    dep.cmg_site('device', 'block', device_id)

    def refused():
        r = client('get', dep.token_path('policy.xml'), '--state', state)
        return r if r.returncode == 1 else None
    r = poll(refused, 5 * SLOW, 'the blocked device to be refused')
    assert b'403' in r.stderr and b'CMGService_Device_Blocked' in r.stderr, r.stderr


def test_bad_bulk_token_is_refused(dep, tmp_path):
    guid, bulk = dep.bulk_token()
    dep.cmg_site('token', 'bulk', 'block', guid)
    state = tmp_path / 'state'

    def refused():
        r = register(dep, state, bulk)
        return r if b'CMGService_Token_Blocked' in r.stderr else None
    r = poll(refused, 5 * SLOW, 'the blocked bulk token to be refused')
    assert r.returncode == 1
    r = register(dep, tmp_path / 's2', 'not-a-token')
    assert r.returncode in (1, 2) and r.stderr, r


def test_pki_device_without_registration(dep):
    r = client('get', dep.site.path('policy.xml'), '--gateway', f'127.0.0.1:{dep.site.port}',
               '--server-name', dep.site.name, '--ca', dep.site.ca, '--cert',
               dep.site.device_cert, '--key', dep.site.device_key)
    assert r.returncode == 0 and r.stdout == POLICY, r.stderr
