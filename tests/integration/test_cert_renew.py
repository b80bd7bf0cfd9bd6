"""`cmg site cert renew gateway|connector NAME|site` + SIGHUP under load: no request fails,
every download is whole, new handshakes present the new certificates, a new tunnel is made
with the connector's new one; a reload with a key that does not match its certificate
changes nothing, says why, and the role serves on."""
import json
import signal
import socket
import ssl
import time

from cryptography import x509

import cmgtest
from cmgtest import SLOW, poll, request, tls_connect
from sitetest import Deployment, Device
from underload import Load


def cert_of(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def serial_hex(cert):
    return f'{cert.serial_number:X}'


def served_cert(site):
    """The certificate a new TLS handshake on the device port presents."""
    with tls_connect(site) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def feed_cert(d):
    """The certificate a new handshake on the site's feed presents (as connector-1)."""
    ctx = ssl.create_default_context(cafile=str(d.site.ca))
    ctx.load_cert_chain(d.site.dir / 'connector.crt', d.site.dir / 'connector.key')
    with ctx.wrap_socket(socket.create_connection(('127.0.0.1', d.feed_port), 5),
                         server_hostname='127.0.0.1') as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True))


def reload_and_wait(proc, what):
    """SIGHUP, then wait for `what` in what the process logged after it."""
    before = proc.log_text().count('SIGHUP received')
    proc.popen.send_signal(signal.SIGHUP)
    poll(lambda: proc.log_text().count('SIGHUP received') > before
         and what in proc.log_text().split('SIGHUP received')[-1], 10 * SLOW,
         f'{proc.name} to log {what!r} after SIGHUP')
    return proc.log_text().split('SIGHUP received')[-1]


def renew(d, *args):
    r = d.cmg_site('cert', 'renew', *args)
    assert 'next: send SIGHUP' in r.stdout, r.stdout
    return r.stdout


def cert_rows(d):
    return json.loads(d.cmg_site('cert', 'list', '--json').stdout)


def test_renew_and_reload_every_role_under_load(procs, tmp_path, svc):
    d = Deployment(procs, tmp_path, svc)
    site, (gw,), cn = d.site, d.gateway, d.connector
    old_gw, old_cn, old_site = (cert_of(site.dir / f) for f in
                                ('gateway.crt', 'connector.crt', 'site.crt'))
    assert serial_hex(served_cert(site)) == serial_hex(old_gw)
    time.sleep(1.1)   # a new validity starts a whole second after the old one

    with Load(site) as load:
        time.sleep(1)
        out = renew(d, 'gateway')
        assert 'systemctl reload' in out and str(site.dir / 'gateway.crt.old') in out
        new_gw = cert_of(site.dir / 'gateway.crt')
        assert serial_hex(cert_of(site.dir / 'gateway.crt.old')) == serial_hex(old_gw)
        reload_and_wait(gw, 'reloaded')
        shown = served_cert(site)
        assert serial_hex(shown) == serial_hex(new_gw) != serial_hex(old_gw)
        assert shown.not_valid_after > old_gw.not_valid_after
        assert shown.subject == old_gw.subject
        assert shown.extensions.get_extension_for_class(x509.SubjectAlternativeName) == \
            old_gw.extensions.get_extension_for_class(x509.SubjectAlternativeName)

        renew(d, 'connector', 'connector-1')
        new_cn = cert_of(site.dir / 'connector.crt')
        assert serial_hex(new_cn) != serial_hex(old_cn)
        assert serial_hex(new_cn) in reload_and_wait(cn, 'reloaded')

        renew(d, 'site')
        new_site = cert_of(site.dir / 'site.crt')
        assert serial_hex(new_site) in reload_and_wait(d.site_proc, 'reloaded')
        assert serial_hex(feed_cert(d)) == serial_hex(new_site) != serial_hex(old_site)
        time.sleep(1)
    load.assert_clean()
    print(load.summary())

    rows = {r['serial']: r for r in cert_rows(d) if r.get('serial')}
    for old, new, kind in ((old_gw, new_gw, 'gateway'), (old_cn, new_cn, 'connector'),
                           (old_site, new_site, 'site')):
        assert rows[serial_hex(new)]['kind'] == kind and not rows[serial_hex(new)].get('replaced')
        assert rows[serial_hex(new)]['not_after'] == \
            new.not_valid_after.strftime('%Y-%m-%dT%H:%M:%SZ')
        assert rows[serial_hex(old)]['kind'] == kind and rows[serial_hex(old)]['replaced']

    # The previous connector certificate revoked: the gateway closes the tunnel made with it,
    # the connector dials again with the new one; its feed requests carry the new one too
    # (the site refuses the revoked one, and says so).
    assert f'serial={serial_hex(old_cn)}' in gw.log_text()   # the tunnel up since the start
    mark = len(gw.log_text())
    d.cmg_site('cert', 'revoke', serial_hex(old_cn))
    poll(lambda: f'serial={serial_hex(new_cn)}' in gw.log_text()[mark:], 10 * SLOW,
         'a new tunnel with the new connector certificate', check=procs.check)
    assert f'serial={serial_hex(old_cn)}' not in gw.log_text()[mark:]
    cmgtest.wait_ready(procs, site)
    version = d.policy_version()
    d.cmg_site('mapping', 'add', '--type', 'mp', '--url', svc.url)
    d.wait_policy(after=version)
    poll(lambda: f'policy version {d.policy_version()} and its routes' in cn.log_text(),
         10 * SLOW, 'the connector to fetch the new policy', check=procs.check)
    assert request(site, 'GET', site.path('policy.xml')).status == 200
    # the registration service (a site route) is reached with the new certificate too
    _, bulk = d.bulk_token()
    d.register(Device(tmp_path, 'after-renewal'), bulk)
    assert 'revoked' not in d.site_proc.log_text(), d.site_proc.log_text()


