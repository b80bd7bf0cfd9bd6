"""Which requests go where: unmapped paths are refused at the gateway; no connector means
503 and a returning connector is used again; several connectors share a role round-robin."""
import signal
import threading
import time

import pytest

from cmgtest import InternalService, Site, bring_up, poll, poll_request, request, start_connector
from internal_service import POLICY


@pytest.mark.parametrize('path', [
    '/',
    '/CCM_Proxy_MutualAuth/72057594037999999/policy.xml',    # a role id nobody published
    '/CCM_Proxy_MutualAuth/{role}0/policy.xml',              # a published id as mere prefix
    '/CCM_Proxy_MutualAuth/',
    '/CCM_Proxy_Other/{role}/policy.xml',
    '/SMS_MP/.sms_aut?MPLIST',
    '/policy.xml',
])
def test_unmapped_path_is_404_and_not_forwarded(site, connector, svc, path):
    before = svc.count
    r = request(site, 'GET', path.format(role=site.role_ids[0]))
    assert r.status == 404, r
    assert svc.count == before, 'the request was forwarded'


def test_each_role_goes_to_its_internal_service(procs, tmp_path, svc):
    svc_b = InternalService(procs, 'svc-b')
    site = Site(tmp_path / 'site', [svc.url, svc_b.url], procs)
    bring_up(procs, site)
    for i, name in ((0, b'svc-a'), (1, b'svc-b'), (0, b'svc-a')):
        r = request(site, 'GET', site.path('whoami', i))
        assert (r.status, r.body) == (200, name)


def test_internal_base_path(procs, tmp_path, svc):
    """--mp http://host:port/base/: /CCM_Proxy_MutualAuth/<role>/rest goes to /base/rest."""
    site = Site(tmp_path / 'site', [svc.url + 'base/'], procs)
    bring_up(procs, site)
    r = request(site, 'GET', site.path('echo-headers?x=1'))
    assert r.status == 404 and r.body.startswith(b'internal-service'), r   # the service's own 404
    assert svc.stats()['paths'][-1] == '/base/echo-headers?x=1'


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL], ids=['SIGTERM', 'SIGKILL'])
def test_connector_gone_503_then_back_without_gateway_restart(procs, site, gateway, connector, sig):
    connector.signal(sig, wait=False)
    poll_request(procs, site, site.path('policy.xml'), lambda r: r.status == 503, 1.0,
                 '503 after the connector was stopped')
    connector.popen.wait(10)

    started = time.monotonic()
    start_connector(procs, site.connector_conf)
    r = poll_request(procs, site, site.path('policy.xml'), lambda r: r.status == 200, 5.0,
                     'a request to succeed after the connector started again')
    assert r.body == POLICY
    assert gateway.alive(), 'the gateway was restarted'
    print(f'503 after stop; 200 again {time.monotonic() - started:.2f} s after the connector started')


def test_in_flight_request_gets_502_when_tunnel_is_lost(site, connector, svc):
    result = {}
    t = threading.Thread(target=lambda: result.update(r=request(site, 'GET', site.path('delay?ms=8000'))))
    t.start()
    poll(lambda: '/delay?ms=8000' in svc.stats()['paths'], 5, 'the slow request to reach the service')
    lost = time.monotonic()
    connector.signal(signal.SIGKILL)
    t.join(10)
    assert 'r' in result, 'no response after the tunnel was lost'
    assert result['r'].status == 502, result['r']
    assert time.monotonic() - lost < 3, 'the gateway waited for the dead tunnel'


def whoami(site):
    r = request(site, 'GET', site.path('whoami'))
    assert r.status == 200, r
    return r.body.decode()


def test_two_connectors_alternate_and_survive_kill_9(procs, site, connector, svc):
    svc_b = InternalService(procs, 'svc-b')
    conf_b = site.connector_copy('connector-b', [svc_b.url])
    connector_b = start_connector(procs, conf_b, 'connector-b')
    seen = set()
    poll(lambda: seen.add(whoami(site)) or seen == {'svc-a', 'svc-b'}, 10,
         'both connectors to serve', interval=0.05, check=procs.check)

    answers = [whoami(site) for _ in range(10)]
    assert set(answers) == {'svc-a', 'svc-b'}, answers
    assert all(a != b for a, b in zip(answers, answers[1:])), f'not round-robin: {answers}'

    connector_b.signal(signal.SIGKILL)
    answers = [request(site, 'GET', site.path('whoami')) for _ in range(20)]
    assert [(r.status, r.body) for r in answers] == [(200, b'svc-a')] * 20, answers


def test_two_gateway_instances_share_the_device_port(procs, tmp_path, svc):
    """Instances 0 and 1 share the device port (SO_REUSEPORT), each with its own tunnel port,
    and the connector dials both: with either one stopped, devices are still served."""
    site = Site(tmp_path / 'site', [svc.url], procs, instances=2)
    (gw0, gw1), _ = bring_up(procs, site, instances=2)
    poll(lambda: all(request(site, 'GET', site.path('policy.xml')).status == 200 for _ in range(10)), 10,
         'both instances to serve', check=procs.check)
    gw0.signal(signal.SIGTERM)
    answers = [request(site, 'GET', site.path('policy.xml')) for _ in range(20)]
    assert [(r.status, r.body) for r in answers] == [(200, POLICY)] * 20, answers
    assert gw1.alive()
