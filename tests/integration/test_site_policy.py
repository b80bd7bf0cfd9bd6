"""The signed gateway policy: published by `cmg site serve`, carried by the connector,
verified and applied by the gateway without dropping anything in flight, refused when
signed by another key or older than the one in force, cached for restarts."""
import json
import shutil
import signal

import pytest

from cmgtest import (CMG, SLOW, CurlProcess, alone_gateway, curl, ini_set, poll, run_cmg, start_connector,
                     start_gateway)
from sitetest import Deployment


@pytest.fixture
def dep(procs, tmp_path, svc):
    return Deployment(procs, tmp_path, svc)


def status_within(dep, path, want, timeout=5):
    return poll(lambda: (lambda r: r if r.status == want else None)(curl(dep.site, path)),
                timeout * SLOW, f'{path} to answer {want}', check=dep.procs.check)


def test_policy_reaches_the_gateway(dep):
    v = dep.policy_version()
    log = dep.gateway[0].log_text()
    assert f'policy version {v} in force' in log
    listed = json.loads(dep.cmg_site('mapping', 'list', '--json').stdout)
    roles = {m['role']: m for m in listed}
    assert roles[dep.site_role]['type'] == 'site'
    assert roles[dep.site.role_ids[0]]['type'] == 'mp'
    assert curl(dep.site, dep.site.path('policy.xml')).status == 200


def test_mapping_remove_and_add_without_dropping_a_download(dep, svc):
    role, path = dep.site.role_ids[0], dep.site.path('policy.xml')
    size = 48 << 20
    dl = CurlProcess(dep.site, dep.site.path(f'download?size={size}&seed=3'), '--limit-rate', '12M')
    try:
        poll(lambda: dl.received > 0, 10 * SLOW, 'the download to start')
        dep.cmg_site('mapping', 'remove', role)
        r = status_within(dep, path, 404)
        assert b'CMGService_No_Mapping' in r.body
        dep.cmg_site('mapping', 'add', '--role', role, '--type', 'mp', '--url', svc.url,
                     '--auth', 'cert,token,oidc')
        status_within(dep, path, 200)
        assert dl.alive(), 'the download should still be running (slow it down?)'
        result = dl.wait(timeout=60 * SLOW)
    finally:
        dl.kill()
    from internal_service import stream_sha256
    assert result.rc == 0 and result.status == 200, result
    assert dl.received == size and dl.sha256 == stream_sha256(size, 3)
    assert 'tunnel down' not in dep.gateway[0].log_text()


def test_a_new_mapping_to_a_new_service_is_served(dep, procs):
    from cmgtest import InternalService
    other = InternalService(procs, 'svc-b')
    out = dep.cmg_site('mapping', 'add', '--type', 'mp', '--url', other.url, '--json').stdout
    role = json.loads(out)['role']
    r = poll(lambda: (lambda r: r if r.status == 200 else None)(
        curl(dep.site, f'/CCM_Proxy_MutualAuth/{role}/whoami')), 5 * SLOW, 'the new mapping')
    assert r.body == b'svc-b'