def test_reload_with_a_key_that_does_not_match_changes_nothing(procs, tmp_path, svc):
    d = Deployment(procs, tmp_path, svc)
    site, (gw,), cn = d.site, d.gateway, d.connector
    before_gw, before_site = serial_hex(served_cert(site)), serial_hex(feed_cert(d))

    cmgtest.ini_set(site.gateway_conf, 'gateway', 'key', 'devices/device1.key')
    tail = reload_and_wait(gw, 'reload failed, nothing changed')
    assert 'device1.key' in tail, tail
    cmgtest.ini_set(site.connector_conf, 'connector', 'key', 'devices/device1.key')
    tail = reload_and_wait(cn, 'reload failed, nothing changed')
    assert 'device1.key' in tail and 'key values mismatch' in tail, tail
    key = site.dir / 'site.key'
    good = key.read_bytes()
    key.write_bytes((site.dir / 'devices' / 'device1.key').read_bytes())
    tail = reload_and_wait(d.site_proc, 'reload failed, nothing changed')
    assert 'site.key' in tail and 'key values mismatch' in tail, tail
    key.write_bytes(good)

    assert serial_hex(served_cert(site)) == before_gw
    assert serial_hex(feed_cert(d)) == before_site
    for _ in range(5):
        assert request(site, 'GET', site.path('policy.xml')).status == 200
    assert gw.alive() and cn.alive() and d.site_proc.alive()


def test_renew_names_what_exists(procs, tmp_path, svc):
    d = Deployment(procs, tmp_path, svc, start=False)
    r = d.cmg_site('cert', 'renew', 'connector', 'nope', check=False)
    assert r.returncode != 0 and 'connector-1' in r.stderr, r.stderr
    r = d.cmg_site('cert', 'renew', 'connector', check=False)
    assert r.returncode != 0 and 'connector-1' in r.stderr, r.stderr
    r = d.cmg_site('cert', 'renew', 'gateway', 'other.test', check=False)
    assert r.returncode != 0 and cmgtest.SERVICE_NAME in r.stderr, r.stderr
    r = d.cmg_site('cert', 'renew', 'gateway', cmgtest.SERVICE_NAME)
    assert 'gateway.crt.old' in r.stdout
    d.cmg_site('connector', 'add', 'edge-2')
    r = d.cmg_site('cert', 'renew', 'connector', 'edge-2')
    assert str(d.site.dir / 'connectors' / 'edge-2.crt') in r.stdout, r.stdout
    d.cmg_site('connector', 'revoke', 'edge-2')
    r = d.cmg_site('cert', 'renew', 'connector', 'edge-2', check=False)
    assert r.returncode != 0 and 'revoked' in r.stderr, r.stderr
    # the certificate the renewal replaced is revoked with its connector
    revoked = {row['serial'] for row in json.loads(
        d.cmg_site('cert', 'list', '--revoked', '--json').stdout)}
    old_edge = cert_of(d.site.dir / 'connectors' / 'edge-2.crt.old')
    assert serial_hex(old_edge) in revoked
