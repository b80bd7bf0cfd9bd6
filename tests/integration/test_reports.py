"""Reports to the site, kept (issue 13, item 2). Two gateway instances and two connectors,
report_interval = 1 s everywhere: every gateway report goes up both connectors, and the site
keeps it once. The test sends a known number of requests with known body sizes (uploads and
downloads), then reads site.db: per role, the request and byte counts summed over traffic_5m,
traffic_day and traffic_month each equal what was sent, exactly. A gateway restarted (a new
boot) keeps the totals exact; a connector killed leaves the gateways' tunnel lists within two
intervals. Hostile reports from a connector-certificate holder are refused and move nothing;
a revoked connector is refused. A connector answers a gateway's report itself (a fake gateway
sends malformed and oversized ones)."""
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import pytest

from cmgtest import (SLOW, Site, free_port, free_port_range, ini_set, poll, request,
                     start_connector, start_gateway, wait_ready)
from sitetest import Deployment

INTERVAL = 1
UPLOADS = [1000, 70000, 3]            # request body sizes
DOWNLOADS = [5000, 123457, 1]         # response body sizes
TABLES = ('traffic_5m', 'traffic_day', 'traffic_month')


def two_by_two(procs, tmp_path, svc, configure=None, gateway_conf=None):
    """2 gateway instances × 2 connectors (connector-1 as connector-a, c2 as edge-b) and
    `cmg site serve`, report_interval = INTERVAL on every role. configure(d) edits the files
    before anything starts; gateway_conf(i), if given, is the file instance i runs with."""
    d = Deployment(procs, tmp_path, svc, start=False)
    site = d.site
    site.tunnel_port = free_port_range(2)
    site.loopback(2)
    ini_set(site.gateway_conf, 'gateway', 'report_interval', INTERVAL)
    ini_set(site.connector_conf, 'connector', 'report_interval', f'{INTERVAL}s')
    ini_set(site.dir / 'site.conf', 'site', 'report_interval', INTERVAL)
    d.cmg_site('connector', 'add', 'c2')
    conf_b = site.connector_copy('connector-b', [svc.url])
    ini_set(conf_b, 'connector', 'cert', 'connectors/c2.crt')
    ini_set(conf_b, 'connector', 'key', 'connectors/c2.key')
    ini_set(conf_b, 'connector', 'name', 'edge-b')   # its certificate says c2: reported as c2
    if configure:
        configure(d)
    d.start_site()
    d.gateways = [start_gateway(procs, site, i, conf=gateway_conf and gateway_conf(i))
                  for i in range(2)]
    d.connectors = [start_connector(procs, site.connector_conf, 'connector-a'),
                    start_connector(procs, conf_b, 'connector-b')]
    wait_ready(procs, site)
    return d


@pytest.fixture
def dep(procs, tmp_path, svc):
    return two_by_two(procs, tmp_path, svc)


def db(dep):
    return sqlite3.connect(f'file:{dep.site.dir / "site.db"}?mode=ro', uri=True, timeout=10)


def rows(dep, sql, *args):
    with db(dep) as c:
        return c.execute(sql, args).fetchall()


def totals(dep, table, role):
    """requests, 2xx, request_bytes, response_bytes of role in table, over every instance."""
    return rows(dep, f'SELECT coalesce(sum(requests), 0), coalesce(sum(r2xx), 0), '
                     f'coalesce(sum(request_bytes), 0), coalesce(sum(response_bytes), 0) '
                     f'FROM {table} WHERE role = ?', role)[0]


def all_totals(dep):
    return {t: totals(dep, t, dep.site.role_ids[0]) for t in TABLES}


def settled(dep, procs):
    """The totals once every gateway reported after now (all that came before is in them)."""
    after = int(time.time()) + 1
    poll(lambda: rows(dep, 'SELECT count(*) FROM gateways WHERE report_time > ?', after)[0][0] == 2,
         6 * INTERVAL * SLOW, 'a report of both instances made after the traffic',
         check=procs.check)
    first = all_totals(dep)
    time.sleep(2 * INTERVAL)
    assert all_totals(dep) == first, 'totals still moving with no traffic'
    return first


