"""The connector's part of client notifications, with a fake gateway on the tunnel port
(fakegateway.py: it opens /.cmg/control and reads the control lines, and POSTs
/.cmg/notify-report) and a Python stand-in for the site's feed listener (mutual TLS with
the site's certificate) serving GET /v1/connector/notify as the contract says and taking
POST /v1/connector/notify-report. Checks: notify-sync and the backlog after hello; a new
notification up the control stream at once; a second tunnel gets the backlog; the site
down then up: the connector resumes from the right `after`; a new site epoch; the report
relay passes the body and the site's status, 429 for a second one in flight, 413 for an
oversized body, 502 when the site is down, and nothing reaches the internal service."""
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

import cmgtest
from cmgtest import SLOW, free_port, ini_set, poll
from fakegateway import FakeGateway

EPOCH = '3f9a1c0e5b7d2a64'
KEEP = 1024
HOLD_S = 25


class NotifySite:
    """The site's notify feed and notify-report ingestion, as the contract says, on the
    feed listener's address; the policy feed is held (no policy: tunnels come up anyway)."""

    def __init__(self, site, port, per_answer=2):
        self.site, self.port, self.per_answer = site, port, per_answer
        self.epoch = EPOCH
        self.docs = {}                 # seq -> document
        self.last = 0
        self.afters = []               # the `after` of every notify poll, in order
        self.reports = []              # notify report bodies taken
        self.report_status = 204
        self.report_delay = 0
        self.cond = threading.Condition()
        self.server = None
        self.up()

    def add(self, type_='policy', data=None, devices=None, expired=False):
        with self.cond:
            self.last += 1
            seq = self.last
            now = int(time.time())
            if expired:
                doc = {'id': f'{self.epoch}-{seq}', 'seq': seq, 'expired': True}
            else:
                doc = {'id': f'{self.epoch}-{seq}', 'seq': seq, 'type': type_, 'data': data,
                       'created': now, 'expires': now + 3600}
                doc.update({'devices': devices} if devices else {'all': True})
            self.docs[seq] = doc
            self.cond.notify_all()
        return doc

    def new_epoch(self, epoch):
        with self.cond:
            self.epoch, self.docs, self.last = epoch, {}, 0
            self.cond.notify_all()

    def answer(self, after):
        """The contract's answer to ?after=, held while there is nothing new."""
        def first_seq():
            oldest = max(1, self.last - KEEP + 1)
            if after and after.startswith(self.epoch + '-'):
                seq = int(after.split('-', 1)[1])
                return seq + 1 if seq + 1 >= oldest else oldest
            return oldest
        with self.cond:
            deadline = time.monotonic() + HOLD_S
            # held only for a caller that knows the epoch and has everything
            while (after and after.startswith(self.epoch + '-') and first_seq() > self.last
                   and self.server and time.monotonic() < deadline):
                self.cond.wait(0.2)
            start = first_seq()
            seqs = list(range(start, self.last + 1))
            more = len(seqs) > self.per_answer
            return {'epoch': self.epoch, 'last': self.last, 'more': more,
                    'notifications': [self.docs[s] for s in seqs[:self.per_answer]]}

    def up(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):
                pass

            def reply(self, status, body=b'', ctype='application/json'):
                self.send_response(status)
                self.send_header('Content-Type', ctype)
                self.send_header('Content-Length', str(len(body)))
                self.send_header('Connection', 'close')
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                u = urlsplit(self.path)
                if u.path == '/v1/connector/notify':
                    after = parse_qs(u.query).get('after', [None])[0]
                    owner.afters.append(after)
                    doc = owner.answer(after)
                    if owner.server is None:
                        return            # the site went down: no answer
                    self.reply(200, json.dumps(doc).encode())
                elif u.path == '/v1/connector/feed':
                    for _ in range(HOLD_S * 5):   # the policy feed: nothing new
                        if owner.server is None:
                            return
                        time.sleep(0.2)
                    self.reply(503, b'{}')
                else:
                    self.reply(404)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                if self.path == '/v1/connector/notify-report':
                    owner.reports.append((body, self.headers.get('Content-Type')))
                    time.sleep(owner.report_delay)
                    self.reply(owner.report_status, b'' if owner.report_status == 204
                               else b'{"error":"refused by the test"}')
                else:
                    self.reply(204)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.site.dir / 'site.crt', self.site.dir / 'site.key')
        ctx.verify_mode = ssl.CERT_NONE    # the connector's usage is OpenCMG's own (see fakegateway)
        server = ThreadingHTTPServer(('127.0.0.1', self.port), Handler)
        server.daemon_threads = True
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def down(self):
        server, self.server = self.server, None
        with self.cond:
            self.cond.notify_all()
        server.shutdown()
        server.server_close()

    def close(self):
        if self.server:
            self.down()


