"""The site <-> connector channel: mutual TLS on its own listener, policy and routes signed
by the site key and cached by the connector, one certificate per connector (revocable),
the admin API over TLS on loopback, confined to the site directory, and the warning
when the policy in force grows older than max_policy_age."""
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cmgtest import (CMG, SLOW, InternalService, bring_up, curl, free_port, ini_set, make_cert,
                     poll, run_cmg, start_connector)
from sitetest import Deployment, sign_jwt, unb64u


@pytest.fixture
def dep(procs, tmp_path, svc):
    return Deployment(procs, tmp_path, svc)


def gateway_versions(dep):
    """Every policy version the gateway logged as in force, in order."""
    return [int(line.split('policy version ', 1)[1].split()[0])
            for line in dep.gateway[0].log_text().splitlines() if ' in force ' in line]


# ---------------------------------------------------------------- a fake site

class FakeSite:
    """A TLS server on the connector's `site =` address. It records what each connection
    sent (the request head, if the handshake got that far) and answers `answer`."""

    def __init__(self, port, cert, key, answer=None):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.answer = answer
        self.connections = 0     # accepted
        self.finished = 0        # handled to the end (handshake refused, or answered)
        self.requests = []
        self.sock = socket.create_server(('127.0.0.1', port))
        self.sock.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                raw, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            raw.settimeout(5)
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as tls:
                    head = b''
                    while b'\r\n\r\n' not in head:
                        chunk = tls.recv(4096)
                        if not chunk:
                            break
                        head += chunk
                    self.requests.append(head)
                    if self.answer is not None:
                        body = json.dumps(self.answer).encode()
                        tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n'
                                    b'Content-Length: %d\r\nConnection: close\r\n\r\n' % len(body)
                                    + body)
            except (OSError, ssl.SSLError):
                pass            # the connector refused our certificate, or hung up
            finally:
                raw.close()
                self.finished += 1

    def stop(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


def forged(dep, version, role_url, key=None, policy=None):
    """A feed document: a policy of `version` and routes sending every role to role_url,
    signed by `key` (another site's key), or `policy` as given (e.g. the real one)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = int(time.time())
    if policy is None:
        payload = {'version': version, 'iat': now, 'iss': 'x', 'service_name': dep.site.name,
                   'site_role': dep.site_role, 'mappings': [], 'ctl': [], 'site_keys': {'keys': []}}
        policy = sign_jwt(key, payload, header_extra={'typ': 'cmg-policy+jwt'})
    routes = {r: {'url': role_url, 'type': 'mp'} for r in dep.site.role_ids}
    routes_jws = sign_jwt(key, {'version': version, 'iat': now, 'routes': routes},
                          header_extra={'typ': 'cmg-routes+jwt'})
    return {'version': version, 'policy': policy, 'routes': routes_jws}


def tampered_policy(real, version):
    """The real signed policy with its payload's version changed, signature kept."""
    head, payload, sig = real.split('.')
    doc = json.loads(unb64u(payload))
    doc['version'] = version
    from sitetest import b64u
    return f'{head}.{b64u(json.dumps(doc))}.{sig}'


def test_a_fake_site_changes_nothing_and_learns_nothing(dep, procs, tmp_path):
    """Whoever answers on the connector's `site =` address: without a certificate of the
    site CA, with a certificate of the CA that is not the site's (the gateway's), or
    with the site's own certificate serving a forged or tampered policy and routes
    (version 9e18), changes neither routes nor policy, and receives no secret."""
    svc_fake = InternalService(procs, 'svc-fake')
    before = svc_fake.count
    real_policy = subprocess.run(
        ['curl', '-sS', '--cacert', dep.site.ca, '-H', f'Authorization: Bearer {dep.admin_token}',
         f'https://127.0.0.1:{dep.admin_port}/v1/policy'], capture_output=True, check=True).stdout.decode()
    version = dep.policy_version()
    dep.site_proc.signal(signal.SIGTERM)
    self_signed = make_cert(tmp_path / 'fake', 'OpenCMG site')[2]
    d = dep.site.dir
    cases = [
        ('no certificate of the site CA', self_signed, None, None),
        ("the gateway's certificate (same CA, not the site's)", (d / 'gateway.crt', d / 'gateway.key'),
         None, None),
        ("the site's certificate, a policy of another key at version 9e18",
         (d / 'site.crt', d / 'site.key'), forged(dep, 9e18, svc_fake.url), 'does not verify'),
        ("the site's certificate, the real policy tampered to version 9e18",
         (d / 'site.crt', d / 'site.key'),
         forged(dep, 9e18, svc_fake.url, policy=tampered_policy(real_policy, 9e18)), 'does not verify'),
        ("the site's certificate, the real policy with forged routes",
         (d / 'site.crt', d / 'site.key'), forged(dep, version, svc_fake.url, policy=real_policy),
         'routes: the signature does not verify'),
    ]
    connector, logs = dep.connector, []
    for i, (what, (crt, key), answer, refusal) in enumerate(cases):
        connector.signal(signal.SIGTERM)      # a fresh connector: no back-off left over
        fake = FakeSite(dep.feed_port, crt, key, answer)
        try:
            connector = start_connector(procs, dep.site.connector_conf, f'connector-{i}')
            if refusal:
                poll(lambda: refusal in connector.log_text(), 10 * SLOW,
                     f'the connector to refuse: {what}', check=procs.check)
            else:
                poll(lambda: fake.finished >= 1, 10 * SLOW, f'the connector to dial: {what}',
                     check=procs.check)
            assert 'from the cache' in connector.log_text()
        finally:
            fake.stop()
        logs.append(connector.log_text())
        if refusal:
            assert fake.requests, what
        else:
            assert not any(fake.requests), f'{what}: the connector sent a request'
        for head in fake.requests:
            assert b'authorization' not in head.lower(), f'{what}: a secret was sent: {head!r}'
        r = curl(dep.site, dep.site.path('policy.xml'))
        assert r.status == 200, (what, r)
    assert svc_fake.count == before, 'a forged route was followed'
    assert max(gateway_versions(dep)) == version
    for log in logs:      # nothing taken from the fakes: only the cache's version
        assert f'policy version {version} and its routes from the cache' in log
        assert 'and its routes from site' not in log

    # The real site again: updates flow (version 9e18 froze nothing).
    dep.start_site()
    dep.cmg_site('mapping', 'remove', dep.site.role_ids[0])
    assert dep.wait_policy(after=version, timeout=10) > version
    assert curl(dep.site, dep.site.path('policy.xml')).status == 404


def test_connector_restarted_with_the_site_down_serves_from_its_cache(dep, procs):
    """A role that only the site routes (connector.conf does not name it) is served by a
    connector restarted while the site is down: from its verified cache."""
    svc_b = InternalService(procs, 'svc-b')
    role = json.loads(dep.cmg_site('mapping', 'add', '--type', 'mp', '--url', svc_b.url,
                                   '--json').stdout)['role']
    path = f'/CCM_Proxy_MutualAuth/{role}/whoami'
    poll(lambda: curl(dep.site, path).status == 200, 10 * SLOW, 'the new role', check=procs.check)
    dep.site_proc.signal(signal.SIGTERM)
    dep.connector.signal(signal.SIGTERM)
    connector = start_connector(procs, dep.site.connector_conf, 'connector-again')
    poll(lambda: 'tunnel up' in connector.log_text(), 10 * SLOW, 'the tunnel', check=procs.check)
    assert 'and its routes from the cache' in connector.log_text()
    before = svc_b.count
    r = poll(lambda: (lambda r: r if r.status == 200 else None)(curl(dep.site, path)),
             10 * SLOW, 'the cached route', check=procs.check)
    assert r.body == b'svc-b'
    assert svc_b.count == before + 1


def test_connector_add_list_revoke(dep, procs, tmp_path):
    """A second connector with its own certificate serves; 'connector revoke' closes its
    tunnel within 5 s and its next handshake is refused, while connector-1 serves on;
    its certificate is refused on a device path (401) before and after."""
    r = dep.cmg_site('connector', 'add', 'c2')
    crt, key = dep.site.dir / 'connectors' / 'c2.crt', dep.site.dir / 'connectors' / 'c2.key'
    assert crt.exists() and key.exists(), r.stdout
    assert 'c2' in r.stdout
    listed = dep.cmg_site('connector', 'list').stdout
    assert 'connector-1' in listed and 'c2' in listed, listed
    again = dep.cmg_site('connector', 'add', 'c2', check=False)
    assert again.returncode != 0 and 'exists already' in again.stderr, again

    conf = dep.site.connector_copy('c2', [dep.svc.url])
    ini_set(conf, 'connector', 'cert', crt)
    ini_set(conf, 'connector', 'key', key)
    c2 = start_connector(procs, conf, 'c2')
    gw = dep.gateway[0]
    poll(lambda: 'tunnel up: connector=c2' in gw.log_text(), 10 * SLOW, 'c2 tunnel up',
         check=procs.check)
    poll(lambda: 'policy version' in c2.log_text(), 10 * SLOW, 'c2 to follow the site',
         check=procs.check)
    device_path = dep.site.path('policy.xml')
    as_c2 = curl(dep.site, device_path, cert=(crt, key))
    assert as_c2.status == 401 and b'CMGService_Invalid_Client_Certificate' in as_c2.body, as_c2

    v = dep.policy_version()
    start = time.monotonic()
    dep.cmg_site('connector', 'revoke', 'c2')
    poll(lambda: 'tunnel down: connector=c2' in gw.log_text(), 5, 'c2 tunnel to close in 5 s',
         check=procs.check)
    closed_after = time.monotonic() - start
    assert closed_after < 5, closed_after
    poll(lambda: 'tunnel handshake from' in gw.log_text() and 'connector c2' in gw.log_text(),
         10 * SLOW, 'c2 refused at its next handshake', check=procs.check)
    assert 'revoked by the site' in gw.log_text()
    assert dep.policy_version() > v
    poll(lambda: 'status 403' in c2.log_text(), 10 * SLOW, 'the site to refuse c2 too',
         check=procs.check)
    listed = json.loads(dep.cmg_site('connector', 'list', '--json').stdout)
    assert [c['revoked'] is not None for c in listed if c['name'] == 'c2'] == [True]
    # connector-1 serves on, alone
    n = gw.log_text().count('connector=connector-1 client=')
    c2_served = gw.log_text().count('connector=c2 client=')
    for _ in range(5):
        assert curl(dep.site, device_path).status == 200
    # the gateway logs each request once it is done, which may be just after curl is
    poll(lambda: gw.log_text().count('connector=connector-1 client=') == n + 5, 5 * SLOW,
         'five requests logged as served by connector-1', check=procs.check)
    assert gw.log_text().count('connector=c2 client=') == c2_served
    assert curl(dep.site, device_path, cert=(crt, key)).status == 401
    again = dep.cmg_site('connector', 'revoke', 'c2', check=False)
    assert again.returncode != 0 and 'revoked already' in again.stderr
    nobody = dep.cmg_site('connector', 'revoke', 'nobody', check=False)
    assert nobody.returncode != 0 and 'no connector named nobody' in nobody.stderr


def test_admin_api_is_tls_on_loopback_and_confined(dep, tmp_path):
    """site init puts the admin API on loopback; it speaks TLS only; a request asking the
    site to write outside its directory is refused and writes nothing."""
    init = run_cmg('site', 'init', tmp_path / 'defaults', '--service-name', 'cmg.test')
    assert init.returncode == 0, init.stderr
    conf = (tmp_path / 'defaults' / 'site.conf').read_text()
    assert 'admin_listen = 127.0.0.1:' in conf, conf

    with socket.create_connection(('127.0.0.1', dep.admin_port), timeout=5) as s:
        s.sendall(b'GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n')
        s.settimeout(5)
        try:
            answer = s.recv(100)
        except ConnectionResetError:
            answer = b''
        assert not answer.startswith(b'HTTP/'), answer
    assert dep.api('GET', '/v1/status')['policy_version'] >= 1

    outside = tmp_path / 'outside'
    outside.mkdir()
    for op, args in (('cert.issue', {'device': 'evil'}), ('connector.add', {'name': 'evil'})):
        with pytest.raises(urllib.error.HTTPError) as e:
            dep.api('POST', f'/v1/ops/{op}', dict(args, out=str(outside)))
        assert e.value.code == 403
        assert 'outside' in json.loads(e.value.read())['error']
    with pytest.raises(urllib.error.HTTPError) as e:
        dep.api('POST', '/v1/ops/cert.issue', {'device': 'evil', 'out': str(dep.site.dir / '..')})
    assert e.value.code == 403
    assert list(outside.iterdir()) == []
    assert not (tmp_path / 'evil.crt').exists()
    # inside the directory (the default place) it works
    done = dep.api('POST', '/v1/ops/connector.add', {'name': 'c3'})
    assert done['cert'].startswith(str(dep.site.dir.resolve()))


def test_registration_service_takes_connectors_only(dep, tmp_path):
    """The registration service trusts the CMG-Client-Cert-Thumbprint header only because
    its callers are connectors: a device or gateway certificate of the same CA, or none,
    does not get an answer."""
    d = dep.site.dir
    forged_header = ['-H', 'CMG-Client-Cert-Thumbprint: ' + '0' * 64, '-X', 'POST', '--data', '{}']
    for cert in (None, (d / 'devices/device1.crt', d / 'devices/device1.key'),
                 (d / 'gateway.crt', d / 'gateway.key')):
        argv = ['curl', '-sS', '--cacert', d / 'ca.crt', '-w', '%{http_code}', '--max-time', '10',
                *forged_header, f'https://127.0.0.1:{dep.service_port}/register']
        if cert:
            argv[1:1] = ['--cert', cert[0], '--key', cert[1]]
        r = subprocess.run([str(a) for a in argv], capture_output=True)
        assert r.returncode != 0 and r.stdout in (b'', b'000'), (cert, r)
    # through the gateway, carried by connector-1, it answers (401: no bulk token)
    r = curl(dep.site, dep.reg_path(), '-X', 'POST', '--data', '{}')
    assert r.status == 401, r


def test_max_policy_age_warns(procs, tmp_path, svc):
    """A gateway and a connector whose policy in force is older than max_policy_age log a
    warning that says what to check."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    ini_set(dep.site.gateway_conf, 'gateway', 'max_policy_age', 2)
    ini_set(dep.site.connector_conf, 'connector', 'max_policy_age', 2)
    dep.start_site()
    dep.gateway, dep.connector = bring_up(procs, dep.site)
    version = dep.wait_policy()
    assert 'max_policy_age' not in dep.gateway[0].log_text()
    poll(lambda: 'more than max_policy_age' in dep.gateway[0].log_text(), 6 * SLOW,
         'the gateway to warn', check=procs.check)
    poll(lambda: 'more than max_policy_age' in dep.connector.log_text(), 6 * SLOW,
         'the connector to warn', check=procs.check)
    line = [x for x in dep.gateway[0].log_text().splitlines() if 'max_policy_age' in x][0]
    assert 'warn' in line and f'policy version {version}' in line, line
