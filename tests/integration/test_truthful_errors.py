"""Errors that say what is true. A 502/504 made by the connector names its cause with a reason
token, in the device's body (HTTP/1.1 and HTTP/2) and in the gateway's access log:
`CMGConnector_Upstream_Refused` (nothing listens on the internal port),
`CMGConnector_Upstream_TLS_Failed` (the internal server's certificate is not trusted),
`CMGConnector_Upstream_DNS_Failed` (the internal host name does not resolve),
`CMGConnector_Upstream_Timeout` (the internal service answers after `upstream_timeout`).
The token travels from connector to gateway in a `cmg-reason` response field that the device
never sees and that an internal service cannot forge."""
import json
import signal
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

import cmgtest
from cmgtest import (Site, alone_gateway, bring_up, curl, free_port, ini_get, ini_set, make_cert, poll,
                     run_cmg, start_connector, start_gateway)
from sitetest import Deployment

TOKENS = {
    'refused': (502, 'CMGConnector_Upstream_Refused'),
    'tls': (502, 'CMGConnector_Upstream_TLS_Failed'),
    'dns': (502, 'CMGConnector_Upstream_DNS_Failed'),
    'slow': (504, 'CMGConnector_Upstream_Timeout'),
}
FORGED = (b'HTTP/1.1 502 Bad Gateway\r\ncmg-reason: CMGConnector_Upstream_Refused\r\n'
          b'Content-Length: 7\r\nConnection: close\r\n\r\nforged\n')


class Listener:
    """A loopback server in a thread: each connection gets `serve(conn)`; counts connections."""

    def __init__(self, serve, context=None):
        self.sock = socket.create_server(('127.0.0.1', 0))
        self.port = self.sock.getsockname()[1]
        self.serve, self.context = serve, context
        self.connections = 0
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    if self.context:
                        conn = self.context.wrap_socket(conn, server_side=True)
                    self.serve(conn)
                except (OSError, ssl.SSLError):
                    pass

    def close(self):
        self.sock.close()


def access_log(gateway, part, n):
    """The gateway's access-log lines that contain `part`, once there are n of them (the line
    is written as the answer ends, maybe after the client has it)."""
    def lines():
        found = [x for x in gateway.log_text().splitlines() if part in x]
        return found if len(found) >= n else None
    return poll(lines, 10, f'{n} access-log line(s) with {part!r}')


def answer_forged(conn):
    conn.recv(65536)
    conn.sendall(FORGED)


@pytest.fixture
def listeners(tmp_path):
    """An HTTPS server whose self-signed certificate the connector does not trust, and an HTTP
    server that answers 502 with a forged `cmg-reason` field."""
    _, _, (crt, key) = make_cert(tmp_path / 'untrusted', 'localhost', san=('localhost', '127.0.0.1'),
                                 eku=(ExtendedKeyUsageOID.SERVER_AUTH,))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    made = {'tls': Listener(lambda conn: conn.recv(65536), ctx), 'forged': Listener(answer_forged)}
    yield made
    for listener in made.values():
        listener.close()


@pytest.fixture
def roles(procs, tmp_path, svc, listeners):
    """A site with one role per cause (and one whose service forges the field), a gateway and a
    connector with upstream_timeout = 1 s."""
    closed = free_port()
    urls = {'refused': f'http://127.0.0.1:{closed}/',
            'tls': f'https://localhost:{listeners["tls"].port}/',
            'dns': 'http://internal-mp.cmg-test.invalid/',
            'slow': svc.url,
            'forged': f'http://127.0.0.1:{listeners["forged"].port}/'}
    site = Site(tmp_path / 'site', list(urls.values()), procs)
    ini_set(site.connector_conf, 'connector', 'upstream_timeout', 1)
    gateways, connector = bring_up(procs, site)
    return site, dict(zip(urls, range(len(urls)))), gateways[0], connector


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_each_cause_has_its_reason_token(procs, roles, svc, http):
    site, role, gateway, connector = roles
    for cause, (status, token) in TOKENS.items():
        rest = 'delay?ms=3000' if cause == 'slow' else 'policy.xml'
        r = curl(site, site.path(rest, role[cause]), '-i', http=http)
        assert (r.rc, r.status) == (0, status), (cause, r)
        head, _, body = r.body.partition(b'\r\n\r\n')
        assert body == token.encode() + b'\r\n', (cause, r)
        assert b'cmg-reason' not in head.lower(), f'the device saw the connector\'s field: {head!r}'
        logged = access_log(gateway, f'path={site.path(rest, role[cause])} status={status} ', 1)
        assert all(f' reason={token}' in x for x in logged), (cause, logged)
        assert f'reason={token}' in connector.log_text()


