"""The gateway on IPv6: devices on `listen = [::1]:PORT` are served, and the internal service
learns the device's IPv6 address from X-Forwarded-For. The tunnel works over IPv6 too
(`tunnel_listen = ::1`, `gateway = [::1]:PORT` in connector.conf)."""
import json
import socket

import pytest

from cmgtest import bring_up, curl, ini_set, request
from internal_service import POLICY


def ipv6_loopback_problem():
    """Why ::1 cannot be used here, or None if it can."""
    if not socket.has_ipv6:
        return 'Python was built without IPv6'
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as server:
            server.bind(('::1', 0))
            server.listen(1)
            with socket.create_connection(server.getsockname()[:2], timeout=2):
                pass
    except OSError as e:
        return f'::1 is not usable on this host: {e}'
    return None


IPV6_PROBLEM = ipv6_loopback_problem()
pytestmark = pytest.mark.skipif(IPV6_PROBLEM is not None, reason=f'IPv6 loopback: {IPV6_PROBLEM}')


def forwarded_for(body):
    seen = json.loads(body)
    values = [v for k, v in seen['headers'] if k.lower() == 'x-forwarded-for']
    assert len(values) == 1, seen['headers']
    return values[0]


def devices_on_ipv6_only(site):
    ini_set(site.gateway_conf, 'gateway', 'listen', f'[::1]:{site.port}')
    site.addr = '::1'


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_device_on_ipv6(procs, site, http):
    devices_on_ipv6_only(site)
    gateways, _ = bring_up(procs, site)
    assert f'listening for devices on [::1]:{site.port}' in gateways[0].log_text()

    r = curl(site, site.path('policy.xml'), http=http)
    assert (r.rc, r.status, r.version, r.body) == (0, 200, http, POLICY), r
    r = curl(site, site.path('echo-headers'), '-H', 'X-Forwarded-For: 203.0.113.9', http=http)
    assert (r.rc, r.status) == (0, 200), r
    assert forwarded_for(r.body) == '::1'

    # and only there: nothing listens for devices on 127.0.0.1
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(('127.0.0.1', site.port), timeout=2).close()


def test_tunnel_on_ipv6(procs, site):
    devices_on_ipv6_only(site)
    ini_set(site.gateway_conf, 'gateway', 'tunnel_listen', '::1')
    ini_set(site.connector_conf, 'connector', 'gateway', f'[::1]:{site.tunnel_port}')
    gateways, connector = bring_up(procs, site)
    assert f'listening for connectors on [::1]:{site.tunnel_port}' in gateways[0].log_text()
    assert f'tunnel up: gateway=[::1]:{site.tunnel_port}' in connector.log_text()
    r = request(site, 'GET', site.path('echo-headers'))
    assert r.status == 200 and forwarded_for(r.body) == '::1', r