def traffic(dep, n_rounds):
    """n_rounds × (uploads and downloads), each on a new connection (so the kernel spreads
    them over both instances). Returns (requests, request_bytes, response_bytes)."""
    site = dep.site
    reqs = req_bytes = resp_bytes = 0
    for _ in range(n_rounds):
        for size in UPLOADS:
            r = request(site, 'POST', site.path('upload'), body=b'u' * size)
            assert r.status == 200, r
            reqs, req_bytes, resp_bytes = reqs + 1, req_bytes + size, resp_bytes + len(r.body)
        for size in DOWNLOADS:
            r = request(site, 'GET', site.path(f'download?size={size}'))
            assert r.status == 200 and len(r.body) == size, r
            reqs, resp_bytes = reqs + 1, resp_bytes + size
    return reqs, req_bytes, resp_bytes


def add(base, sent):
    reqs, req_bytes, resp_bytes = sent
    return {t: (v[0] + reqs, v[1] + reqs, v[2] + req_bytes, v[3] + resp_bytes)
            for t, v in base.items()}


def wait_totals(dep, procs, want):
    poll(lambda: all_totals(dep) == want, 8 * INTERVAL * SLOW, f'the site totals to reach {want}',
         check=procs.check)
    time.sleep(2 * INTERVAL)   # both connectors carried every report since: nothing more counted
    assert all_totals(dep) == want


def tunnels_of(dep):
    return {inst: sorted((t['connector'], t['state']) for t in json.loads(tun))
            for inst, tun in rows(dep, 'SELECT instance, tunnels FROM gateways')}


def connector_views(dep):
    return {name: json.loads(tun) for name, tun in
            rows(dep, 'SELECT connector, tunnels FROM connector_reports')}


def test_counts_exact_once_through_two_connectors(dep, procs, svc):
    base = settled(dep, procs)
    sent = traffic(dep, 4)
    want = add(base, sent)
    wait_totals(dep, procs, want)
    # both instances carried some of it
    per_instance = rows(dep, 'SELECT instance, sum(requests) FROM traffic_month WHERE role = ? '
                             'GROUP BY instance', dep.site.role_ids[0])
    assert len(per_instance) == 2 and all(n > 0 for _, n in per_instance), per_instance
    # egress and ingress on the whole-gateway rows: at least the bodies (TLS adds more)
    egress, ingress, conns = rows(dep, "SELECT sum(egress_bytes), sum(ingress_bytes), "
                                       "sum(device_connections) FROM traffic_month WHERE role = ''")[0]
    assert egress >= sent[2] and ingress >= sent[1] and conns >= sent[0], (egress, ingress, conns)

    # the gateways and the connectors' views: 2 instances × 2 connectors, all up
    gws = rows(dep, 'SELECT instance, state, via, seq FROM gateways ORDER BY instance')
    assert len(gws) == 2 and all(g[1] == 'serving' and g[2] in ('connector-1', 'c2') for g in gws), gws
    assert all(v == [('c2', 'up'), ('connector-1', 'up')] for v in tunnels_of(dep).values()), \
        tunnels_of(dep)
    views = connector_views(dep)
    assert sorted(views) == ['c2', 'connector-1'], views
    instances = {g[0] for g in gws}
    for name, view in views.items():
        assert len(view) == 2 and all(t['state'] == 'up' for t in view), (name, view)
        assert {t['instance'] for t in view} == instances, (name, view)
        assert all(t['since'] > 0 and t['reconnects'] == 0 for t in view), (name, view)
    boots = rows(dep, 'SELECT count(*) FROM report_boots')[0][0]
    assert boots == 2, boots
    # the connectors answered every report themselves: none reached the internal service
    reported = rows(dep, 'SELECT sum(seq) FROM gateways')[0][0]
    assert reported >= 4 and not [p for p in svc.stats()['paths'] if '.cmg' in p]

    # a new boot of instance 0: its counters start again, the totals stay exact
    dep.gateways[0].signal(signal.SIGTERM)
    dep.gateways[0] = start_gateway(procs, dep.site, 0)
    poll(lambda: rows(dep, 'SELECT count(*) FROM report_boots')[0][0] == 3, 6 * INTERVAL * SLOW,
         'the new boot to report', check=procs.check)
    poll(lambda: all(len(v) == 2 for v in tunnels_of(dep).values()), 6 * INTERVAL * SLOW,
         'both connectors back on the new boot', check=procs.check)
    sent2 = traffic(dep, 2)
    want2 = add(want, sent2)
    wait_totals(dep, procs, want2)

    # the gateways name connectors by certificate, as the site does (and keep the hello name)
    assert all(t['name'] == {'c2': 'edge-b', 'connector-1': 'connector-1'}[t['connector']]
               for _, tun in rows(dep, 'SELECT instance, tunnels FROM gateways')
               for t in json.loads(tun)), tunnels_of(dep)

    # a connector killed: both gateways' tunnel lists lose it within 2 intervals
    dep.connectors[1].signal(signal.SIGKILL)
    killed = time.monotonic()
    poll(lambda: all(v == [('connector-1', 'up')] for v in tunnels_of(dep).values()),
         2 * INTERVAL * SLOW + 0.5, 'the gateways to report connector c2 gone', check=procs.check)
    gone_after = time.monotonic() - killed
    print(f'{sent[0] + sent2[0]} requests, {sent[1] + sent2[1]} request bytes, '
          f'{sent[2] + sent2[2]} response bytes: exact in {", ".join(TABLES)}; '
          f'connector gone from the reports after {gone_after:.2f} s')


