"""/CCM_Proxy_MutualAuth/ needs a client certificate that chains to the site's trusted root,
is within its validity and has the clientAuth EKU. Anything else: 401 with the reason token
(or a refused handshake), and the internal service sees nothing."""
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmgtest import curl, make_cert
from internal_service import POLICY

REASON = b'CMGService_Invalid_Client_Certificate'


def site_ca(site):
    cert = x509.load_pem_x509_certificate(site.ca.read_bytes())
    key = serialization.load_pem_private_key(site.dir.joinpath('ca.key').read_bytes(), None)
    return cert, key


def bad_certificate(kind, site, tmp_path):
    ca_cert, ca_key = site_ca(site)
    if kind == 'other CA':
        other_cert, other_key, _ = make_cert(tmp_path / 'other-ca', 'Some Other CA', ca=True)
        return make_cert(tmp_path / kind, 'device1', other_cert, other_key)[2]
    if kind == 'self-signed':
        return make_cert(tmp_path / kind, 'device1')[2]
    if kind == 'expired':
        return make_cert(tmp_path / kind, 'device1', ca_cert, ca_key, valid_from=-30, valid_days=29)[2]
    if kind == 'not yet valid':
        return make_cert(tmp_path / kind, 'device1', ca_cert, ca_key, valid_from=2)[2]
    if kind == 'serverAuth EKU only':
        return make_cert(tmp_path / kind, 'device1', ca_cert, ca_key, eku=(ExtendedKeyUsageOID.SERVER_AUTH,))[2]
    raise ValueError(kind)


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_no_certificate_gets_401_with_reason(site, connector, svc, http):
    before = svc.count
    r = curl(site, site.path('policy.xml'), http=http, cert=False)
    assert (r.rc, r.status) == (0, 401), r
    assert REASON in r.body
    assert svc.count == before, 'the request was forwarded'


@pytest.mark.parametrize('kind', ['other CA', 'self-signed', 'expired', 'not yet valid', 'serverAuth EKU only'])
def test_invalid_certificate_is_refused(site, connector, svc, tmp_path, kind):
    cert = bad_certificate(kind, site, tmp_path)
    before = svc.count
    for http in ('1.1', '2'):
        r = curl(site, site.path('policy.xml'), http=http, cert=cert)
        refused_handshake = r.rc != 0 and r.status == 0
        assert refused_handshake or (r.status == 401 and REASON in r.body), r
    assert svc.count == before, 'the request was forwarded'


def test_new_certificate_from_site_ca_is_accepted(site, connector, tmp_path):
    """The control for the cases above: the same kind of certificate, but valid, works."""
    ca_cert, ca_key = site_ca(site)
    cert = make_cert(tmp_path / 'device2', 'device2', ca_cert, ca_key)[2]
    r = curl(site, site.path('policy.xml'), cert=cert)
    assert (r.rc, r.status, r.body) == (0, 200, POLICY), r