@pytest.fixture
def setup(tmp_path, procs, svc):
    feed_port = free_port()
    site = cmgtest.Site(tmp_path / 'site', [svc.url], procs,
                        init_args=['--site-feed', f'127.0.0.1:{feed_port}'])
    notify_site = NotifySite(site, feed_port)
    gateways = []
    yield site, notify_site, gateways
    for gw in gateways:
        gw.close()
    notify_site.close()


def start(procs, site, gateways, n=1):
    for i in range(n):
        gateways.append(FakeGateway(site, site.tunnel_port + i))
    ini_set(site.connector_conf, 'connector', 'gateway',
            *[f'127.0.0.1:{site.tunnel_port + i}' for i in range(2)])
    return cmgtest.start_connector(procs, site.connector_conf)


def notify_seqs(gw):
    return [m['seq'] for m in gw.messages('notify')]


def test_sync_backlog_and_live_notifications(setup, procs, svc):
    site, ns, gateways = setup
    ns.add('policy', {'fetch': True})
    ns.add(expired=True)
    ns.add('script', {'id': 7}, devices=['cert:' + 'ab' * 32, 'dev-123'])
    conn = start(procs, site, gateways)
    gw = gateways[0]
    gw.wait_tunnel()
    gw.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 3,
                  'the backlog after notify-sync')
    types = [m['type'] for m in gw.lines]
    assert types[0] == 'hello'
    assert types[types.index('notify-sync'):] == ['notify-sync', 'notify', 'notify', 'notify']
    assert gw.messages('notify-sync') == [{'type': 'notify-sync', 'epoch': EPOCH, 'last': 3}]
    first, tomb, script = gw.messages('notify')
    # the notification's type goes as "event": the message has one "type", "notify"
    assert first['event'] == 'policy' and script['event'] == 'script' and 'event' not in tomb
    assert first['id'] == f'{EPOCH}-1' and first['seq'] == 1 and first['all'] is True
    assert first['data'] == {'fetch': True} and first['expires'] == first['created'] + 3600
    assert tomb == {'type': 'notify', 'id': f'{EPOCH}-2', 'seq': 2, 'expired': True}
    assert script['devices'] == ['cert:' + 'ab' * 32, 'dev-123'] and script['data'] == {'id': 7}
    # the stand-in answers two at a time: the connector asked again at once (more: true)
    assert ns.afters[:2] == [None, f'{EPOCH}-2']

    # a new one goes up the control stream at once (the site answers the held poll)
    poll(lambda: ns.afters[-1] == f'{EPOCH}-3', 5 * SLOW, 'the connector to poll again')
    t0 = time.monotonic()
    ns.add('compliance', [1, 2])
    gw.wait_lines(lambda ls: 4 in [m.get('seq') for m in ls], 'notification 4', timeout=5)
    took = time.monotonic() - t0
    print(f'notification 4 on the control stream {took * 1000:.0f} ms after the site had it')
    assert took < 1.0 * SLOW
    assert notify_seqs(gw) == [1, 2, 3, 4]
    assert gw.messages('notify')[-1]['data'] == [1, 2]
    assert svc.count == 0
    assert conn.alive()