def test_a_drain_reports_what_finished_during_it(dep, procs, svc):
    """A request that finishes while its gateway drains is counted: the gateway sends a
    last report once its drain is over, before it exits."""
    base = settled(dep, procs)
    seen, result = svc.count, {}

    def slow():
        result['r'] = request(dep.site, 'GET', dep.site.path('delay?ms=1500'))
    t = threading.Thread(target=slow)
    t.start()
    poll(lambda: svc.count > seen, 5 * SLOW, 'the request at the internal service',
         check=procs.check)
    for g in dep.gateways:
        g.signal(signal.SIGTERM, wait=False)
    t.join(10 * SLOW)
    assert result['r'].status == 200, result
    for g in dep.gateways:
        assert g.popen.wait(timeout=10 * SLOW) == 0
    assert all('drain over' in g.log_text() for g in dep.gateways)
    want = add(base, (1, 0, len(result['r'].body)))
    poll(lambda: all_totals(dep) == want, 4 * INTERVAL * SLOW,
         f'the totals to count the request finished during the drain ({want})', check=procs.check)
    assert rows(dep, 'SELECT DISTINCT state FROM gateways') == [('draining',)]


# ---------------------------------------------------------------- hostile reports

def feed_post(dep, body, cert='connector.crt', key='connector.key', raw=False):
    """POST /v1/connector/report to the feed listener with a connector's certificate."""
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    ctx.load_cert_chain(str(dep.site.dir / cert), str(dep.site.dir / key))
    conn = http.client.HTTPSConnection('127.0.0.1', dep.feed_port, context=ctx, timeout=10)
    try:
        data = body if raw else json.dumps(body).encode()
        conn.request('POST', '/v1/connector/report', body=data,
                     headers={'Content-Type': 'application/json'})
        r = conn.getresponse()
        return r.status, r.read()
    except (ConnectionError, ssl.SSLError) as e:
        return None, repr(e).encode()
    finally:
        conn.close()


def gateway_report(instance, boot, seq, role, requests, via='connector-1'):
    """A gateway's report as carried by connector via (listed with a tunnel up)."""
    return {'instance': instance, 'boot': boot, 'seq': seq, 'started': 1790000000,
            'time': int(time.time()), 'interval': 1, 'state': 'serving', 'policy_version': 1,
            'device_connections': 1, 'devices_now': 0, 'egress_bytes': 10, 'ingress_bytes': 10,
            'roles': [{'role': role, 'requests': {'1xx': 0, '2xx': requests, '3xx': 0, '4xx': 0,
                                                  '5xx': 0, 'other': 0},
                       'request_bytes': 0, 'response_bytes': 0}],
            'refusals': {},
            'tunnels': [{'connector': via, 'peer': '127.0.0.1:1', 'state': 'up', 'since': 1}],
            'certificates': []}


def connector_report(*reports):
    return {'connector': 'x', 'time': int(time.time()), 'interval': 1, 'draining': False,
            'policy_version': 1, 'tunnels': [], 'gateway_reports': list(reports)}


def many_roles(instance, boot):
    r = gateway_report(instance, boot, 1, '0', 1)
    r['roles'] = [dict(r['roles'][0], role=str(i)) for i in range(4097)]
    return r


