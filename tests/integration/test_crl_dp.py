"""The CRL distribution point the gateway serves: GET and HEAD of /CCM_CRL/site.crl on the
device port, to anyone (no credential), over HTTP/1.1 and HTTP/2, answered by the gateway from
the policy in force and never forwarded; the certificates the site issues name it; and a
connector revoked by either command ('connector revoke NAME', 'cert revoke --serial') is in
the CRL and in the policy's revoked_connectors alike."""
import base64
import json
import re
import subprocess
import time

import pytest

from cmgtest import SLOW, DeviceConnection, curl, poll, run_cmg
from sitetest import Deployment

CRL_PATH = '/CCM_CRL/site.crl'


@pytest.fixture
def dep(procs, tmp_path, svc):
    return Deployment(procs, tmp_path, svc)


def fetch(site, tmp_path, http='1.1', method='GET'):
    """The CRL path without a client certificate: (curl result, response headers)."""
    hdr = tmp_path / f'headers-{http}-{method}'
    args = ['-D', hdr] + (['-I'] if method == 'HEAD' else ['-X', method] if method != 'GET' else [])
    r = curl(site, CRL_PATH, *[str(a) for a in args], http=http, cert=False)
    headers = {}
    for line in hdr.read_text().splitlines()[1:]:
        if ':' in line:
            name, value = line.split(':', 1)
            headers[name.strip().lower()] = value.strip()
    return r, headers


