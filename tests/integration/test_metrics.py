"""Metrics and health on every role (issue 13, item 1): each role serves, on its own
`metrics_listen` address (plain HTTP on loopback), /metrics in the Prometheus text format
(`promtool check metrics` finds nothing to say), /healthz and /readyz.

Readiness: a gateway is 503 while it starts (no tunnel yet) and while it drains; a connector
is 503 while it drains; the site is 200 once it serves. A real Prometheus server scrapes the
gateway and the connector every second while the test makes N device requests: its query
API shows the request counters of both up by exactly N, and the gateway's response bytes
(egress) up by exactly what the devices downloaded."""
import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

from cmgtest import (SLOW, bring_up, free_port, ini_set, poll, request, start_connector,
                     start_gateway)
from sitetest import Deployment

N = 20
SIZE = 4321   # bytes of each download


def http_get(port, path, timeout=5):
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text, name):
    """{labels: value} of metric `name` in an exposition."""
    found = {}
    for m in re.finditer(rf'^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$', text, re.M):
        found[m.group(1) or ''] = float(m.group(2))
    return found


def total(port, name):
    return sum(samples(http_get(port, '/metrics')[1], name).values())


def promtool_check(text):
    r = subprocess.run(['promtool', 'check', 'metrics'], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        f'promtool check metrics: exit {r.returncode}\n{r.stdout}\n{r.stderr}'


class Ports:
    def __init__(self):
        self.gateway, self.connector, self.site = free_port(), free_port(), free_port()


def deployment(procs, tmp_path, svc, drain_timeout=None):
    """A site, gateway and connector whose metrics listen on ports of their own; not started."""
    d = Deployment(procs, tmp_path, svc, start=False)
    ports = Ports()
    ini_set(d.site.gateway_conf, 'gateway', 'metrics_listen', f'127.0.0.1:{ports.gateway}')
    ini_set(d.site.connector_conf, 'connector', 'metrics_listen', f'127.0.0.1:{ports.connector}')
    ini_set(d.site.dir / 'site.conf', 'site', 'metrics_listen', f'127.0.0.1:{ports.site}')
    if drain_timeout:
        ini_set(d.site.gateway_conf, 'gateway', 'drain_timeout', drain_timeout)
        ini_set(d.site.connector_conf, 'connector', 'drain_timeout', drain_timeout)
    return d, ports


def start_all(d):
    d.start_site()
    d.gateway, d.connector = bring_up(d.procs, d.site)
    d.wait_policy()


def test_health_readiness_and_promtool(procs, tmp_path, svc):
    d, ports = deployment(procs, tmp_path, svc)
    d.start_site()
    gateway = start_gateway(procs, d.site)
    # The metrics listener opens just after the tunnel listener that start_gateway waits for.
    poll(lambda: 'metrics and health checks served on' in gateway.log_text(), 10 * SLOW,
         'the gateway to serve its metrics', check=procs.check)
    # Started, no tunnel yet: alive, not ready, and its metrics already well formed.
    assert http_get(ports.gateway, '/healthz') == (200, 'ok\n')
    status, body = http_get(ports.gateway, '/readyz')
    assert status == 503 and 'starting' in body, body
    text = http_get(ports.gateway, '/metrics')[1]
    promtool_check(text)
    assert samples(text, 'cmg_gateway_state') == {'{state="starting"}': 1, '{state="serving"}': 0,
                                                  '{state="draining"}': 0}
    d.connector = start_connector(procs, d.site.connector_conf)
    d.gateway = [gateway]
    d.wait_policy()
    poll(lambda: http_get(ports.gateway, '/readyz')[0] == 200, 15 * SLOW, 'the gateway to be ready',
         check=procs.check)
    for port in (ports.connector, ports.site):
        assert http_get(port, '/healthz') == (200, 'ok\n')
        assert http_get(port, '/readyz') == (200, 'ready\n')

    # Traffic of each kind: relayed (certificate, 2xx), refused (no mapping), HTTP/2.
    assert request(d.site, 'GET', d.site.path(f'download?size={SIZE}')).status == 200
    assert request(d.site, 'GET', '/CCM_Proxy_MutualAuth/999/x').status == 404
    r = subprocess.run(['curl', '-sS', '--http2', '-o', '/dev/null', '-w', '%{http_version} %{http_code} %{size_download}',
                        '--resolve', f'{d.site.name}:{d.site.port}:127.0.0.1', '--cacert', d.site.ca,
                        '--cert', d.site.device_cert, '--key', d.site.device_key,
                        f'https://{d.site.name}:{d.site.port}{d.site.path("policy.xml")}'],
                       capture_output=True, text=True, timeout=30)
    version, status, h2_bytes = r.stdout.split()
    assert (version, status) == ('2', '200'), r
    h2_bytes = int(h2_bytes)

    role = d.site.role_ids[0]
    relayed = f'{{role="{role}",code="2xx",auth="certificate"}}'
    poll(lambda: samples(http_get(ports.gateway, '/metrics')[1], 'cmg_gateway_requests_total')
         .get(relayed) == 2, 5 * SLOW, 'the gateway to count both requests', check=procs.check)
    texts = {role: http_get(port, '/metrics')[1] for role, port in
             (('gateway', ports.gateway), ('connector', ports.connector), ('site', ports.site))}
    for text in texts.values():
        promtool_check(text)
    g, c, s = texts['gateway'], texts['connector'], texts['site']
    assert samples(g, 'cmg_gateway_requests_total') == {relayed: 2}
    assert samples(g, 'cmg_gateway_refusals_total')['{reason="CMGService_No_Mapping"}'] == 1
    assert samples(g, 'cmg_gateway_device_connections_total')['{protocol="h2"}'] == 1
    assert samples(g, 'cmg_gateway_response_bytes_total') == {f'{{role="{role}"}}': SIZE + h2_bytes}
    assert samples(g, 'cmg_gateway_tunnels') == {'{connector="connector-1",state="ready"}': 1}
    assert samples(g, 'cmg_gateway_request_duration_seconds_count') == {f'{{role="{role}"}}': 2}
    version = d.policy_version()
    for text in (g, c, s):
        assert samples(text, 'cmg_policy_version') == {'': version}
        assert 0 <= samples(text, 'cmg_policy_age_seconds')[''] < 600
        assert re.search(r'^cmg_build_info\{version="[^"]+",role="\w+"\} 1$', text, re.M)
        assert samples(text, 'cmg_certificate_not_after_seconds')
    assert samples(c, 'cmg_connector_tunnels')[
        f'{{gateway="127.0.0.1:{d.site.tunnel_port}",state="up"}}'] == 1
    assert samples(c, 'cmg_connector_requests_total') == {f'{{role="{role}",code="2xx"}}': 2}
    # No device id in any label: only role ids, connector names, reason tokens.
    assert d.site.device_thumbprint() not in g and 'device1' not in g

    # Hostile clients of the listener: garbage is answered 400 and closed; an oversized head
    # is closed (with a 400, unless the reset of the unread rest overtakes it). The listener
    # serves on.
    for junk, whole in ((b'\x16\x03\x01junk\r\n\r\n', True),
                        (b'GET /metrics HTTP/1.1\r\nX: ' + b'a' * 20000 + b'\r\n\r\n', False)):
        answer = b''
        with socket.create_connection(('127.0.0.1', ports.gateway), timeout=5) as sock:
            try:
                sock.sendall(junk)
                while chunk := sock.recv(4096):
                    answer += chunk
            except (ConnectionResetError, BrokenPipeError):
                assert not whole, 'reset instead of a 400'
        assert answer.startswith(b'HTTP/1.1 400 ') or (not whole and not answer), answer
    assert http_get(ports.gateway, '/healthz') == (200, 'ok\n')

    # Only GET of the three paths.
    assert http_get(ports.gateway, '/other')[0] == 404
    req = urllib.request.Request(f'http://127.0.0.1:{ports.gateway}/metrics', method='POST')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405
    # no request to it has a body: one is refused before it is buffered
    req = urllib.request.Request(f'http://127.0.0.1:{ports.gateway}/metrics', method='POST', data=b'x')
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 413
    # HEAD: the headers alone, so a kept-alive connection stays framed
    conn = http.client.HTTPConnection('127.0.0.1', ports.gateway, timeout=5)
    conn.request('HEAD', '/healthz')
    r = conn.getresponse()
    assert r.status == 200 and r.read() == b''
    conn.request('GET', '/healthz')
    assert conn.getresponse().read() == b'ok\n'
    conn.close()


def in_flight(procs, d, port, what):
    """A device request held by the internal service (3 s) in a thread: once the service
    has it (so a drain cannot refuse it unstarted) and the gateway's metrics count it in
    flight. Returns the thread and where its status lands."""
    result = {}
    seen = d.svc.count

    def run():
        result['status'] = request(d.site, 'GET', d.site.path('delay?ms=3000')).status
    t = threading.Thread(target=run)
    t.start()
    poll(lambda: d.svc.count > seen and total(port, 'cmg_gateway_requests_in_flight') == 1,
         5 * SLOW, f'the request in flight ({what})', check=procs.check)
    return t, result


def test_readyz_503_while_draining(procs, tmp_path, svc):
    d, ports = deployment(procs, tmp_path, svc, drain_timeout=10)
    start_all(d)
    assert http_get(ports.connector, '/readyz')[0] == 200

    # The connector drains: 503 while its request finishes, then it exits.
    t, result = in_flight(procs, d, ports.gateway, 'connector drain')
    d.connector.signal(signal.SIGTERM, wait=False)
    poll(lambda: http_get(ports.connector, '/readyz') == (503, 'not ready: draining\n'), 5 * SLOW,
         'the draining connector to say 503', check=procs.check)
    assert http_get(ports.connector, '/healthz')[0] == 200
    t.join(15)
    assert result.get('status') == 200
    assert d.connector.popen.wait(10 * SLOW) == 0
    # Its gateway has no tunnel left: not ready either.
    status, body = http_get(ports.gateway, '/readyz')
    assert status == 503 and 'no tunnel' in body, body

    d.connector = start_connector(procs, d.site.connector_conf, name='connector2')
    poll(lambda: http_get(ports.gateway, '/readyz')[0] == 200, 15 * SLOW,
         'the gateway to be ready again', check=procs.check)
    # The gateway drains: 503 while its request finishes.
    t, result = in_flight(procs, d, ports.gateway, 'gateway drain')
    gateway = d.gateway[0]
    gateway.signal(signal.SIGTERM, wait=False)
    poll(lambda: http_get(ports.gateway, '/readyz') == (503, 'not ready: draining\n'), 5 * SLOW,
         'the draining gateway to say 503', check=procs.check)
    assert samples(http_get(ports.gateway, '/metrics')[1], 'cmg_gateway_state')['{state="draining"}'] == 1
    t.join(15)
    assert result.get('status') == 200
    assert gateway.popen.wait(10 * SLOW) == 0


PROMETHEUS_CONFIG = '''global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: cmg
    static_configs:
      - targets: ['127.0.0.1:{gateway}', '127.0.0.1:{connector}']
'''


class Prometheus:
    def __init__(self, procs, tmp_path, ports):
        self.port = free_port()
        conf = tmp_path / 'prometheus.yml'
        conf.write_text(PROMETHEUS_CONFIG.format(gateway=ports.gateway, connector=ports.connector))
        self.proc = procs.start('prometheus', [
            'prometheus', f'--config.file={conf}', f'--storage.tsdb.path={tmp_path / "tsdb"}',
            f'--web.listen-address=127.0.0.1:{self.port}'])
        self.procs = procs

    def query(self, q):
        """The instant vector of q, as {job-free labels: value}; None while not serving."""
        url = f'http://127.0.0.1:{self.port}/api/v1/query?' + urllib.parse.urlencode({'query': q})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                doc = json.loads(r.read())
        except (OSError, ValueError):
            return None
        assert doc['status'] == 'success', doc
        return {json.dumps({k: v for k, v in s['metric'].items() if k not in ('job', 'instance')},
                           sort_keys=True): float(s['value'][1]) for s in doc['data']['result']}

    def value(self, q):
        r = self.query(q)
        return None if not r else sum(r.values())

    def wait_for(self, q, want, what):
        poll(lambda: self.value(q) == want, 15 * SLOW, f'Prometheus to see {what} = {want} '
             f'(it sees {self.value(q)})', interval=0.2, check=self.procs.check)


def test_prometheus_scrapes_the_request_counters(procs, tmp_path, svc):
    d, ports = deployment(procs, tmp_path, svc)
    start_all(d)
    prom = Prometheus(procs, tmp_path, ports)
    prom.wait_for('count(up == 1)', 2, 'both targets up')

    role = d.site.role_ids[0]
    queries = {
        'gateway requests': f'sum(cmg_gateway_requests_total{{role="{role}"}})',
        'connector requests': f'sum(cmg_connector_requests_total{{role="{role}"}})',
        'gateway egress': f'sum(cmg_gateway_response_bytes_total{{role="{role}"}})',
        'connector bytes': f'sum(cmg_connector_response_bytes_total{{role="{role}"}})',
    }
    metric_of = {what: re.match(r'sum\((\w+)', q).group(1) for what, q in queries.items()}
    port_of = {what: ports.gateway if what.startswith('gateway') else ports.connector for what in queries}
    # Prometheus has the latest of each before the traffic.
    before = {what: total(port_of[what], metric_of[what]) for what in queries}
    for what, q in queries.items():
        prom.wait_for(q, before[what], what)
    seen = svc.count

    for _ in range(N):
        r = request(d.site, 'GET', d.site.path(f'download?size={SIZE}'))
        assert r.status == 200 and len(r.body) == SIZE

    assert svc.count == seen + N
    prom.wait_for(queries['gateway requests'], before['gateway requests'] + N, 'gateway requests')
    prom.wait_for(queries['connector requests'], before['connector requests'] + N, 'connector requests')
    prom.wait_for(queries['gateway egress'], before['gateway egress'] + N * SIZE, 'gateway egress')
    prom.wait_for(queries['connector bytes'], before['connector bytes'] + N * SIZE, 'connector bytes')
    # Tunnels and their round trip, per connector and per gateway instance.
    assert prom.value('cmg_gateway_tunnels{connector="connector-1",state="ready"}') == 1
    assert prom.value(f'cmg_connector_tunnels{{state="up"}}') == 1
    prom.wait_for('count(cmg_gateway_tunnel_rtt_seconds > 0)', 1, 'a round trip at the gateway')
    prom.wait_for('count(cmg_connector_tunnel_rtt_seconds > 0)', 1, 'a round trip at the connector')