def cpu_seconds(pid):
    """User + system CPU time of a process, from /proc."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def test_the_largest_report_is_kept_quickly(dep, procs):
    """A POST of ~0.96 MB: 2 gateway reports of 4097 roles, new instances and boots. The
    site answers it quickly (it took 1.6 to 2.6 s of the site's loop before), and counts each
    role once; the times are printed."""
    settled(dep, procs)
    times = []
    for i in range(3):
        body = json.dumps(connector_report(many_roles(f'big{i}/0', f'{i:x}0000000000000b0'),
                                           many_roles(f'big{i}/1', f'{i:x}0000000000000b1')),
                          separators=(',', ':')).encode()
        assert len(body) < 1 << 20
        before = cpu_seconds(dep.site_proc.pid)
        status, answer = feed_post(dep, body, raw=True)
        times.append(cpu_seconds(dep.site_proc.pid) - before)
        assert status == 204, answer
    assert rows(dep, "SELECT count(*), sum(r2xx) FROM traffic_day WHERE instance LIKE 'big%' "
                     "AND role <> ''") == [(6 * 4097, 6 * 4097)]
    print(f'{len(body)} bytes, 2 x 4097 roles: kept in '
          f'{", ".join(f"{t * 1000:.0f}" for t in times)} ms of the site\'s CPU '
          '(a new TLS connection each)')
    # CPU time, not the clock: a busy machine does not stretch it; the quadratic code
    # took 1.6 s and more of it per POST
    assert max(times) < 1.0, times


def test_hostile_reports_move_nothing(dep, procs):
    role = dep.site.role_ids[0]
    base = settled(dep, procs)
    good = gateway_report('forged/0', '0123456789abcdef', 5, role, 7)
    # replayed: the first is counted once, the replays not
    assert feed_post(dep, connector_report(good))[0] == 204
    counted = add(base, (7, 0, 0))
    assert all_totals(dep) == counted
    for seq in (5, 4, 1):
        assert feed_post(dep, connector_report(dict(good, seq=seq)))[0] == 204
    assert all_totals(dep) == counted

    def bad_role(**over):
        r = gateway_report('forged/0', '0123456789abcdef', 9, role, 1000)
        r['roles'][0].update(over)
        return connector_report(r)

    hostile = {
        'not JSON': b'{"gateway_reports": [',
        'not an object': b'[1, 2, 3]',
        'negative': bad_role(request_bytes=-5),
        'huge': bad_role(response_bytes=1e30),
        'fraction': bad_role(request_bytes=1.5),
        'string count': bad_role(request_bytes='12'),
        'bad role id': bad_role(role='../etc'),
        'negative seq': connector_report(dict(good, seq=-1)),
        'zero seq': connector_report(dict(good, seq=0)),
        'bad boot': connector_report(dict(good, seq=9, boot='xyz')),
        'long instance': connector_report(dict(good, seq=9, instance='i' * 300)),
        'too many tunnels': dict(connector_report(), tunnels=[{}] * 65),
        'no draining': {k: v for k, v in connector_report().items() if k != 'draining'},
        'role twice': connector_report(dict(good, seq=9, roles=good['roles'] * 2)),
        'bad state': connector_report(dict(good, seq=9, state='x' * 10)),
        'control character': connector_report(dict(good, seq=9, instance='forged\x1b[2J/0')),
        'not ASCII': connector_report(dict(good, seq=9, instance='forg\u00e9d/0')),
        'gateway tunnel state': connector_report(dict(good, seq=9, tunnels=[
            dict(good['tunnels'][0], state='<script>')])),
        'connector tunnel state': dict(connector_report(), tunnels=[
            {'gateway': 'g:1', 'instance': '', 'state': 'sideways', 'since': None,
             'rtt_ms': None, 'reconnects': 0}]),
        'seq past 2^32': connector_report(dict(good, seq=2 ** 33)),
    }
    for what, body in hostile.items():
        status, answer = feed_post(dep, body, raw=isinstance(body, bytes))
        assert status == 400, (what, status, answer)
    # a good report with a bad one in the same document: nothing of it is kept
    status, _ = feed_post(dep, connector_report(dict(good, seq=10), bad_role(request_bytes=-1)['gateway_reports'][0]))
    assert status == 400
    # oversized: refused before it is read whole
    status, answer = feed_post(dep, b'{"x": "' + b'a' * (2 << 20) + b'"}', raw=True)
    assert status in (400, 413, None), (status, answer)
    assert all_totals(dep) == counted
    assert rows(dep, "SELECT seq FROM report_boots WHERE instance = 'forged/0'") == [(5,)]

    # a report that does not list the connector carrying it is not believed: any holder of
    # a connector certificate could otherwise speak for any gateway
    for forged in (gateway_report('forged/1', '0123456789abcdee', 1, role, 50, via='c2'),
                   gateway_report('forged/0', '0123456789abcdef', 2 ** 32, role, 50, via='c2')):
        assert feed_post(dep, connector_report(forged))[0] == 204
    assert all_totals(dep) == counted
    assert rows(dep, "SELECT count(*) FROM gateways WHERE instance = 'forged/1'") == [(0,)]
    assert rows(dep, "SELECT seq FROM report_boots WHERE instance = 'forged/0'") == [(5,)]
    assert 'lists no tunnel to connector-1' in dep.site_proc.log_text()

    # a revoked connector is refused
    dep.cmg_site('connector', 'add', 'c3')
    ok = feed_post(dep, connector_report(), 'connectors/c3.crt', 'connectors/c3.key')
    assert ok[0] == 204, ok
    dep.cmg_site('connector', 'revoke', 'c3')
    refused = feed_post(dep, connector_report(dict(good, seq=20)), 'connectors/c3.crt',
                        'connectors/c3.key')
    assert refused[0] == 403, refused
    assert all_totals(dep) == counted
    assert 'connector report refused' in dep.site_proc.log_text()



# ---------------------------------------------------------------- a gateway's report at the connector

class FakeGateway:
    """A tunnel port that takes one connector (mutual TLS, ALPN cmg-tunnel/1) and speaks
    HTTP/2 as the gateway does: the control stream, then what the test sends."""

    def __init__(self, site, port):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(site.dir / 'gateway.crt'), str(site.dir / 'gateway.key'))
        self.ctx.verify_mode = ssl.CERT_NONE   # (Python would want clientAuth on the connector's)
        self.ctx.set_alpn_protocols(['cmg-tunnel/1'])
        self.sock = socket.create_server(('127.0.0.1', port))
        self.sock.settimeout(10 * SLOW)

    def accept(self):
        raw, _ = self.sock.accept()
        self.tls = self.ctx.wrap_socket(raw, server_side=True)
        self.tls.settimeout(10 * SLOW)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(1 << 24)
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(':method', 'GET'), (':scheme', 'https'),
                                   (':authority', 'tunnel'), (':path', '/.cmg/control')])
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.tls.sendall(data)

    def begin(self, path, part=b''):
        """Opens a POST stream and sends part of its body; its stream id."""
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(':method', 'POST'), (':scheme', 'https'),
                                   (':authority', 'tunnel'), (':path', path),
                                   ('content-type', 'application/json')])
        if part:
            self.h2.send_data(sid, part)
        self.flush()
        return sid

    def post(self, path, body):
        """POST body on a new stream; the answer's status."""
        return self.finish(self.begin(path), body)

    def finish(self, sid, body):
        """Sends the rest of the body of stream sid; the answer's status."""
        sent, status, ended = 0, None, False
        while status is None or not ended:
            while sent < len(body) and not ended:
                room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size,
                           len(body) - sent)
                if room <= 0:
                    break
                self.h2.send_data(sid, body[sent:sent + room], end_stream=sent + room == len(body))
                sent += room
            if not body and sent == 0:
                self.h2.end_stream(sid)
                sent = -1
            self.flush()
            data = self.tls.recv(65536)
            assert data, 'the connector closed the tunnel'
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    status = int(dict(ev.headers)[b':status'])
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)) and \
                        ev.stream_id == sid:
                    ended = True
                elif isinstance(ev, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        return status


def test_connector_answers_gateway_reports_itself(procs, tmp_path, svc):
    """POST /.cmg/report on a tunnel: 204 for a report, 400 for a body that is not one or is
    over 1 MiB; the tunnel stays up, nothing reaches the internal service."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    port = free_port()
    ini_set(site.connector_conf, 'connector', 'gateway', f'127.0.0.1:{port}')
    fake = FakeGateway(site, port)
    connector = start_connector(procs, site.connector_conf)
    fake.accept()
    good = json.dumps(gateway_report('gw/0', '00112233445566aa', 1, site.role_ids[0], 1)).encode()
    assert fake.post('/.cmg/report', good) == 204
    for what, body in {'not JSON': b'{"instance"', 'no boot': json.dumps({'instance': 'x', 'seq': 1}).encode(),
                       'empty': b'', 'over 1 MiB': b' ' * ((1 << 20) + 1000),
                       'trailing bytes': good + b' ]',
                       'negative count': good.replace(b'"egress_bytes": 10', b'"egress_bytes": -10'),
                       'control character': good.replace(b'gw/0', b'gw\\u0007/0'),
                       'tunnel state': good.replace(b'"state": "up"', b'"state": "<b>"'),
                       }.items():
        time.sleep(1)   # one report a second is what a connector takes from a gateway
        assert fake.post('/.cmg/report', body) == 400, what
    time.sleep(1)
    assert fake.post('/.cmg/report', good) == 204   # the tunnel is still up
    assert 'report from gateway' in connector.log_text()
    assert not [p for p in svc.stats()['paths'] if '.cmg' in p]


def test_connector_takes_one_report_at_a_time(procs, tmp_path, svc):
    """A gateway cannot make the connector hold more than one report per tunnel, nor take
    more than about one a second: a second report while one is coming, and a fourth within
    the same second, are answered 429; the tunnel stays up; nothing is forwarded."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    port = free_port()
    ini_set(site.connector_conf, 'connector', 'gateway', f'127.0.0.1:{port}')
    fake = FakeGateway(site, port)
    start_connector(procs, site.connector_conf)
    fake.accept()
    good = json.dumps(gateway_report('gw/0', '00112233445566aa', 1, site.role_ids[0], 1)).encode()
    held = fake.begin('/.cmg/report', good[:100])         # a report still coming
    assert fake.post('/.cmg/report', good) == 429
    assert fake.finish(held, good[100:]) == 204
    time.sleep(3.2)   # the rate's burst is whole again
    answers = [fake.post('/.cmg/report', good) for _ in range(5)]
    assert answers[:3] == [204] * 3 and answers[3:] == [429] * 2, answers
    time.sleep(1.1)
    assert fake.post('/.cmg/report', good) == 204          # the tunnel is still up
    assert not [p for p in svc.stats()['paths'] if '.cmg' in p]
    procs.check()


def test_a_stalled_report_holds_no_drain(procs, tmp_path, svc):
    """A report whose body never ends neither holds the connector's drain until
    drain_timeout nor counts as a request in its drain statistics."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    port = free_port()
    ini_set(site.connector_conf, 'connector', 'gateway', f'127.0.0.1:{port}')
    ini_set(site.connector_conf, 'connector', 'drain_timeout', 20)
    fake = FakeGateway(site, port)
    connector = start_connector(procs, site.connector_conf)
    fake.accept()
    good = json.dumps(gateway_report('gw/0', '00112233445566aa', 1, site.role_ids[0], 1)).encode()
    assert fake.post('/.cmg/report', good) == 204          # the tunnel is up
    fake.begin('/.cmg/report', good[:100])                 # and never the rest
    start = time.monotonic()
    connector.signal(signal.SIGTERM, wait=False)
    fake.tls.settimeout(0.2)
    pending = b''
    while connector.alive() and time.monotonic() - start < 15 * SLOW:
        try:   # answer the drain's PING by hand (h2 takes nothing after a GOAWAY)
            data = fake.tls.recv(65536)
        except socket.timeout:
            data = None
        except OSError:
            data = b''
        if data == b'':   # the connector closed: so does the gateway
            fake.tls.close()
            break
        pending += data or b''
        while len(pending) >= 9 and len(pending) >= 9 + int.from_bytes(pending[:3], 'big'):
            n, kind, flags = int.from_bytes(pending[:3], 'big'), pending[3], pending[4]
            if kind == 6 and not flags & 1:   # PING: its ACK
                fake.tls.sendall(b'\x00\x00\x08\x06\x01\x00\x00\x00\x00' + pending[9:9 + n])
            pending = pending[9 + n:]
    assert connector.popen.wait(timeout=15 * SLOW) == 0
    took = time.monotonic() - start
    assert took < 10, f'the drain took {took:.1f} s (drain_timeout 20 s)'
    assert re.search(r'drain over after [0-9.]+ s: 0 request\(s\) finished, 0 cut', connector.log_text()), \
        connector.log_text()[-2000:]
