"""`cmg site init --gateway-pfx FILE --pfx-password PASS`: the gateway's certificate comes from
a PKCS#12 file an administrator exported (here: from a CA that is not the site's). The site
keeps its own CA for devices and connectors; the connector trusts the .pfx's CA
(gateway-ca.crt), and so must devices. A wrong password is a clear error, at site init and at
gateway start."""
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmgtest import SERVICE_NAME, Site, bring_up, curl, ini_get, ini_set, make_cert, run_cmg
from internal_service import POLICY

PASSWORD = 'Exp0rted-from-the-CA!'


def make_pfx(tmp_path, password=PASSWORD):
    """A PKCS#12 file as an administrator would export it: server certificate for the service
    name (and localhost / 127.0.0.1), its key, and the issuing CA. Returns (pfx, CA cert file)."""
    ca_cert, ca_key, (ca_file, _) = make_cert(tmp_path / 'corp-root-ca', 'Corp Root CA', ca=True, valid_days=365)
    cert, key, _ = make_cert(tmp_path / 'corp-gateway', SERVICE_NAME, ca_cert, ca_key,
                             eku=(ExtendedKeyUsageOID.SERVER_AUTH,), san=(SERVICE_NAME, 'localhost', '127.0.0.1'))
    pfx = tmp_path / 'exported.pfx'
    pfx.write_bytes(pkcs12.serialize_key_and_certificates(
        b'cmg gateway', key, cert, [ca_cert], serialization.BestAvailableEncryption(password.encode())))
    return pfx, ca_file


def certs_in(path):
    end = b'-----END CERTIFICATE-----'
    return [x509.load_pem_x509_certificate(part + end) for part in path.read_bytes().split(end) if part.strip()]


@pytest.fixture
def pfx_site(procs, tmp_path, svc):
    pfx, pfx_ca = make_pfx(tmp_path)
    site = Site(tmp_path / 'site', [svc.url], procs, init_args=['--gateway-pfx', pfx, '--pfx-password', PASSWORD])
    site.pfx, site.pfx_ca, site.site_ca = pfx, pfx_ca, site.ca
    site.ca = pfx_ca                    # what devices must trust for the gateway now
    return site


def test_site_init_writes_the_pfx_and_its_ca(pfx_site):
    site = pfx_site
    assert (site.dir / 'gateway.pfx').read_bytes() == site.pfx.read_bytes()
    assert not (site.dir / 'gateway.crt').exists() and not (site.dir / 'gateway.key').exists()
    assert (site.dir / 'gateway.pfx').stat().st_mode & 0o077 == 0, 'gateway.pfx is readable by others'
    assert certs_in(site.dir / 'gateway-ca.crt') == certs_in(site.pfx_ca)
    assert ini_get(site.gateway_conf, 'gateway', 'cert') == ['gateway.pfx']
    assert ini_get(site.gateway_conf, 'gateway', 'cert_password') == [PASSWORD]
    assert site.gateway_conf.stat().st_mode & 0o077 == 0, 'gateway.conf holds the password: not private'
    assert ini_get(site.connector_conf, 'connector', 'ca') == ['gateway-ca.crt']
    assert 'gateway-ca.crt' in site.init_output


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_gateway_serves_with_the_pfx_certificate(procs, pfx_site, http):
    site = pfx_site
    bring_up(procs, site)               # the connector accepted the gateway's .pfx certificate
    r = curl(site, site.path('policy.xml'), http=http)
    assert (r.rc, r.status, r.version, r.body) == (0, 200, http, POLICY), r

    # it is the .pfx's certificate that the gateway shows, not one from the site CA
    site.ca = site.site_ca
    r = curl(site, site.path('policy.xml'), http=http)
    assert r.rc == 60 and r.status == 0, f'a client trusting only the site CA was not refused: {r}'


@pytest.mark.parametrize('password', ['wrong-password', None], ids=['wrong', 'none'])
def test_site_init_with_wrong_pfx_password_fails_clearly(tmp_path, password):
    pfx, _ = make_pfx(tmp_path)
    site_dir = tmp_path / 'site'
    args = ['site', 'init', site_dir, '--service-name', SERVICE_NAME, '--mp', 'http://127.0.0.1:8080/',
            '--gateway-pfx', pfx]
    if password is not None:
        args += ['--pfx-password', password]
    r = run_cmg(*args)
    assert r.returncode != 0, f'site init accepted a wrong password:\n{r.stdout}'
    assert str(pfx) in r.stderr and 'password' in r.stderr.lower(), f'unclear message: {r.stderr!r}'
    assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr
    assert not (site_dir / 'ca.crt').exists() and not (site_dir / 'ca.key').exists(), 'a site was created anyway'


def test_gateway_with_wrong_cert_password_exits_naming_the_file(pfx_site):
    site = pfx_site
    ini_set(site.gateway_conf, 'gateway', 'cert_password', 'not-the-password')
    r = run_cmg('gateway', '-c', site.gateway_conf, timeout=10)
    assert r.returncode != 0, 'the gateway started with a wrong .pfx password'
    assert str(site.dir / 'gateway.pfx') in r.stderr, f'the message does not name the file: {r.stderr!r}'
    assert 'password' in r.stderr.lower(), r.stderr