def test_internal_service_cannot_forge_the_reason(procs, roles, listeners):
    site, role, gateway, connector = roles
    for http in ('1.1', '2'):
        r = curl(site, site.path('anything', role['forged']), '-i', http=http)
        assert (r.rc, r.status) == (0, 502), r
        head, _, body = r.body.partition(b'\r\n\r\n')
        assert body == b'forged\n', r
        assert b'cmg-reason' not in head.lower(), head
    logged = access_log(gateway, f'path={site.path("anything", role["forged"])} ', 2)
    assert not any('reason=' in x for x in logged), logged
    assert listeners['forged'].connections == 2


def test_nothing_reaches_an_untrusted_or_missing_service(procs, roles, listeners):
    """The TLS failure is the connector's verdict: the handshake never completes, so no request
    is written; a name that does not resolve is not dialled at all."""
    site, role, gateway, connector = roles
    for _ in range(3):
        r = curl(site, site.path('policy.xml', role['tls']))
        assert (r.rc, r.status) == (0, 502), r
    log = connector.log_text()
    assert 'certificate verify failed' in log
    assert 'cannot resolve internal-mp.cmg-test.invalid' in log


# ---------------------------------------------------------------- changes while the site is down

RECORDED = 'recorded; published when the site service runs (it is not running now)'


def test_a_change_says_whether_the_site_service_publishes_it(procs, tmp_path, svc):
    """`site serve` holds DIR/serve.lock (flock) while it runs: a change made without it is
    "recorded", one made with it "done"; a service killed with SIGKILL lets the lock go."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    changes = [('mapping', 'add', '--type', 'mp', '--url', svc.url),
               ('device', 'block', 'oidc:someone'), ('device', 'unblock', 'oidc:someone'),
               ('cert', 'revocation', 'off'), ('token', 'bulk', 'create')]
    for args in changes:
        out = dep.cmg_site(*args).stdout
        assert RECORDED in out and 'done' not in out, (args, out)
    for args in (('mapping', 'list'), ('device', 'list'), ('cert', 'revocation')):
        assert RECORDED not in dep.cmg_site(*args).stdout, args
    r = dep.cmg_site('device', 'block', 'oidc:other', '--json')
    assert RECORDED in r.stderr and json.loads(r.stdout), r
    # the last line of `token bulk create` is still the token
    guid, token = dep.bulk_token()
    assert token.count('.') == 2, token

    site = dep.start_site()
    for args in changes:
        out = dep.cmg_site(*args).stdout
        assert RECORDED not in out, (args, out)
    assert dep.cmg_site('device', 'block', 'oidc:someone').stdout.startswith('done: ')
    second = run_cmg('site', 'serve', dep.site.dir)
    assert second.returncode == 1 and f'pid {site.pid}' in second.stderr, second

    site.signal(signal.SIGKILL)
    out = dep.cmg_site('device', 'unblock', 'oidc:someone').stdout
    assert out.startswith(RECORDED), out


# ---------------------------------------------------------------- certificates: names and expiry

CONNECTOR_EKU = x509.ObjectIdentifier('1.3.6.1.3.7264.1.1')
SITE_EKU = x509.ObjectIdentifier('1.3.6.1.3.7264.1.2')


def site_ca(site):
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    key = serialization.load_pem_private_key((site.dir / 'ca.key').read_bytes(), None)
    return ca, key


def not_after(cert):
    return cert.not_valid_after.strftime('%Y-%m-%d %H:%M:%S UTC')


def gateway_cert(site, name, **kw):
    """A gateway certificate of the site CA in site.dir/name.crt, set in gateway.conf."""
    ca, key = site_ca(site)
    cert, _, (crt, pem_key) = make_cert(site.dir / name, 'gateway', ca, key,
                                        eku=(ExtendedKeyUsageOID.SERVER_AUTH,), **kw)
    ini_set(site.gateway_conf, 'gateway', 'cert', crt.name)
    ini_set(site.gateway_conf, 'gateway', 'key', pem_key.name)
    return cert, crt


def test_gateway_refuses_an_expired_certificate(tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url])
    cert, crt = gateway_cert(site, 'old', valid_from=-40, valid_days=30, san=(site.name,))
    r = run_cmg('gateway', '-c', site.gateway_conf, timeout=20)
    assert r.returncode == 1, r
    assert f'certificate {crt} expired on {not_after(cert)}' in r.stderr, r.stderr
    assert 'ready' not in r.stderr


def test_gateway_refuses_a_certificate_for_another_name(tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url])
    _, crt = gateway_cert(site, 'misnamed', san=('other.example', '192.0.2.7'))
    r = run_cmg('gateway', '-c', site.gateway_conf, timeout=20)
    assert r.returncode == 1, r
    assert (f'certificate {crt} does not name the service: expected {site.name} (service_name), '
            f'found other.example, 192.0.2.7') in r.stderr, r.stderr
    assert 'ready' not in r.stderr


def test_every_role_warns_of_its_certificates_end(procs, tmp_path, svc):
    """A gateway certificate with 10 days left, a connector certificate with 2 and a site
    certificate with 5: each role says so at start, one line, with the file and the date; the
    CAs (10 years) are not mentioned."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    site = dep.site
    gw_cert, gw_crt = gateway_cert(site, 'soon', valid_days=11, san=(site.name,))
    ca, key = site_ca(site)
    cn_cert, _, (cn_crt, cn_key) = make_cert(site.dir / 'connector-soon', 'connector-1', ca, key,
                                             eku=(CONNECTOR_EKU,), valid_days=3)
    ini_set(site.connector_conf, 'connector', 'cert', cn_crt.name)
    ini_set(site.connector_conf, 'connector', 'key', cn_key.name)
    site_cert, _, _ = make_cert(site.dir / 'site', 'OpenCMG site', ca, key, valid_days=6,
                                eku=(ExtendedKeyUsageOID.SERVER_AUTH, SITE_EKU),
                                san=('localhost', '127.0.0.1', '::1'))
    site_proc = dep.start_site()
    gateways, connector = bring_up(procs, site)
    expected = {gateways[0]: ('gateway certificate', gw_crt, gw_cert, 10),
                connector: ('connector certificate', site.dir / cn_crt.name, cn_cert, 2),
                site_proc: ('site certificate', site.dir / 'site.crt', site_cert, 5)}
    for proc, (what, path, cert, days) in expected.items():
        line = f'{what} {path} expires on {not_after(cert)} ({days} day(s) left)'
        log = proc.log_text()
        assert log.count(line) == 1, (proc.name, line, log[-2000:])
        assert log.count(' expires on ') == 1, (proc.name, log[-2000:])


