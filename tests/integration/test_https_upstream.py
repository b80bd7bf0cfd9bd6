"""An internal service over HTTPS that requires a client certificate (as management points
configured for HTTPS do): Debian's nginx with `ssl_verify_client on`, its certificate from an
internal CA. The connector's mapping names that CA (`ca`) and its client certificate
(`client_cert`, `client_key`); the device gets nginx's exact bytes. Without the client
certificate nginx refuses the request (its own 400, passed on); with a server certificate the
connector does not trust, the device gets 502. Either way the gateway keeps serving."""
import os
import shutil
import socket

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmgtest import SLOW, Site, bring_up, curl, free_port, ini_set, make_cert, poll
from internal_service import POLICY, stream

NGINX = '/usr/sbin/nginx'
BODY = b''.join(stream(300_001, 21))    # not a multiple of any buffer size

pytestmark = pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason=f'no nginx at {NGINX}')


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(('::1', 0))
        return True
    except OSError:
        return False


class Nginx:
    """nginx in the foreground, one process, everything under `root`; HTTPS on 127.0.0.1
    (and ::1, since `localhost` may resolve to either), client certificates required."""

    def __init__(self, procs, root):
        self.root = root
        root.mkdir()
        (root / 'www').mkdir()
        (root / 'www' / 'policy.bin').write_bytes(BODY)
        ca_cert, ca_key, (self.ca, _) = make_cert(root / 'internal-ca', 'Internal CA', ca=True, valid_days=365)
        _, _, (crt, key) = make_cert(root / 'mp-server', 'localhost', ca_cert, ca_key,
                                     eku=(ExtendedKeyUsageOID.SERVER_AUTH,), san=('localhost', '127.0.0.1', '::1'))
        _, _, (self.client_cert, self.client_key) = make_cert(root / 'connector-client', 'connector-client',
                                                              ca_cert, ca_key)
        self.port = free_port()
        listen = f'listen 127.0.0.1:{self.port} ssl;'
        if ipv6_loopback():
            listen += f'\n        listen [::1]:{self.port} ssl;'
        temp = '\n    '.join(f'{kind}_temp_path {root}/{kind};' for kind in
                               ('client_body', 'proxy', 'fastcgi', 'uwsgi', 'scgi'))
        self.access_log = root / 'access.log'
        conf = root / 'nginx.conf'
        conf.write_text(f'''daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log stderr info;
events {{ worker_connections 64; }}
http {{
    {temp}
    log_format cert '$request_uri $status $ssl_client_verify "$ssl_client_s_dn"';
    access_log {self.access_log} cert;
    server {{
        {listen}
        server_name localhost;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_client_certificate {self.ca};
        ssl_verify_client on;
        root {root}/www;
    }}
}}
''')
        self.proc = procs.start('nginx', [NGINX, '-p', root, '-e', 'stderr', '-c', conf])

        def listening():
            socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
            return True
        poll(listening, 10 * SLOW, 'nginx to listen', check=procs.check)

    def access(self):
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []


@pytest.fixture
def nginx(procs, tmp_path):
    return Nginx(procs, tmp_path / 'nginx')


@pytest.fixture
def https_site(procs, tmp_path, nginx, svc):
    """A site whose role 0 is nginx over HTTPS, with the connector's mapping set up for it, and
    role 1 the plain-HTTP internal service."""
    site = Site(tmp_path / 'site', [f'https://localhost:{nginx.port}/', svc.url], procs)
    for f in (nginx.ca, nginx.client_cert, nginx.client_key):
        shutil.copy(f, site.dir / f.name)
    mapping = f'mapping {site.role_ids[0]}'
    ini_set(site.connector_conf, mapping, 'ca', nginx.ca.name)
    ini_set(site.connector_conf, mapping, 'client_cert', nginx.client_cert.name)
    ini_set(site.connector_conf, mapping, 'client_key', nginx.client_key.name)
    return site


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_device_gets_nginx_bytes_over_https_with_client_certificate(procs, https_site, nginx, http):
    site = https_site
    bring_up(procs, site)
    for _ in range(3):                  # kept-alive upstream connections are reused
        r = curl(site, site.path('policy.bin'), http=http)
        assert (r.rc, r.status, r.version) == (0, 200, http), r
        assert r.body == BODY
    hits = [line for line in nginx.access() if line.startswith('/policy.bin ')]
    assert hits and all(' 200 SUCCESS "CN=connector-client"' in line for line in hits), nginx.access()


def test_without_client_certificate_nginx_refuses_and_gateway_keeps_serving(procs, https_site, nginx):
    """Without client_cert the connector's TLS handshake succeeds, but nginx refuses the request
    itself (nginx never fails the handshake for a missing certificate: it answers
    `400 No required SSL certificate was sent`). The device gets that refusal as the internal
    service gave it, never the file, and the gateway goes on serving the other role."""
    site = https_site
    mapping = f'mapping {site.role_ids[0]}'
    ini_set(site.connector_conf, mapping, 'client_cert')
    ini_set(site.connector_conf, mapping, 'client_key')
    bring_up(procs, site)
    for http in ('1.1', '2', '1.1'):
        r = curl(site, site.path('policy.bin'), http=http)
        assert (r.rc, r.status) == (0, 400) and b'No required SSL certificate' in r.body, r
        assert BODY[:100] not in r.body
        r = curl(site, site.path('policy.xml', 1), http=http)
        assert (r.rc, r.status, r.body) == (0, 200, POLICY), r
    assert all(' 400 NONE ' in line for line in nginx.access()), nginx.access()


def test_untrusted_internal_certificate_is_502_and_gateway_keeps_serving(procs, https_site, nginx):
    """The connector checks the internal server's certificate against the mapping's `ca`: with
    another CA there, the handshake fails, the device gets 502, and nothing reaches nginx."""
    site = https_site
    ini_set(site.connector_conf, f'mapping {site.role_ids[0]}', 'ca', 'ca.crt')   # the site CA: wrong here
    gateways, connector = bring_up(procs, site)
    for http in ('1.1', '2', '1.1'):
        r = curl(site, site.path('policy.bin'), http=http)
        assert (r.rc, r.status) == (0, 502) and b'CMGConnector_Upstream_TLS_Failed' in r.body, r
        r = curl(site, site.path('policy.xml', 1), http=http)
        assert (r.rc, r.status, r.body) == (0, 200, POLICY), r
    assert nginx.access() == [], 'a request reached nginx over an unverified connection'
    assert gateways[0].log_text().count(f'path={site.path("policy.bin")} status=502') == 3
    assert 'certificate verify failed' in connector.log_text()