def test_policy_of_another_site_or_older_is_refused(dep, procs, tmp_path, svc):
    """(a) A second connector carries an older policy of this site: the gateway refuses
    it, says why, and keeps its policy. (b) A connector pointed at another site (its
    CA trusted, its feed reached with its connector certificate) refuses that site's
    policy itself: it does not verify with this site's key, so no gateway sees it."""
    v = dep.policy_version()
    # (b) an older copy of this site: same keys, lower version.
    old = tmp_path / 'old-site'
    shutil.copytree(dep.site.dir, old)
    for name in ('site.db-wal', 'site.db-shm'):
        (old / name).unlink(missing_ok=True)
    dep.cmg_site('mapping', 'remove', dep.site.role_ids[0])
    v2 = dep.wait_policy(after=v)
    # Make the copy's store older than what it was copied at: it is, since it was copied
    # before the removal; but serve it on other ports.
    from cmgtest import free_port
    feed_old = free_port()
    (old / 'site.conf').write_text((old / 'site.conf').read_text().replace(
        f'127.0.0.1:{dep.admin_port}', f'127.0.0.1:{free_port()}').replace(
        f'127.0.0.1:{dep.service_port}', f'127.0.0.1:{free_port()}').replace(
        f'127.0.0.1:{dep.feed_port}', f'127.0.0.1:{feed_old}'))
    procs.start('site-old', [CMG, 'site', 'serve', old])
    conf = dep.site.connector_copy('connector-old', [svc.url])
    ini_set(conf, 'connector', 'site', f'https://127.0.0.1:{feed_old}')
    start_connector(procs, conf, 'connector-old')
    poll(lambda: 'is older than version' in dep.gateway[0].log_text(), 10 * SLOW,
         'the gateway to refuse the older policy', check=procs.check)

    # (a) another site altogether: its own signing key.
    other = tmp_path / 'other-site'
    feed_other = free_port()
    r = run_cmg('site', 'init', other, '--service-name', dep.site.name, '--mp', svc.url,
                '--site-admin', f'127.0.0.1:{free_port()}', '--site-feed', f'127.0.0.1:{feed_other}',
                '--site-service', f'127.0.0.1:{free_port()}')
    assert r.returncode == 0, r.stderr
    for _ in range(5):               # a higher version than ours
        run_cmg('site', 'cert', 'check-revocation', 'off', '--site', other)
    procs.start('site-other', [CMG, 'site', 'serve', other])
    conf = dep.site.connector_copy('connector-other', [svc.url])
    ini_set(conf, 'connector', 'site', f'https://127.0.0.1:{feed_other}')
    ini_set(conf, 'connector', 'site_ca', other / 'ca.crt')
    ini_set(conf, 'connector', 'cert', other / 'connector.crt')
    ini_set(conf, 'connector', 'key', other / 'connector.key')
    other_cn = start_connector(procs, conf, 'connector-other')
    poll(lambda: 'signature does not verify' in other_cn.log_text(), 10 * SLOW,
         'the connector to refuse the foreign policy', check=procs.check)
    # Still the policy in force: the removed mapping stays removed.
    assert curl(dep.site, dep.site.path('policy.xml')).status == 404
    assert f'policy version {v2} in force' in dep.gateway[0].log_text()


def test_gateway_restart_with_site_stopped_uses_cached_policy(dep, procs):
    v0 = dep.policy_version()
    dep.cmg_site('mapping', 'remove', dep.site.role_ids[0])
    v = dep.wait_policy(after=v0)
    assert curl(dep.site, dep.site.path('policy.xml')).status == 404
    dep.site_proc.signal(signal.SIGTERM)
    dep.connector.signal(signal.SIGTERM)
    dep.gateway[0].signal(signal.SIGTERM)
    alone_gateway(dep.site)              # no connector: it answers devices from the cache alone
    gw = start_gateway(procs, dep.site)
    assert f'policy version {v} in force (from cache)' in gw.log_text()
    # The removed mapping stays removed (gateway.conf still lists it), before any connector.
    assert curl(dep.site, dep.site.path('policy.xml')).status == 404
    reg = curl(dep.site, f'/CCM_Proxy_ServerAuth/{dep.site_role}/register', '-X', 'POST')
    assert reg.status in (401, 503), reg      # published (by the cached policy), not 404


def test_admin_api_needs_the_admin_token(dep):
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as e:
        dep.api('GET', '/v1/status', token='wrong')
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:     # the feed is not on the admin API
        dep.api('GET', '/v1/connector/feed?after=0', token='wrong')
    assert e.value.code == 401
    doc = dep.api('POST', '/v1/ops/mapping.list', {})
    assert {m['role'] for m in doc} >= {dep.site_role}


def test_admin_commands_through_the_api(dep, tmp_path):
    api = ['--api', f'https://127.0.0.1:{dep.admin_port}', '--ca', dep.site.ca]
    r = run_cmg('site', 'mapping', 'list', '--json', *api, '--admin-token',
                dep.site.dir / 'admin.token', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert dep.site_role in {m['role'] for m in json.loads(r.stdout)}
    r = run_cmg('site', 'mapping', 'remove', dep.site.role_ids[0], *api, '--admin-token',
                dep.site.dir / 'admin.token', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    status_within(dep, dep.site.path('policy.xml'), 404)
    bad = tmp_path / 'bad.token'
    bad.write_text('nope\n')
    r = run_cmg('site', 'mapping', 'list', *api, '--admin-token', bad, cwd=tmp_path)
    assert r.returncode == 1 and '401' in r.stderr, r
