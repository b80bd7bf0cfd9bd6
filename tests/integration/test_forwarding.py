"""A device with the sample certificate reaches the internal service through gateway and
connector: exact bytes over HTTP/1.1 and HTTP/2, identity headers, keep-alive, uploads."""
import hashlib
import json
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography import x509

from cmgtest import DeviceConnection, bring_up, curl, ini_set
from internal_service import POLICY, stream, stream_sha256

DOWNLOAD = 3 * (1 << 20) + 12345      # a few MiB, not a multiple of any buffer size
END = b'-----END CERTIFICATE-----'


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_exact_bytes(site, connector, svc, http):
    r = curl(site, site.path('policy.xml'), http=http)
    assert (r.rc, r.status, r.version) == (0, 200, http), r
    assert r.body == POLICY

    r = curl(site, site.path(f'download?size={DOWNLOAD}&seed=3'), http=http)
    assert (r.rc, r.status) == (0, 200), r
    assert hashlib.sha256(r.body).hexdigest() == stream_sha256(DOWNLOAD, 3)
    assert svc.stats()['paths'][-2:] == ['/policy.xml', f'/download?size={DOWNLOAD}&seed=3']


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_chunked_response_is_passed_on(site, connector, http):
    r = curl(site, site.path(f'download?size={DOWNLOAD}&seed=4&chunked=1'), http=http)
    assert (r.rc, r.status) == (0, 200), r
    assert hashlib.sha256(r.body).hexdigest() == stream_sha256(DOWNLOAD, 4)


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_identity_headers_set_and_forged_ones_stripped(site, connector, http):
    r = curl(site, site.path('echo-headers?a=1&b=%20x'),
             '-H', 'CMG-Client-Cert-Thumbprint: forged', '-H', 'CMG-Client-Subject: CN=forged',
             '-H', 'cmg-anything: x', '-H', 'X-Forwarded-For: 203.0.113.9',
             '-H', 'X-Device-Header: kept', http=http)
    assert (r.rc, r.status) == (0, 200), r
    seen = json.loads(r.body)
    headers = {}
    for k, v in seen['headers']:
        headers.setdefault(k.lower(), []).append(v)

    assert seen['path'] == '/echo-headers?a=1&b=%20x'
    assert headers.get('x-device-header') == ['kept']
    cmg = {k for k in headers if k.startswith('cmg-')}
    assert cmg == {'cmg-client-auth', 'cmg-client-device-id', 'cmg-client-cert-thumbprint',
                   'cmg-client-subject'}, headers
    assert headers['cmg-client-auth'] == ['cert']
    assert headers['cmg-client-device-id'] == ['cert:' + site.device_thumbprint()]
    assert len(headers['cmg-client-cert-thumbprint']) == 1
    assert headers['cmg-client-cert-thumbprint'][0].lower().replace(':', '') == site.device_thumbprint()
    cn = x509.load_pem_x509_certificate(site.device_cert.read_bytes()).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME)[0].value
    assert headers['cmg-client-subject'] != ['CN=forged'] and cn in headers['cmg-client-subject'][0]
    # the gateway appends the address it saw, whatever the device claimed
    xff = ','.join(headers['x-forwarded-for'])
    assert xff.split(',')[-1].strip() == '127.0.0.1', xff


def test_keep_alive(site, connector, svc):
    before = svc.count
    conn = DeviceConnection(site)
    try:
        conn.connect()
        sock = conn.sock
        for i in range(5):
            conn.request('GET', site.path('policy.xml'))
            r = conn.getresponse()
            assert (r.status, r.read()) == (200, POLICY)
            conn.request('POST', site.path('upload'), body=b'x' * (1000 + i))
            r = conn.getresponse()
            assert r.status == 200
            assert json.loads(r.read())['bytes'] == 1000 + i
            assert conn.sock is sock and not r.will_close, 'the gateway closed a kept-alive connection'
    finally:
        conn.close()
    assert svc.count == before + 10


def test_chunked_upload_on_keep_alive_connection(site, connector):
    conn = DeviceConnection(site)
    try:
        for size in (1, 70000, 300001):
            conn.request('POST', site.path('upload'), body=stream(size, 9), encode_chunked=True)
            r = conn.getresponse()
            assert r.status == 200
            assert json.loads(r.read()) == {'bytes': size, 'sha256': stream_sha256(size, 9)}
    finally:
        conn.close()


def test_expect_100_continue(site, connector, tmp_path):
    body = tmp_path / 'body'
    body.write_bytes(b''.join(stream(2 << 20, 5)))
    r = curl(site, site.path('upload'), '-v', '-H', 'Expect: 100-continue', '--expect100-timeout', '10',
             '--data-binary', f'@{body}')
    assert (r.rc, r.status) == (0, 200), r
    assert 'HTTP/1.1 100' in r.stderr, 'no 100 Continue before the body'
    assert json.loads(r.body) == {'bytes': 2 << 20, 'sha256': stream_sha256(2 << 20, 5)}


def test_expect_100_continue_refused_without_certificate(site, connector, svc, tmp_path):
    body = tmp_path / 'body'
    body.write_bytes(b'y' * (1 << 20))
    before = svc.count
    r = curl(site, site.path('upload'), '-v', '-H', 'Expect: 100-continue', '--expect100-timeout', '10',
             '--data-binary', f'@{body}', cert=False)
    assert r.status == 401, r
    assert 'HTTP/1.1 100' not in r.stderr, 'told to send the body of a request it refuses'
    assert svc.count == before


def test_gateway_certificate_from_pfx(procs, site, svc):
    """Administrators export the server certificate as a PKCS#12 file."""
    key = serialization.load_pem_private_key(site.dir.joinpath('gateway.key').read_bytes(), None)
    pem = site.dir.joinpath('gateway.crt').read_bytes()
    certs = [x509.load_pem_x509_certificate(part + END) for part in pem.split(END) if part.strip()]
    pfx = pkcs12.serialize_key_and_certificates(b'gateway', key, certs[0], certs[1:] or None,
                                                serialization.BestAvailableEncryption(b'pfx-secret'))
    site.dir.joinpath('gateway.pfx').write_bytes(pfx)
    os.chmod(site.dir / 'gateway.pfx', 0o600)
    ini_set(site.gateway_conf, 'gateway', 'cert', 'gateway.pfx')
    ini_set(site.gateway_conf, 'gateway', 'key')
    ini_set(site.gateway_conf, 'gateway', 'cert_password', 'pfx-secret')
    bring_up(procs, site)
    r = curl(site, site.path('policy.xml'))
    assert (r.rc, r.status, r.body) == (0, 200, POLICY), r