def test_cert_list_shows_everything_the_site_holds(tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url])
    assert run_cmg('site', 'connector', 'add', 'connector-2', '--site', site.dir).returncode == 0
    assert run_cmg('site', 'cert', 'issue', '--device', 'lab-1', '--site', site.dir).returncode == 0
    r = run_cmg('site', 'cert', 'list', '--site', site.dir, '--json')
    assert r.returncode == 0, r
    rows = {(row['kind'], row['name']): row for row in json.loads(r.stdout)}
    files = {('CA', 'site CA'): 'ca.crt', ('site', 'site channel'): 'site.crt',
             ('gateway', 'gateway'): 'gateway.crt', ('connector', 'connector-1'): 'connector.crt',
             ('connector', 'connector-2'): 'connectors/connector-2.crt',
             ('device', 'device1'): 'devices/device1.crt', ('device', 'lab-1'): 'devices/lab-1.crt'}
    for key, rel in files.items():
        cert = x509.load_pem_x509_certificate((site.dir / rel).read_bytes())
        row = rows.pop(key, None)
        assert row, (key, r.stdout)
        assert row['not_after'] == cert.not_valid_after.strftime('%Y-%m-%dT%H:%M:%SZ'), (key, row)
        assert int(row['serial'], 16) == cert.serial_number, (key, row)
    assert list(rows) == [('signing key', 'site-signing.pub')], rows
    table = run_cmg('site', 'cert', 'list', '--site', site.dir).stdout.splitlines()
    assert table[0].split('\t') == ['kind', 'name', 'serial', 'issued', 'expires', 'revoked']
    assert len(table) == 1 + len(files) + 1, table


# ---------------------------------------------------------------- connector setup mistakes