def test_second_tunnel_gets_the_backlog(setup, procs):
    site, ns, gateways = setup
    for i in range(5):
        ns.add('policy', {'n': i})
    start(procs, site, gateways)       # the second gateway address is dialled, not yet there
    gateways[0].wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 5,
                           'the backlog on the first tunnel')
    ns.add('script', {'n': 5})
    gateways[0].wait_lines(lambda ls: 6 in [m.get('seq') for m in ls], 'notification 6')
    gateways.append(FakeGateway(site, site.tunnel_port + 1))   # a fresh gateway instance
    gw2 = gateways[1]
    gw2.wait_tunnel(timeout=15)
    gw2.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 6,
                   'the backlog on the second tunnel')
    assert gw2.messages('notify-sync') == [{'type': 'notify-sync', 'epoch': EPOCH, 'last': 6}]
    assert notify_seqs(gw2) == [1, 2, 3, 4, 5, 6]
    assert notify_seqs(gateways[0]) == [1, 2, 3, 4, 5, 6]   # nothing twice on the first


def test_site_down_then_up_resumes_after_the_last(setup, procs):
    site, ns, gateways = setup
    ns.add('policy', {})
    ns.add('policy', {})
    conn = start(procs, site, gateways)
    gw = gateways[0]
    gw.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 2, 'the backlog')
    poll(lambda: ns.afters[-1] == f'{EPOCH}-2', 5 * SLOW, 'the held poll')
    ns.down()
    polls = len(ns.afters)
    ns.add('script', {'late': 1})
    ns.add('script', {'late': 2})
    poll(lambda: 'notify feed of site' in conn.log_text(), 10 * SLOW, 'the warning')
    time.sleep(0.5)                        # a retry or two meets a closed port
    ns.up()
    gw.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 4,
                  'the two made while the site was down', timeout=20)
    assert ns.afters[polls] == f'{EPOCH}-2'     # resumed after the last one it had
    assert notify_seqs(gw) == [1, 2, 3, 4]
    assert gw.messages('notify')[-1]['data'] == {'late': 2}
    assert len(gw.messages('notify-sync')) == 1
    poll(lambda: 'notify feed of site 127.0.0.1' in conn.log_text() and 'reached again'
         in conn.log_text(), 5 * SLOW, 'the connector to say so')

    # a site whose store is made anew: a new epoch, notify-sync again, then its documents
    ns.new_epoch('0123456789abcdef')
    ns.add('policy', {'fresh': True})
    gw.wait_lines(lambda ls: any(m.get('epoch') == '0123456789abcdef' for m in ls) and
                  ls[-1].get('id') == '0123456789abcdef-1', 'the new epoch')
    assert gw.messages('notify-sync')[-1] == {'type': 'notify-sync',
                                              'epoch': '0123456789abcdef', 'last': 1}


def test_report_relay(setup, procs, svc):
    site, ns, gateways = setup
    start(procs, site, gateways)
    gw = gateways[0]
    gw.wait_tunnel()
    body = json.dumps({'instance': 'gw-1', 'boot': 'ab' * 8, 'seq': 1, 'time': int(time.time()),
                       'delivered': {f'{EPOCH}-1': ['dev1', 'dev2']}, 'opened': ['dev3'],
                       'closed': [['dev4', int(time.time())]]}).encode()
    r = gw.post('/.cmg/notify-report', body)
    assert r.status == 204, r.body
    assert ns.reports == [(body, 'application/json')]     # passed on as it came

    ns.report_status = 400                                 # the site's status, whatever it is
    r = gw.post('/.cmg/notify-report', body)
    assert r.status == 400
    ns.report_status = 204

    # one relay per tunnel in flight: a second one meanwhile gets 429
    ns.report_delay = 1.5
    first = gw.post('/.cmg/notify-report', body, wait=False)
    poll(lambda: len(ns.reports) == 3, 5 * SLOW, 'the first report at the site')
    second = gw.post('/.cmg/notify-report', body)
    assert second.status == 429
    assert first.wait().status == 204
    assert len(ns.reports) == 3
    ns.report_delay = 0

    # too large: 413 at once, nothing relayed
    big = b'{"x":"' + b'a' * (1024 * 1024 - 64 * 1024) + b'"}'
    r = gw.post('/.cmg/notify-report', big)
    assert r.status == 413
    assert len(ns.reports) == 3
    r = gw.post('/.cmg/notify-report', body)     # the tunnel is fine afterwards
    assert r.status == 204 and len(ns.reports) == 4

    # a site that takes the report and never answers: 504 after 10 s
    ns.report_delay = 12
    t0 = time.monotonic()
    r = gw.post('/.cmg/notify-report', body, wait=False).wait(timeout=20)
    took = time.monotonic() - t0
    print(f'504 after {took:.2f} s')
    assert r.status == 504 and 9.5 <= took < 10 + 5 * SLOW, (r.status, took)
    ns.report_delay = 0

    # the site down: 502, and the gateway keeps its report
    ns.down()
    r = gw.post('/.cmg/notify-report', body)
    assert r.status == 502
    assert svc.count == 0                         # never forwarded to an internal service