def openssl_crl(der, *args):
    """`openssl crl -inform DER` over der; its stdout (it must succeed)."""
    p = subprocess.run(['openssl', 'crl', '-inform', 'DER', '-noout', *map(str, args)],
                       input=der, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode() + p.stderr.decode()


def crl_serials(der):
    text = openssl_crl(der, '-text')
    return {s.upper().lstrip('0') for s in re.findall(r'Serial Number: ([0-9A-Fa-f]+)', text)}


def served_serials(site, tmp_path):
    r, _ = fetch(site, tmp_path)
    assert r.status == 200, r
    return crl_serials(r.body)


def cert_text(path):
    p = subprocess.run(['openssl', 'x509', '-noout', '-text', '-in', str(path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout


def cert_serial(path):
    p = subprocess.run(['openssl', 'x509', '-noout', '-serial', '-in', str(path)],
                       capture_output=True, text=True)
    return p.stdout.strip().split('=', 1)[1].upper().lstrip('0')


def gateway_policy(dep):
    """The payload of the signed policy the gateway holds (its cache)."""
    jws = (dep.site.dir / 'policy-cache.jws').read_text().strip()
    payload = jws.split('.')[1]
    return json.loads(base64.urlsafe_b64decode(payload + '=' * (-len(payload) % 4)))


def test_served_to_anyone_over_http1_and_http2(dep, tmp_path):
    """No client certificate: 200, application/pkix-crl, its length, a max-age no longer
    than until nextUpdate; a DER CRL that openssl parses and that verifies with the site
    CA; HEAD gives the same head without a body; the internal service sees none of it."""
    before = dep.svc.count
    for http in ('1.1', '2'):
        r, h = fetch(dep.site, tmp_path, http)
        assert r.status == 200 and r.version == ('2' if http == '2' else '1.1'), r
        assert h['content-type'] == 'application/pkix-crl', h
        assert int(h['content-length']) == len(r.body) > 0, h
        crl = r.body
        text = openssl_crl(r.body, '-text', '-CAfile', dep.site.ca)
        assert 'verify OK' in text, text
        next_update = re.search(r'Next Update: (.+)', text).group(1).strip()
        until = time.mktime(time.strptime(next_update, '%b %d %H:%M:%S %Y GMT')) - time.timezone
        max_age = int(re.fullmatch(r'max-age=(\d+)', h['cache-control']).group(1))
        assert 0 < max_age <= until - time.time() + 5, (max_age, next_update)

        head, hh = fetch(dep.site, tmp_path, http, method='HEAD')
        # curl -I prints the head where the body would go: nothing follows it
        assert head.status == 200 and head.body.endswith(b'\r\n\r\n'), head
        assert head.body.count(b'\r\n\r\n') == 1, head
        assert hh['content-type'] == 'application/pkix-crl'
        assert int(hh['content-length']) == len(r.body), hh

        post, _ = fetch(dep.site, tmp_path, http, method='POST')
        assert post.status == 405 and b'CMGService_Method_Not_Allowed' in post.body, post
    # a cache's query string changes nothing; a path beside it is no CRL
    r = curl(dep.site, CRL_PATH + '?x=1', cert=False)
    assert r.status == 200 and crl_serials(r.body) == set(), r
    for other in ('/CCM_CRL/site.crl/', '/CCM_CRL/other.crl', '/CCM_CRL/'):
        r = curl(dep.site, other, cert=False)
        assert r.status == 404 and b'CMGService_No_Mapping' in r.body, (other, r)
    # HTTP/1.1: the connection goes on after the CRL and after HEAD (kept alive, in step)
    conn = DeviceConnection(dep.site, cert=False)
    try:
        for method in ('HEAD', 'GET', 'HEAD', 'GET'):
            conn.request(method, CRL_PATH)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200 and len(body) == (0 if method == 'HEAD' else len(crl))
    finally:
        conn.close()
    assert dep.svc.count == before


def test_revoked_serial_listed_within_seconds(dep, tmp_path):
    """'cert revoke' of a certificate the site issued: the served CRL lists its serial
    within a few seconds (site re-signs, connector carries, gateway serves)."""
    assert served_serials(dep.site, tmp_path) == set()
    dep.cmg_site('cert', 'issue', '--device', 'lab1')
    serial = cert_serial(dep.site.dir / 'devices' / 'lab1.crt')
    start = time.monotonic()
    dep.cmg_site('cert', 'revoke', '--serial', serial)
    poll(lambda: serial in served_serials(dep.site, tmp_path), 10 * SLOW,
         'the served CRL to list the revoked serial')
    took = time.monotonic() - start
    assert took < 5 * SLOW, took
    # the sample device of 'site init' too
    sample = cert_serial(dep.site.device_cert)
    dep.cmg_site('cert', 'revoke', '--cert', dep.site.device_cert)
    poll(lambda: served_serials(dep.site, tmp_path) == {serial, sample}, 10 * SLOW,
         'the served CRL to list both serials')


def test_no_crl_in_the_policy_is_404(site, gateway, tmp_path):
    """A gateway on its local policy (no site has published one) has no CRL to serve."""
    for http in ('1.1', '2'):
        r, _ = fetch(site, tmp_path, http)
        assert r.status == 404 and b'CMGService_No_CRL' in r.body, r


def test_certificates_name_the_crl_url(dep, tmp_path):
    """Every client certificate that 'site init' and later commands issue names the
    gateway's CRL URL (its device port). The CA (the trust anchor) names none, nor do the
    server certificates: the gateway's and the site's would send a client checking them
    to fetch the CRL over TLS from the server being checked."""
    d = dep.site.dir
    url = f'https://{dep.site.name}:{dep.site.port}{CRL_PATH}'
    dep.cmg_site('connector', 'add', 'c2')
    dep.cmg_site('cert', 'issue', '--device', 'lab2')
    for crt in ('connector.crt', 'devices/device1.crt', 'connectors/c2.crt', 'devices/lab2.crt'):
        text = cert_text(d / crt)
        assert 'X509v3 CRL Distribution Points' in text and f'URI:{url}\n' in text, (crt, text)
    for crt in ('ca.crt', 'gateway.crt', 'site.crt'):
        assert 'CRL Distribution Points' not in cert_text(d / crt), crt
    # the URL served is the one named
    r = subprocess.run(['curl', '-sS', '--resolve', f'{dep.site.name}:{dep.site.port}:127.0.0.1',
                        '--cacert', str(dep.site.ca), '-o', '/dev/null', '-w', '%{http_code}',
                        url], capture_output=True, text=True)
    assert r.stdout == '200', r


def test_port_443_is_not_named(tmp_path):
    """On the default HTTPS port the URL has no port."""
    r = run_cmg('site', 'init', tmp_path / 's443', '--service-name', 'cmg.example',
                '--gateway-port', '443')
    assert r.returncode == 0, r.stderr
    text = cert_text(tmp_path / 's443' / 'devices' / 'device1.crt')
    assert 'URI:https://cmg.example/CCM_CRL/site.crl\n' in text, text


def test_connector_revoked_either_way_is_in_the_crl_and_the_policy(dep, tmp_path):
    """'connector revoke NAME' and 'cert revoke --serial <its serial>' do the same: the
    serial in the CRL and in revoked_connectors, and 'connector list' shows it revoked;
    revoking it again by the other command says it is revoked already."""
    d = dep.site.dir
    dep.cmg_site('connector', 'add', 'c2')
    dep.cmg_site('connector', 'add', 'c3')
    s2, s3 = cert_serial(d / 'connectors/c2.crt'), cert_serial(d / 'connectors/c3.crt')
    v = dep.policy_version()
    dep.cmg_site('connector', 'revoke', 'c2')
    r = dep.cmg_site('cert', 'revoke', '--serial', s3)
    assert s3 in r.stdout, r.stdout
    dep.wait_policy(after=v + 1)
    poll(lambda: served_serials(dep.site, tmp_path) == {s2, s3}, 10 * SLOW,
         'the served CRL to list both connectors')
    poll(lambda: {s2, s3} <= set(gateway_policy(dep).get('revoked_connectors', [])), 5 * SLOW,
         'revoked_connectors to list both')
    listed = {c['name']: c['revoked'] for c in
              json.loads(dep.cmg_site('connector', 'list', '--json').stdout)}
    assert listed['c2'] and listed['c3'] and not listed['connector-1'], listed
    again = dep.cmg_site('cert', 'revoke', '--serial', s2, check=False)
    assert again.returncode != 0 and 'revoked already' in again.stderr, again
    again = dep.cmg_site('connector', 'revoke', 'c3', check=False)
    assert again.returncode != 0 and 'revoked already' in again.stderr, again
    # by its certificate file too
    dep.cmg_site('connector', 'add', 'c4')
    s4 = cert_serial(d / 'connectors/c4.crt')
    dep.cmg_site('cert', 'revoke', '--cert', d / 'connectors/c4.crt')
    listed = {c['name']: c['revoked'] for c in
              json.loads(dep.cmg_site('connector', 'list', '--json').stdout)}
    assert listed['c4'], listed
    poll(lambda: s4 in served_serials(dep.site, tmp_path), 10 * SLOW, 'c4 in the CRL')
