"""The command line an administrator meets first: help, `cmg site init`, and clear errors."""
import re
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmgtest import free_port, ini_get, ini_sections, run_cmg

KEYS = ['ca.key', 'gateway.key', 'connector.key', 'devices/device1.key']
CERTS = ['ca.crt', 'gateway.crt', 'connector.crt', 'devices/device1.crt']


CONNECTOR_EKU = '1.3.6.1.3.7264.1.1'   # OpenCMG connector

def cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def openssl_verify(site_dir, purpose, crt):
    return subprocess.run(['openssl', 'verify', '-CAfile', site_dir / 'ca.crt', '-purpose', purpose, crt],
                          capture_output=True, text=True)


def test_help():
    r = run_cmg('--help')
    assert r.returncode == 0, r.stderr
    for word in ('site', 'gateway', 'connector'):
        assert word in r.stdout


def test_site_init_help():
    r = run_cmg('site', 'init', '--help')
    assert r.returncode == 0, r.stderr
    for option in ('--service-name', '--mp', '--gateway-port', '--tunnel-port'):
        assert option in r.stdout + r.stderr


def test_site_init(tmp_path):
    site = tmp_path / 'site'
    mps = ['http://127.0.0.1:8080/', 'http://127.0.0.1:8081/sup/', 'https://mp.internal.test/']
    gport = free_port()
    tport = free_port()
    args = ['site', 'init', site, '--service-name', 'cmg.test']
    for mp in mps:
        args += ['--mp', mp]
    r = run_cmg(*args, '--gateway-port', gport, '--tunnel-port', tport)
    assert r.returncode == 0, r.stdout + r.stderr

    # one device URL per --mp, in order, on lines of their own
    urls = [line for line in r.stdout.splitlines() if line.startswith('https://')]
    assert len(urls) == len(mps), r.stdout
    roles = []
    for url in urls:
        m = re.fullmatch(rf'https://cmg\.test:{gport}/CCM_Proxy_MutualAuth/([0-9A-Za-z_.-]+)', url)
        assert m, url
        roles.append(m.group(1))
    assert len(set(roles)) == len(roles), 'role ids are not distinct'
    # ... and where the device certificate, its key and the CA are
    for name in ('device1.crt', 'device1.key', 'ca.crt'):
        assert name in r.stdout, f'{name} not mentioned:\n{r.stdout}'

    for f in KEYS:
        mode = stat.S_IMODE((site / f).stat().st_mode)
        assert mode == 0o600, f'{f} has mode {mode:o}'
    for f in CERTS:
        cert(site / f)

    gw = cert(site / 'gateway.crt')
    san = gw.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert 'cmg.test' in san.get_values_for_type(x509.DNSName)
    assert 'localhost' in san.get_values_for_type(x509.DNSName)
    assert '127.0.0.1' in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert gw.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == 'cmg.test'
    assert openssl_verify(site, 'sslserver', site / 'gateway.crt').returncode == 0

    device = cert(site / 'devices/device1.crt')
    eku = device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    assert openssl_verify(site, 'sslclient', site / 'devices/device1.crt').returncode == 0

    conn = cert(site / 'connector.crt')
    assert [a.value for a in conn.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)] \
        == ['OpenCMG Connector']
    # a connector's certificate is for tunnels and the site feed only: OpenCMG's own
    # extended key usage, no clientAuth (so no device path takes it)
    eku = conn.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [o.dotted_string for o in eku] == [CONNECTOR_EKU]
    assert openssl_verify(site, 'sslclient', site / 'connector.crt').returncode != 0

    # the configs: the same role ids in both, each forwarded to its --mp
    g, c = site / 'gateway.conf', site / 'connector.conf'
    assert [s.split()[1] for s in ini_sections(g) if s.startswith('mapping ')] == roles
    assert [s.split()[1] for s in ini_sections(c) if s.startswith('mapping ')] == roles
    assert [ini_get(c, f'mapping {role}', 'internal_url') for role in roles] == [[mp] for mp in mps]
    assert ini_get(g, 'gateway', 'service_name') == ['cmg.test']
    assert all(v.endswith(f':{gport}') for v in ini_get(g, 'gateway', 'listen'))
    assert ini_get(g, 'gateway', 'tunnel_port') == [str(tport)]
    assert [v.rsplit(':', 1)[1] for v in ini_get(c, 'connector', 'gateway')] == [str(tport)]
    assert ini_get(c, 'connector', 'server_name') == ['cmg.test']


def test_site_init_defaults(tmp_path):
    r = run_cmg('site', 'init', tmp_path / 'site', '--service-name', 'cmg.test', '--mp', 'http://127.0.0.1:8080/')
    assert r.returncode == 0, r.stdout + r.stderr
    urls = [line for line in r.stdout.splitlines() if line.startswith('https://')]
    assert len(urls) == 1 and re.match(r'https://cmg\.test(:443)?/CCM_Proxy_MutualAuth/[^/]+$', urls[0]), urls
    g, c = tmp_path / 'site/gateway.conf', tmp_path / 'site/connector.conf'
    assert ini_get(g, 'gateway', 'listen') and all(v.endswith(':443') for v in ini_get(g, 'gateway', 'listen'))
    assert ini_get(g, 'gateway', 'tunnel_port') == ['10140']
    assert [v.rsplit(':', 1)[1] for v in ini_get(c, 'connector', 'gateway')] == ['10140']


def test_site_init_refuses_existing_site(tmp_path):
    """A second init must not replace a site's CA (every certificate would be orphaned),
    unless told to with --force."""
    site = tmp_path / 'site'
    args = ('site', 'init', site, '--service-name', 'cmg.test', '--mp', 'http://127.0.0.1:8080/')
    assert run_cmg(*args).returncode == 0
    ca = (site / 'ca.key').read_bytes()
    r = run_cmg(*args)
    assert r.returncode != 0, 'site init overwrote an existing site'
    assert r.stderr.strip(), 'no message saying why'
    assert (site / 'ca.key').read_bytes() == ca
    r = run_cmg(*args, '--force')
    assert r.returncode == 0, r.stderr
    assert (site / 'ca.key').read_bytes() != ca


def test_site_init_needs_service_name(tmp_path):
    r = run_cmg('site', 'init', tmp_path / 'site', '--mp', 'http://127.0.0.1:8080/')
    assert r.returncode != 0
    assert 'service-name' in r.stderr


@pytest.mark.parametrize('role', ['gateway', 'connector'])
def test_missing_config_is_a_clear_error(tmp_path, role):
    missing = tmp_path / 'nope' / f'{role}.conf'
    r = run_cmg(role, '-c', missing, timeout=20)
    assert r.returncode != 0
    assert str(missing) in r.stderr, f'cmg {role} does not say which file: {r.stderr!r}'