def test_backlog_keeps_the_newest_1024(setup, procs):
    """1100 notifications pass: a tunnel that comes up afterwards gets notify-sync (last
    1100) and the newest 1024, in order; the first tunnel got all 1100 once each."""
    site, ns, gateways = setup
    ns.per_answer = 500
    conn = start(procs, site, gateways)
    gateways[0].wait_lines(lambda ls: any(m['type'] == 'notify-sync' for m in ls), 'notify-sync')
    for batch in range(11):                 # in batches the connector keeps up with (the
        for i in range(100):                # feed itself serves only the newest 1024)
            ns.add('policy', {'n': batch * 100 + i + 1})
        gateways[0].wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) ==
                               (batch + 1) * 100, f'batch {batch} on the first tunnel')
    assert notify_seqs(gateways[0]) == list(range(1, 1101))
    gateways.append(FakeGateway(site, site.tunnel_port + 1))
    gw2 = gateways[1]
    gw2.wait_tunnel(timeout=15)
    gw2.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 1024,
                   'the backlog on the second tunnel', timeout=20)
    time.sleep(0.2)                         # nothing more comes
    assert gw2.messages('notify-sync') == [{'type': 'notify-sync', 'epoch': EPOCH, 'last': 1100}]
    assert notify_seqs(gw2) == list(range(77, 1101))
    print(f'connector peak RSS after 1100 notifications on 2 tunnels: {conn.peak_rss_kib()} KiB')


def site_has_notifications():
    return cmgtest.run_cmg('site', 'notify', '--help').returncode == 0


@pytest.mark.skipif(not site_has_notifications(),
                    reason='this build has no site side of notifications (cmg site notify)')
def test_with_the_real_site(tmp_path, procs, svc):
    """The same with `cmg site serve`: `cmg site notify` reaches the fake gateway's control
    stream as notify-sync and notify, and a notify report relayed by the connector is
    taken by the site (204) and counted by `cmg site notify status`."""
    from sitetest import Deployment
    d = Deployment(procs, tmp_path, svc, start=False)
    d.start_site()
    gw = FakeGateway(d.site, d.site.tunnel_port)
    try:
        cmgtest.start_connector(procs, d.site.connector_conf)
        gw.wait_tunnel()
        gw.wait_lines(lambda ls: any(m['type'] == 'notify-sync' for m in ls), 'notify-sync')
        epoch = gw.messages('notify-sync')[0]['epoch']
        device = 'cert:' + 'cd' * 32
        t0 = time.monotonic()
        out = json.loads(d.cmg_site('notify', '--device', device, '--type', 'script',
                                    '--data', '{"run":"x"}', '--json').stdout)
        msg = gw.wait_lines(lambda ls: [m for m in ls if m.get('id') == out['id']],
                            'the notification on the control stream')[0]
        print(f'cmg site notify to the control stream: {(time.monotonic() - t0) * 1000:.0f} ms')
        assert out['id'] == f'{epoch}-1'
        assert msg['type'] == 'notify' and msg['event'] == 'script'
        assert msg['devices'] == [device] and msg['data'] == {'run': 'x'}
        report = json.dumps({'instance': 'gw-test', 'boot': 'ab' * 8, 'seq': 1,
                             'time': int(time.time()), 'delivered': {out['id']: [device]},
                             'opened': [device], 'closed': []}).encode()
        assert gw.post('/.cmg/notify-report', report).status == 204
        status = json.loads(d.cmg_site('notify', 'status', out['id'], '--json').stdout)
        assert (status['targets'], status['delivered'], status['waiting']) == (1, 1, 0)
        assert svc.count == 0
    finally:
        gw.close()