def test_connector_setup_mistakes_name_expected_and_found(procs, tmp_path, svc):
    """Four wrong connector.conf files against one gateway: a device certificate as the
    connector's, the device port dialled, another server_name, a port that speaks plain HTTP.
    Each connector's log says what it expected and what it found; none of them gets a tunnel."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    alone_gateway(site)                  # no connector gets a tunnel: the device port opens at once
    gateway = start_gateway(procs, site)
    confs = {name: site.connector_copy(name, [svc.url])
             for name in ('devcert', 'devport', 'misnamed', 'plain')}
    ini_set(confs['devcert'], 'connector', 'cert', 'devices/device1.crt')
    ini_set(confs['devcert'], 'connector', 'key', 'devices/device1.key')
    ini_set(confs['devport'], 'connector', 'gateway', f'127.0.0.1:{site.port}')
    ini_set(confs['misnamed'], 'connector', 'server_name', 'wrong.example')
    ini_set(confs['plain'], 'connector', 'gateway', f'127.0.0.1:{svc.port}')
    expected = {
        'devcert': [f'{site.dir}/devices/device1.crt is not a connector certificate: expected the '
                    'OpenCMG connector usage (made by \'cmg site connector add\'), found clientAuth',
                    'a device certificate?',
                    f'the gateway refused this connector\'s certificate {site.dir}/devices/device1.crt'],
        'devport': ['expected the tunnel protocol (ALPN cmg-tunnel/1), found no ALPN agreed',
                    'is this the gateway\'s device port?'],
        'misnamed': [f'does not name the server_name of {confs["misnamed"]}: expected wrong.example, '
                     f'found {site.name}, localhost, 127.0.0.1'],
        'plain': ['expected TLS from a gateway\'s tunnel port, found a peer that does not speak TLS'],
    }
    connectors = {name: start_connector(procs, conf, name) for name, conf in confs.items()}
    for name, parts in expected.items():
        log = poll(lambda: (lambda t: t if all(p in t for p in parts) else None)(connectors[name].log_text()),
                   10, f'{name}: {parts}', check=procs.check)
        assert 'tunnel up' not in log
    assert 'tunnel up' not in gateway.log_text()


def test_mapping_add_refuses_a_host_no_connector_could_reach(tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url])
    for url, found in (('http://internal-mp.cmg-test.invalid/', "found 'internal-mp.cmg-test.invalid': "),
                       ('http://:8080/', "found ':8080': bad host"),
                       ('https://127.0.0.1:70000/', "found '70000': bad port"),
                       ('http://admin@127.0.0.1/', "found user information ('@')")):
        r = run_cmg('site', 'mapping', 'add', '--type', 'mp', '--url', url, '--site', site.dir)
        assert r.returncode == 2 and f'url {url}: expected' in r.stderr and found in r.stderr, (url, r)
    listed = run_cmg('site', 'mapping', 'list', '--site', site.dir).stdout
    assert 'invalid' not in listed and ':8080' not in listed and '70000' not in listed, listed
    assert run_cmg('site', 'mapping', 'add', '--type', 'mp', '--url', svc.url, '--site', site.dir).returncode == 0


def test_site_init_publishes_the_address_connectors_reach_the_site_at(tmp_path, svc, procs):
    """`--site-address HOST`: the connector's feed URL and the registration route use HOST with
    the listen ports, site.crt names HOST (and `serve` keeps it), site.conf records it. A feed
    or registration service on every address without one is refused."""
    feed, service = free_port(), free_port()
    args = ('--site-feed', f'127.0.0.1:{feed}', '--site-service', f'127.0.0.1:{service}',
            '--site-address', 'site.contoso.test')
    site = Site(tmp_path / 'site', [svc.url], procs, init_args=args)
    assert ini_get(site.connector_conf, 'connector', 'site') == [f'https://site.contoso.test:{feed}']
    assert ini_get(site.dir / 'site.conf', 'site', 'connector_address') == ['site.contoso.test']
    routes = json.loads(run_cmg('site', 'mapping', 'list', '--site', site.dir, '--json').stdout)
    assert [m['url'] for m in routes if m['type'] == 'site'] == [f'https://site.contoso.test:{service}']

    def names():
        cert = x509.load_pem_x509_certificate((site.dir / 'site.crt').read_bytes())
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert 'site.contoso.test' in names()
    before = (site.dir / 'site.crt').read_bytes()
    dep_site = procs.start('site', [cmgtest.CMG, 'site', 'serve', site.dir])
    poll(lambda: 'serving' in dep_site.log_text(), 10, 'the site to serve', check=procs.check)
    assert (site.dir / 'site.crt').read_bytes() == before, 'serve made the site certificate again'

    r = run_cmg('site', 'init', tmp_path / 'wild', '--service-name', 'cmg.test',
                '--site-feed', f'0.0.0.0:{feed}')
    assert r.returncode == 2 and 'give --site-address HOST' in r.stderr, r
    assert not (tmp_path / 'wild' / 'site.conf').exists()


def test_site_address_with_a_port_is_refused(tmp_path):
    """`--site-address` takes a host: a port in it would end up inside the feed URL and the
    certificate's names. An IPv6 address is a host."""
    r = run_cmg('site', 'init', tmp_path / 'hp', '--service-name', 'cmg.test', '--site-address', 'site.contoso.test:8092')
    assert r.returncode == 2 and "'site.contoso.test:8092' names a port; give the host only" in r.stderr, r
    assert not (tmp_path / 'hp' / 'site.conf').exists()
    r = run_cmg('site', 'init', tmp_path / 'v6', '--service-name', 'cmg.test', '--site-address', 'fd00::5')
    assert r.returncode == 0, r
    assert ini_get(tmp_path / 'v6' / 'connector.conf', 'connector', 'site') == ['https://[fd00::5]:8092']
