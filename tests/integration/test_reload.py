"""SIGHUP: the gateway reads gateway.conf and its certificates again and applies all of it
or none; live connections, tunnels and downloads go on. The connector does the same with
connector.conf (test_cert_renew.py renews its certificate under load)."""
import signal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

import cmgtest
from cmgtest import SLOW, bring_up, ini_set, poll, request, tls_connect
from internal_service import stream_sha256


def site_ca(site):
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    key = serialization.load_pem_private_key((site.dir / 'ca.key').read_bytes(), None)
    return ca, key


def gateway_cert(site, name, **kw):
    """A server certificate of the site CA for the service name; returns (serial, crt, key)."""
    ca, key = site_ca(site)
    cert, _, (crt, pem) = cmgtest.make_cert(site.dir / name, site.name, ca, key,
                                            eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
                                            san=(site.name,), **kw)
    return cert.serial_number, crt, pem


def served_serial(site):
    with tls_connect(site) as s:
        return x509.load_der_x509_certificate(s.getpeercert(binary_form=True)).serial_number


def reload_and_wait(gw, what):
    before = gw.log_text().count('SIGHUP received')
    gw.popen.send_signal(signal.SIGHUP)
    poll(lambda: gw.log_text().count('SIGHUP received') > before
         and (what in gw.log_text().split('SIGHUP received')[-1]), 10 * SLOW, what)


def test_reload_applies_new_certificate_and_keeps_live_connections(procs, site, svc):
    (gw,), _ = bring_up(procs, site)
    old = served_serial(site)
    kept = cmgtest.DeviceConnection(site)
    kept.request('GET', site.path('policy.xml'))
    assert kept.getresponse().read()
    size = 24 * 1024 * 1024
    download = cmgtest.CurlProcess(site, site.path(f'download?size={size}&seed=7'),
                                   '--limit-rate', '8M')
    try:
        serial, crt, key = gateway_cert(site, 'gateway-next')
        ini_set(site.gateway_conf, 'gateway', 'cert', crt.name)
        ini_set(site.gateway_conf, 'gateway', 'key', key.name)
        ini_set(site.gateway_conf, 'gateway', 'header_timeout', 12)
        reload_and_wait(gw, 'reloaded')
        assert served_serial(site) == serial != old
        kept.request('GET', site.path('policy.xml'))   # the connection made before goes on
        r = kept.getresponse()
        assert r.status == 200 and r.read()
        assert request(site, 'GET', site.path('policy.xml')).status == 200   # tunnel kept
        result = download.wait()
        assert result.rc == 0, result
        assert download.received == size
        assert download.sha256 == stream_sha256(size, 7)
    finally:
        download.kill()
        kept.close()


def test_reload_is_all_or_nothing(procs, site, svc):
    (gw,), _ = bring_up(procs, site)
    old = served_serial(site)
    conf = site.gateway_conf.read_text()

    site.gateway_conf.write_text(conf + '\nno_such_key = 1\n')
    reload_and_wait(gw, 'reload failed, nothing changed')
    assert served_serial(site) == old

    _, crt, key = gateway_cert(site, 'gateway-expired', valid_from=-10, valid_days=5)
    site.gateway_conf.write_text(conf)
    ini_set(site.gateway_conf, 'gateway', 'cert', crt.name)
    ini_set(site.gateway_conf, 'gateway', 'key', key.name)
    reload_and_wait(gw, 'reload failed, nothing changed')
    assert 'expired' in gw.log_text().split('SIGHUP received')[-1]
    assert served_serial(site) == old
    assert request(site, 'GET', site.path('policy.xml')).status == 200

    site.gateway_conf.write_text(conf)
    ini_set(site.gateway_conf, 'gateway', 'listen', f'127.0.0.1:{cmgtest.free_port()}')
    reload_and_wait(gw, 'reloaded')
    assert 'listen changed: it applies at the next start' in gw.log_text()
    assert request(site, 'GET', site.path('policy.xml')).status == 200


def test_connector_reload_is_all_or_nothing(procs, site, svc):
    """SIGHUP on the connector: a key that does not match its certificate changes nothing and
    says which file; a good configuration is taken, the gateway lines kept and named."""
    _, connector = bring_up(procs, site)
    conf = site.connector_conf.read_text()

    ini_set(site.connector_conf, 'connector', 'key', 'devices/device1.key')
    reload_and_wait(connector, 'reload failed, nothing changed')
    tail = connector.log_text().split('SIGHUP received')[-1]
    assert 'device1.key' in tail and 'key values mismatch' in tail, tail
    assert connector.alive()
    assert request(site, 'GET', site.path('policy.xml')).status == 200

    site.connector_conf.write_text(conf)
    ini_set(site.connector_conf, 'connector', 'gateway', '127.0.0.1:1')
    ini_set(site.connector_conf, 'connector', 'upstream_timeout', 30)
    reload_and_wait(connector, 'reloaded')
    assert 'the gateway lines changed: they apply at the next start' in connector.log_text()
    assert request(site, 'GET', site.path('policy.xml')).status == 200
