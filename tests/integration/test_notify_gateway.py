"""The gateway's side of client notifications (issue 14, contract §4–§6): a fake connector
(fakeconnector.py) pushes notify-sync and notify control messages up the tunnel as the real
one does, and takes the gateway's notify reports; devices hold GET /CCM_Notify over
HTTP/1.1 (Python ssl) and HTTP/2 (Python h2) and read Server-Sent Events."""
import base64
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.request
import uuid

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import cmgtest
from cmgtest import (SLOW, alone_gateway, free_port, ini_set, make_cert, poll, start_gateway,
                     tls_connect)
from fakeconnector import FakeConnector
from sitetest import Deployment, IdP, b64u, sign_jwt, unb64u

EPOCH = '3f9a1c0e5b7d2a64'
OTHER_EPOCH = '00000000000000ff'


# ---------------------------------------------------------------- SSE clients

class SSEParser:
    """Events, comments and the retry: hint of a text/event-stream."""

    def __init__(self):
        self.buf = b''
        self.events = []      # {'id', 'event', 'data'} (data parsed as JSON)
        self.comments = []
        self.retry = None
        self.first = None     # the first block: 'retry' if the stream began with it

    def feed(self, data):
        self.buf += data
        while b'\n\n' in self.buf:
            block, self.buf = self.buf.split(b'\n\n', 1)
            ev = {}
            for line in block.decode().split('\n'):
                if line.startswith(':'):
                    self.comments.append(line)
                    self.first = self.first or 'comment'
                elif line.startswith('retry: '):
                    self.retry = int(line[7:])
                    self.first = self.first or 'retry'
                else:
                    k, _, v = line.partition(': ')
                    ev[k] = json.loads(v) if k == 'data' else v
            if ev:
                self.first = self.first or 'event'
                self.events.append(ev)

    def ids(self):
        return [e['id'] for e in self.events]


class Channel:
    """GET /CCM_Notify over HTTP/1.1 on its own TLS connection."""

    def __init__(self, site, cert=None, key=None, no_cert=False, token=None, last_id=None,
                 accept='text/event-stream', method='GET', rcvbuf=None):
        ctx = cmgtest.client_context(site, cert=False) if no_cert else \
            cmgtest.client_context(site, cert=cert, key=key)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10 * SLOW)
        raw.connect((site.addr, site.port))
        self.sock = ctx.wrap_socket(raw, server_hostname=site.name)
        head = f'{method} /CCM_Notify HTTP/1.1\r\nHost: {site.name}\r\n'
        if accept:
            head += f'Accept: {accept}\r\n'
        if token:
            head += f'Authorization: Bearer {token}\r\n'
        if last_id:
            head += f'Last-Event-ID: {last_id}\r\n'
        self.sock.sendall((head + '\r\n').encode())
        self.raw = b''
        while b'\r\n\r\n' not in self.raw:
            data = self.sock.recv(65536)
            assert data, f'closed before the response head: {self.raw!r}'
            self.raw += data
        head, self.raw = self.raw.split(b'\r\n\r\n', 1)
        lines = head.decode().split('\r\n')
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, v in (ln.split(':', 1) for ln in lines[1:])}
        self.sse = SSEParser()
        self.ended = False        # the last chunk came
        self.closed = False       # the connection closed
        self.body = b''
        if self.status != 200:
            n = int(self.headers.get('content-length', 0)) if method != 'HEAD' else 0
            while len(self.raw) < n:
                self.raw += self.sock.recv(65536)
            self.body = self.raw[:n]
        else:
            self._chunks()

    def _chunks(self):
        while not self.ended and b'\r\n' in self.raw:
            size_line, rest = self.raw.split(b'\r\n', 1)
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.ended = True
                return
            self.sse.feed(rest[:size])
            self.raw = rest[size + 2:]

    def pump(self, timeout=0.2):
        if self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(262144)
        except socket.timeout:
            return
        except (ConnectionError, ssl.SSLError, OSError):
            data = b''
        if not data:
            self.closed = True
            return
        self.raw += data
        self._chunks()

    def wait(self, pred, timeout=5, what='the channel'):
        end = time.monotonic() + timeout * SLOW
        while not pred(self):
            assert time.monotonic() < end, f'{what}: {self.sse.ids()} ended={self.ended} ' \
                                           f'closed={self.closed}'
            self.pump()
        return self

    def events(self, n, timeout=5):
        return self.wait(lambda c: len(c.sse.events) >= n, timeout, f'{n} event(s)').sse.events

    def quiet(self, seconds=0.5):
        """Reads for a while: nothing more must come (returns the events)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(0.1)
        return self.sse.events

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class H2Channel:
    """GET /CCM_Notify as stream 1 of an HTTP/2 connection; other streams on demand."""

    def __init__(self, site, cert=None, key=None, token=None, last_id=None):
        self.sock = tls_connect(site, alpn=('h2',), cert=cert, key=key)
        assert self.sock.selected_alpn_protocol() == 'h2'
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.status = {}
        self.ended = set()
        self.sse = SSEParser()
        self.closed = False
        self.sid = self.get('/CCM_Notify', [('accept', 'text/event-stream')] +
                            ([('authorization', f'Bearer {token}')] if token else []) +
                            ([('last-event-id', last_id)] if last_id else []))

    def get(self, path, extra=()):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(':method', 'GET'), (':scheme', 'https'),
                                     (':authority', 'cmg.test'), (':path', path), *extra],
                               end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        return sid

    def pump(self, timeout=0.2):
        if self.closed:
            return
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return
        except (ConnectionError, ssl.SSLError, OSError):
            data = b''
        if not data:
            self.closed = True
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:   # data after the GOAWAY
            self.closed = True
            return
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived):
                self.status[ev.stream_id] = int(dict(ev.headers)[b':status'])
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if ev.stream_id == self.sid:
                    self.sse.feed(ev.data)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.closed = True
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def wait(self, pred, timeout=5, what='the HTTP/2 channel'):
        end = time.monotonic() + timeout * SLOW
        while not pred(self):
            assert time.monotonic() < end, f'{what}: {self.sse.ids()} {self.status} {self.ended}'
            self.pump()
        return self

    def events(self, n, timeout=5):
        return self.wait(lambda c: len(c.sse.events) >= n, timeout, f'{n} event(s)').sse.events

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- set-ups

def thumbprint(crt):
    der = ssl.PEM_cert_to_DER_cert(open(crt).read())
    return hashlib.sha256(der).hexdigest()


def cert_id(crt):
    return 'cert:' + thumbprint(crt)


def site_device(site, tmp, name):
    """A device certificate of the site CA: (crt, key)."""
    ca = x509.load_pem_x509_certificate((site.dir / 'ca.crt').read_bytes())
    ca_key = serialization.load_pem_private_key((site.dir / 'ca.key').read_bytes(), None)
    _, _, (crt, key) = make_cert(tmp / name, name, issuer_cert=ca, issuer_key=ca_key)
    return crt, key


class Env:
    """A gateway alone (ready_timeout 0) and a fake connector, notify_* keys as asked."""

    def __init__(self, procs, site, tmp, connectors=1, metrics=False, **conf):
        self.procs, self.site, self.tmp = procs, site, tmp
        alone_gateway(site)
        for k, v in conf.items():
            ini_set(site.gateway_conf, 'gateway', k, v)
        self.metrics_port = None
        if metrics:
            self.metrics_port = free_port()
            ini_set(site.gateway_conf, 'gateway', 'metrics_listen', f'127.0.0.1:{self.metrics_port}')
        self.gateway = start_gateway(procs, site)
        self.fcs = [FakeConnector(site, site.tunnel_port, name=f'fake-{i}').start()
                    for i in range(connectors)]
        self.fc = self.fcs[0]
        poll(lambda: self.gateway.log_text().count('tunnel up:') >= connectors, 10 * SLOW,
             'the fake connector(s) up', check=procs.check)

    def metric(self, name):
        text = urllib.request.urlopen(f'http://127.0.0.1:{self.metrics_port}/metrics',
                                      timeout=5).read().decode()
        m = re.search(r'^' + re.escape(name) + r' (\S+)$', text, re.M)
        return float(m.group(1)) if m else None

    def close(self):
        for fc in self.fcs:
            fc.close()


@pytest.fixture
def env_factory(procs, site, tmp_path):
    made = []

    def make(**kw):
        e = Env(procs, site, tmp_path, **kw)
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()


def settle():
    """Control messages queued to a fake connector reach the gateway within this."""
    time.sleep(0.3 * SLOW)


# ---------------------------------------------------------------- tests

def test_targeted_and_broadcast_once_over_h1_and_h2(env_factory, site, tmp_path):
    """Two fake connectors send the same sync and documents (the gateway de-duplicates by
    seq): a certificate device over HTTP/1.1 and another over HTTP/2 each get what targets
    them and the broadcast exactly once, retry: first; other streams of the HTTP/2
    connection keep working; nothing of /CCM_Notify reaches a connector."""
    env = env_factory(connectors=2)
    crt2, key2 = site_device(site, tmp_path, 'device2')
    d1, d2 = cert_id(site.device_cert), cert_id(crt2)
    for fc in env.fcs:
        fc.sync(EPOCH, 0)
    settle()
    c1 = Channel(site)
    c2 = H2Channel(site, cert=crt2, key=key2)
    assert c1.status == 200
    assert c1.headers['content-type'] == 'text/event-stream'
    assert c1.headers['cache-control'] == 'no-store'
    assert c1.headers['transfer-encoding'] == 'chunked'
    docs = [FakeConnector.doc(EPOCH, 1, 'policy', {'n': 1}, devices=[d1]),
            FakeConnector.doc(EPOCH, 2, 'script', {'n': 2}, devices=[d2, 'dev-absent']),
            FakeConnector.doc(EPOCH, 3, 'compliance', None, all_=True)]
    for fc in env.fcs:
        for d in docs:
            fc.notify(d)
    e1 = c1.events(2)
    e2 = c2.events(2)
    assert [(e['id'], e['event'], e['data']) for e in e1] == \
        [(f'{EPOCH}-1', 'policy', {'n': 1}), (f'{EPOCH}-3', 'compliance', None)]
    assert [(e['id'], e['event'], e['data']) for e in e2] == \
        [(f'{EPOCH}-2', 'script', {'n': 2}), (f'{EPOCH}-3', 'compliance', None)]
    assert c1.sse.first == 'retry' and 2000 <= c1.sse.retry <= 6000
    assert c2.sse.first == 'retry' and c2.status[c2.sid] == 200
    other = c2.get(site.path('policy.xml'))
    c2.wait(lambda c: other in c.ended, what='another stream of the connection')
    assert c2.status[other] == 204          # the fake connector's answer: it was forwarded
    assert len(c1.quiet()) == 2 and len(c2.sse.events) == 2
    for fc in env.fcs:
        assert not [p for _, p in fc.requests if 'CCM_Notify' in (p or '')]
    c1.close()
    c2.close()


def test_replay_with_last_event_id_and_reset_beyond_the_window(env_factory, site):
    """notify_window 16, 20 notifications for the device (seq 7 expired, 8 a tombstone): a
    channel with Last-Event-ID E-12 gets 13..20 in order; one without gets the whole window
    but the expired ones; E-2 (before the window), another epoch, a seq ahead and a
    malformed id each get exactly one event: reset with the gateway's last id, then live."""
    env = env_factory(notify_window=16)
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 20)
    for s in range(1, 21):
        if s == 8:
            env.fc.notify(FakeConnector.doc(EPOCH, s, expired=True))
        elif s == 7:
            env.fc.notify(FakeConnector.doc(EPOCH, s, devices=[dev], created=int(time.time()) - 10, ttl=5))
        else:
            env.fc.notify(FakeConnector.doc(EPOCH, s, 'policy', {'s': s}, devices=[dev]))
    settle()
    c = Channel(site, last_id=f'{EPOCH}-12')
    assert [e['id'] for e in c.events(8)] == [f'{EPOCH}-{s}' for s in range(13, 21)]
    assert len(c.quiet(0.3)) == 8
    c.close()
    c = Channel(site)
    want = [f'{EPOCH}-{s}' for s in range(5, 21) if s not in (7, 8)]
    assert [e['id'] for e in c.events(len(want))] == want
    assert len(c.quiet(0.3)) == len(want)
    c.close()
    top = 20
    for make_id, reason in ((lambda t: f'{EPOCH}-2', 'window'), (lambda t: f'{OTHER_EPOCH}-{t}', 'epoch'),
                            (lambda t: f'{EPOCH}-{t + 1}', 'ahead'), (lambda t: 'garbage', 'epoch')):
        c = Channel(site, last_id=make_id(top))
        ev = c.events(1)
        assert ev == [{'id': f'{EPOCH}-{top}', 'event': 'reset', 'data': {'reason': reason}}], reason
        top += 1
        env.fc.notify(FakeConnector.doc(EPOCH, top, all_=True))
        # then live events, and never a reset again
        assert [e['id'] for e in c.events(2)] == [f'{EPOCH}-{top - 1}', f'{EPOCH}-{top}']
        assert len(c.quiet(0.2)) == 2
        c.close()
    # Last-Event-ID at the window's start - 1 is still covered: no reset
    lo = top - 15
    c = Channel(site, last_id=f'{EPOCH}-{lo - 1}')
    assert [e['id'] for e in c.events(16)] == [f'{EPOCH}-{s}' for s in range(lo, top + 1)]
    c.close()

def test_a_new_site_epoch_resets_open_channels_once(env_factory, site):
    """A notify-sync with another epoch (a site store made anew): each open channel gets one
    reset naming the new epoch, then the new epoch's notifications live; a Last-Event-ID of
    the old epoch gets a reset too."""
    env = env_factory()
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 1)
    env.fc.notify(FakeConnector.doc(EPOCH, 1, devices=[dev]))
    settle()
    c = Channel(site)
    assert [e['id'] for e in c.events(1)] == [f'{EPOCH}-1']
    env.fc.sync(OTHER_EPOCH, 0)
    env.fc.notify(FakeConnector.doc(OTHER_EPOCH, 1, devices=[dev]))
    ev = c.events(3)
    assert ev[1] == {'id': f'{OTHER_EPOCH}-0', 'event': 'reset', 'data': {'reason': 'epoch'}}
    assert ev[2]['id'] == f'{OTHER_EPOCH}-1' and len(c.quiet(0.3)) == 3
    c.close()
    old = Channel(site, last_id=f'{EPOCH}-1')
    assert old.events(1)[0]['event'] == 'reset'
    # flipping back within 10 s (connectors of two sites?) waits: no reset storm
    env.fc.sync(EPOCH, 1)
    poll(lambda: 'the change waits' in env.gateway.log_text(), 5 * SLOW, 'the deferred change')
    env.fc.notify(FakeConnector.doc(OTHER_EPOCH, 2, devices=[dev]))
    ev = old.events(2)
    assert ev[1]['id'] == f'{OTHER_EPOCH}-2' and len(old.quiet(0.3)) == 2
    # ... and takes effect 10 s after the last change: one reset
    ev = old.events(3, timeout=15)
    assert ev[2] == {'id': f'{EPOCH}-1', 'event': 'reset', 'data': {'reason': 'epoch'}}
    old.close()


def test_replay_waits_for_the_first_sync_and_heartbeats_meanwhile(env_factory, site):
    """Before any notify-sync a channel is open and gets heartbeats (notify_heartbeat 1s);
    its replay decision waits: once the sync and its backlog come, it gets exactly what it
    missed, no reset."""
    env = env_factory(notify_heartbeat='1s')
    dev = cert_id(site.device_cert)
    c = Channel(site, last_id=f'{EPOCH}-1')
    c.wait(lambda c: len(c.sse.comments) >= 2, timeout=4, what='two heartbeats')
    assert c.sse.comments[0] == ': hb' and c.sse.events == []
    env.fc.sync(EPOCH, 3)
    for s in (1, 2, 3):
        env.fc.notify(FakeConnector.doc(EPOCH, s, devices=[dev]))
    assert [e['id'] for e in c.events(2)] == [f'{EPOCH}-2', f'{EPOCH}-3']
    assert len(c.quiet(0.5)) == 2
    c.close()


def test_newer_channel_replaces_the_older(env_factory, site):
    """A second channel of the same device ends the first (the last chunk, then the
    connection closes); only the newer gets the next notification; the metrics say so."""
    env = env_factory(metrics=True)
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 0)
    settle()
    old = Channel(site)
    old.wait(lambda c: c.sse.retry is not None)
    new = H2Channel(site)
    new.wait(lambda c: c.sse.retry is not None)
    old.wait(lambda c: c.ended and c.closed, what='the older channel to end')
    env.fc.notify(FakeConnector.doc(EPOCH, 1, devices=[dev]))
    assert [e['id'] for e in new.events(1)] == [f'{EPOCH}-1']
    assert old.sse.events == []
    assert env.metric('cmg_notify_channels') == 1
    assert env.metric('cmg_notify_closed_total{reason="replaced"}') == 1
    assert env.metric('cmg_notify_deliveries_total') == 1
    new.close()


def test_a_device_that_stops_reading_is_closed_and_slows_no_one(env_factory, site, tmp_path):
    """notify_buffer 16KiB: a device that never reads (a small receive buffer) is closed
    once its queue passes the limit (logged with its device id), while a device that reads
    gets every broadcast, in order, once, within a second of the last one."""
    env = env_factory(notify_buffer='16KiB')
    crt2, key2 = site_device(site, tmp_path, 'slow')
    env.fc.sync(EPOCH, 0)
    settle()
    fast = Channel(site)
    slow = Channel(site, cert=crt2, key=key2, rcvbuf=4096)
    fast.wait(lambda c: c.sse.retry is not None)
    slow.wait(lambda c: c.sse.retry is not None)
    blob = 'x' * 12000
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            fast.pump(0.05)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sent = 0
    while f'device {cert_id(crt2)} closed: more than notify_buffer' not in env.gateway.log_text():
        assert sent < 2000, 'the slow device was never closed'
        for _ in range(20):
            sent += 1
            env.fc.notify(FakeConnector.doc(EPOCH, sent, 'big', blob, all_=True))
        time.sleep(0.05)
    done = time.monotonic()
    for _ in range(5):
        sent += 1
        env.fc.notify(FakeConnector.doc(EPOCH, sent, 'after', None, all_=True))
    poll(lambda: len(fast.sse.events) >= sent, 5 * SLOW, 'every broadcast at the reading device')
    stop.set()
    t.join()
    assert time.monotonic() - done < 3 * SLOW
    assert fast.sse.ids() == [f'{EPOCH}-{s}' for s in range(1, sent + 1)]
    fast.close()
    slow.close()


def test_a_replay_bigger_than_notify_buffer_reaches_a_device_that_reads(env_factory, site):
    """notify_buffer 4KiB and 16 KiB notifications: a device that reads (with a small
    receive buffer) gets the whole replay, in order, then live events, and is not closed
    (a replay write the queue had room for is never judged overflow)."""
    env = env_factory(notify_buffer='4KiB')
    dev = cert_id(site.device_cert)
    blob = 'y' * 16000
    env.fc.sync(EPOCH, 0)
    for s in range(1, 6):
        env.fc.notify(FakeConnector.doc(EPOCH, s, 'big', blob, devices=[dev]))
    settle()
    c = Channel(site, rcvbuf=4096)
    assert [(e['id'], e['data']) for e in c.events(5)] == [(f'{EPOCH}-{s}', blob) for s in range(1, 6)]
    env.fc.notify(FakeConnector.doc(EPOCH, 6, 'after', None, all_=True))
    assert [e['id'] for e in c.events(6)][-1] == f'{EPOCH}-6'
    assert 'closed: more than notify_buffer' not in env.gateway.log_text()
    c.close()


def test_drain_ends_channels_at_once(env_factory, site, tmp_path):
    """SIGTERM with drain_timeout 20: the HTTP/1.1 channel gets its last chunk and the
    close, the HTTP/2 one END_STREAM then GOAWAY; once the devices close, the instance
    exits, long before drain_timeout: channels never hold a drain."""
    env = env_factory(drain_timeout=20)
    env.fc.sync(EPOCH, 0)
    settle()
    c1 = Channel(site)
    crt, key = site_device(site, tmp_path, 'device2')
    c2 = H2Channel(site, cert=crt, key=key)
    c1.wait(lambda c: c.sse.retry is not None)
    c2.wait(lambda c: c.sse.retry is not None)
    start = time.monotonic()
    env.gateway.signal(signal.SIGTERM, wait=False)
    c1.wait(lambda c: c.ended and c.closed, what='the HTTP/1.1 channel to end')
    c2.wait(lambda c: c.sid in c.ended, what='the HTTP/2 channel to end')
    c2.wait(lambda c: c.closed, what='the GOAWAY')
    c1.close()
    c2.close()
    poll(lambda: not env.gateway.alive(), 5 * SLOW, 'the gateway to exit')
    assert time.monotonic() - start < 5 * SLOW
    assert 'draining: 2 notification channel(s) ended' in env.gateway.log_text()


def test_notify_reports_and_resend_after_a_503(env_factory, site):
    """The gateway reports opened channels, deliveries and closes on one tunnel; a report
    answered 503 is sent again, the same (seq and contents), and the next one follows."""
    env = env_factory()
    env.fc.report_statuses = [503]
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 0)
    settle()
    c = Channel(site)
    c.wait(lambda c: c.sse.retry is not None)
    env.fc.notify(FakeConnector.doc(EPOCH, 1, devices=[dev]))
    env.fc.notify(FakeConnector.doc(EPOCH, 2, all_=True))
    c.events(2)
    reports = env.fc.wait_reports(lambda r: len(r) >= 1)
    first = reports[0]
    assert env.fc.report_attempts[0] == (503, first)
    assert first['seq'] == 1 and re.fullmatch(r'[0-9a-f]{16}', first['boot'])
    assert first['opened'] == [dev]
    assert first['delivered'] == {f'{EPOCH}-1': [dev], f'{EPOCH}-2': [dev]}
    c.close()
    reports = env.fc.wait_reports(lambda r: any(x['closed'] for x in r))
    closed = [x for x in reports if x['closed']][0]
    assert closed['seq'] == 2 and closed['closed'][0][0] == dev
    assert abs(closed['closed'][0][1] - time.time()) < 10
    assert all(len(fc.requests) for fc in env.fcs)


def site_view(reports, dev):
    """The device's channel as the site keeps it: each report's closed, then its opened."""
    state = None
    for r in reports:
        if any(c[0] == dev for c in r['closed']):
            state = 'closed'
        if dev in r['opened']:
            state = 'open'
    return state


def test_reports_say_what_holds_when_a_channel_comes_and_goes_between_two(env_factory, site):
    """A device whose channel opens and closes, or closes and opens again, between two
    reports is in both lists of the gateway's records: the report says only what holds
    when it is made, so the site, which applies closed before opened, ends right."""
    env = env_factory()
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 0)
    settle()
    c1 = Channel(site)
    c1.wait(lambda c: c.sse.retry is not None)
    c1.close()
    c2 = Channel(site)                       # back at once: open in the end
    c2.wait(lambda c: c.sse.retry is not None)
    env.fc.wait_reports(lambda r: site_view(r, dev) is not None)
    time.sleep(1.5 * SLOW)                   # what the records still send goes within 1 s
    reports = env.fc.wait_reports(lambda r: True)
    assert site_view(reports, dev) == 'open', reports
    n = len(reports)
    c2.close()
    c3 = Channel(site)                       # a short visit: closed in the end
    c3.wait(lambda c: c.sse.retry is not None)
    c3.close()
    env.fc.wait_reports(lambda r: site_view(r[n:], dev) == 'closed')
    time.sleep(1.5 * SLOW)
    reports = env.fc.wait_reports(lambda r: True)
    assert site_view(reports, dev) == 'closed', reports[n:]


def test_malformed_control_messages_are_ignored(env_factory, site):
    """Malformed notify-sync and notify messages are ignored with a warning (the tunnel and
    the gateway stay up); a good document after them is delivered."""
    env = env_factory()
    dev = cert_id(site.device_cert)
    env.fc.sync('NOT-HEX', 5)
    env.fc.sync(EPOCH, -1)
    env.fc.sync(EPOCH, 0)
    settle()
    c = Channel(site)
    c.wait(lambda c: c.sse.retry is not None)
    good = FakeConnector.doc(EPOCH, 1, 'policy', {'ok': True}, devices=[dev])
    bad = [dict(good, type='reset'), dict(good, type='bad type!'), dict(good, type='x' * 65),
           dict(good, data='y' * (16 * 1024 + 1)), dict(good, devices=[]),
           dict(good, devices=[dev, 7]), dict(good, devices=['has space']),
           dict(good, devices=['z' * 128]), dict(good, all=True),
           {k: v for k, v in good.items() if k != 'expires'}, dict(good, seq='1'),
           dict(good, seq=1.5), dict(good, id=f'{OTHER_EPOCH}-1'), dict(good, id=f'{EPOCH}-2'),
           dict(good, devices=[f'd{i}' for i in range(100001)])]
    for doc in bad:
        env.fc.notify(doc)
    env.fc.control({'type': 'notify', 'id': 5})
    env.fc.control({'type': 'notify-sync'})
    env.fc.notify(good)
    assert [e['id'] for e in c.events(1)] == [f'{EPOCH}-1']
    assert len(c.quiet(0.3)) == 1
    log = env.gateway.log_text()
    assert log.count('notify-sync ignored') == 3
    assert log.count(f'notify {EPOCH}-1 ignored: expected') >= 11
    assert env.gateway.alive() and env.fc.control_stream is not None and not env.fc.closed.is_set()
    c.close()


def test_refusals_cost_like_any_other(env_factory, site):
    """No credential 401, POST/HEAD 405, no Accept: text/event-stream 406; none forwarded."""
    env = env_factory()
    assert Channel(site, no_cert=True).status == 401
    assert Channel(site, method='POST').status == 405
    assert Channel(site, method='HEAD').status == 405
    assert Channel(site, accept='text/html').status == 406
    assert Channel(site, accept=None).status == 406
    assert not [p for _, p in env.fc.requests if 'CCM_Notify' in (p or '')]
    assert 'CMGService_Not_Acceptable' in env.gateway.log_text()


# ---------------------------------------------------------------- with the site's policy

def feed_policy(dep):
    """The signed policy the site's feed serves a connector now."""
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    ctx.load_cert_chain(str(dep.site.dir / 'connector.crt'), str(dep.site.dir / 'connector.key'))
    url = f'https://127.0.0.1:{dep.feed_port}/v1/connector/feed?after=0'
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return json.loads(r.read())['policy']


def device_token(dep, jws, crt, sub, ttl=3600):
    """A site device token for sub bound to certificate crt, signed as the site signs them."""
    header = json.loads(unb64u(jws.split('.')[0]))
    payload = json.loads(unb64u(jws.split('.')[1]))
    key = serialization.load_pem_private_key((dep.site.dir / 'site-signing.key').read_bytes(), None)
    now = int(time.time())
    x5t = b64u(bytes.fromhex(thumbprint(crt)))
    return sign_jwt(key, {'iss': payload['iss'], 'aud': payload['service_name'], 'sub': sub,
                          'cmg_use': 'device', 'jti': str(uuid.uuid4()), 'iat': now,
                          'nbf': now - 5, 'exp': now + ttl, 'cnf': {'x5t#S256': x5t}},
                    kid=header['kid'])


@pytest.fixture
def dep(procs, tmp_path, svc):
    d = Deployment(procs, tmp_path, svc, start=False)
    d.start_site()
    return d


def push_policy(dep, env):
    jws = feed_policy(dep)
    version = json.loads(unb64u(jws.split('.')[1]))['version']
    env.fc.policy(jws)
    poll(lambda: f'policy version {version} in force' in env.gateway.log_text(), 10 * SLOW,
         f'policy version {version} at the gateway', check=env.procs.check)
    return jws


def test_three_credentials_bulk_token_and_blocking(dep, procs, tmp_path):
    """A site device token, an OIDC token and a certificate each open a channel named by
    the device id the gateway forwards; a bulk token is refused 403; a channel whose token
    expires is closed within 5 s of the expiry; a policy that blocks the certificate device
    closes its channel within 5 s."""
    idp = IdP(tmp_path)
    v = dep.policy_version()
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', idp.jwks)
    poll(lambda: dep.policy_version() > v, 5 * SLOW, 'a policy with the OIDC issuer')
    env = Env(procs, dep.site, tmp_path)
    try:
        jws = push_policy(dep, env)
        env.fc.sync(EPOCH, 0)
        crt2, key2 = site_device(dep.site, tmp_path, 'tokdev')
        tok = device_token(dep, jws, crt2, 'dev-123')
        _, bulk = dep.bulk_token()
        refused = Channel(dep.site, cert=crt2, key=key2, token=bulk)
        assert refused.status == 403 and b'CMGService_Bulk_Token' in refused.body
        by_token = Channel(dep.site, cert=crt2, key=key2, token=tok)
        by_oidc = H2Channel(dep.site, token=idp.token(deviceid='aad-dev-9'), cert=crt2, key=key2)
        by_cert = Channel(dep.site)
        assert by_token.status == 200
        for c in (by_token, by_oidc, by_cert):
            c.wait(lambda c: c.sse.retry is not None)
        env.fc.notify(FakeConnector.doc(EPOCH, 1, devices=['dev-123', 'aad-dev-9',
                                                           cert_id(dep.site.device_cert)]))
        for c in (by_token, by_oidc, by_cert):
            assert [e['id'] for e in c.events(1)] == [f'{EPOCH}-1']
        # a token that ends 3 s from now (the policy's clock skew, 120 s, included)
        crt3, key3 = site_device(dep.site, tmp_path, 'shortdev')
        short = Channel(dep.site, cert=crt3, key=key3,
                        token=device_token(dep, jws, crt3, 'dev-short', ttl=3 - 120))
        assert short.status == 200
        start = time.monotonic()
        short.wait(lambda c: c.ended and c.closed, timeout=8, what='the expired token channel')
        assert time.monotonic() - start < 3 + 5
        assert 'notify channel of device dev-short closed: its token expired' in env.gateway.log_text()
        v = dep.policy_version()
        dep.cmg_site('device', 'block', cert_id(dep.site.device_cert))
        poll(lambda: dep.policy_version() > v, 5 * SLOW, 'a policy that blocks the device')
        start = time.monotonic()
        push_policy(dep, env)
        by_cert.wait(lambda c: c.ended and c.closed, timeout=5, what='the blocked channel')
        assert time.monotonic() - start < 5
        env.fc.notify(FakeConnector.doc(EPOCH, 2, all_=True))
        assert [e['id'] for e in by_token.events(2)][1] == f'{EPOCH}-2'
        assert [e['id'] for e in by_oidc.events(2)][1] == f'{EPOCH}-2'
    finally:
        env.close()


def resigned_policy(dep, jws, **change):
    """The site's policy with fields changed (None removes one), a version above, signed
    with the site's key as the site signs it."""
    header = json.loads(unb64u(jws.split('.')[0]))
    payload = json.loads(unb64u(jws.split('.')[1]))
    for k, v in change.items():
        if v is None:
            payload.pop(k, None)
        else:
            payload[k] = v
    payload['version'] += 1
    key = serialization.load_pem_private_key((dep.site.dir / 'site-signing.key').read_bytes(), None)
    return sign_jwt(key, payload, kid=header.get('kid'),
                    header_extra={k: v for k, v in header.items() if k not in ('alg', 'kid')})


def test_policy_closes_revoked_site_tokens_blocked_oidc_users_and_oidc_turned_off(dep, procs,
                                                                                  tmp_path):
    """Channels opened with a site device token whose jti a new policy revokes, with an
    OIDC token whose user (oidc:<upn>) it blocks, and with an OIDC token after a policy
    turns OIDC off, are each closed within 5 s of that policy; a certificate channel stays."""
    idp = IdP(tmp_path)
    v = dep.policy_version()
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', idp.jwks)
    poll(lambda: dep.policy_version() > v, 5 * SLOW, 'a policy with the OIDC issuer')
    env = Env(procs, dep.site, tmp_path)
    try:
        jws = push_policy(dep, env)
        env.fc.sync(EPOCH, 0)
        crt2, key2 = site_device(dep.site, tmp_path, 'tokdev')
        tok = device_token(dep, jws, crt2, 'dev-123')
        jti = json.loads(unb64u(tok.split('.')[1]))['jti']
        by_token = Channel(dep.site, cert=crt2, key=key2, token=tok)
        by_upn = H2Channel(dep.site, token=idp.token(deviceid='aad-dev-1'), cert=crt2, key=key2)
        by_oidc = Channel(dep.site, token=idp.token(deviceid='aad-dev-2', upn='bob@example.test'),
                          cert=crt2, key=key2)
        by_cert = Channel(dep.site)
        for c in (by_token, by_upn, by_oidc, by_cert):
            c.wait(lambda c: c.sse.retry is not None)
        payload = json.loads(unb64u(jws.split('.')[1]))
        blocking = resigned_policy(dep, jws, revoked_tokens=payload.get('revoked_tokens', []) + [jti],
                                   blocked_devices=payload.get('blocked_devices', []) +
                                   ['oidc:alice@example.test'])
        start = time.monotonic()
        env.fc.policy(blocking)
        by_token.wait(lambda c: c.ended and c.closed, timeout=5, what='the revoked token channel')
        by_upn.wait(lambda c: c.sid in c.ended, timeout=5, what='the blocked OIDC user channel')
        assert time.monotonic() - start < 5
        assert by_oidc.quiet(0.3) == [] and not by_oidc.ended
        start = time.monotonic()
        env.fc.policy(resigned_policy(dep, blocking, oidc=None))
        by_oidc.wait(lambda c: c.ended and c.closed, timeout=5, what='the OIDC channel, OIDC off')
        assert time.monotonic() - start < 5
        env.fc.notify(FakeConnector.doc(EPOCH, 1, all_=True))
        assert [e['id'] for e in by_cert.events(1)] == [f'{EPOCH}-1']
        log = env.gateway.log_text()
        for dev in ('dev-123', 'aad-dev-1', 'aad-dev-2'):
            assert f'notify channel of device {dev} closed: blocked or revoked' in log
    finally:
        env.close()


def test_a_policy_without_a_usable_crl_keeps_certificate_channels(dep, procs, tmp_path):
    """A policy that checks revocation but carries no CRL refuses new certificate
    channels (401 CMGService_CRL_Unavailable) and leaves the open ones be: an unusable
    CRL does not close the whole fleet at once."""
    env = Env(procs, dep.site, tmp_path)
    try:
        jws = push_policy(dep, env)
        env.fc.sync(EPOCH, 0)
        by_cert = Channel(dep.site)
        by_cert.wait(lambda c: c.sse.retry is not None)
        no_crl = resigned_policy(dep, jws, crl=None, check_revocation=True)
        version = json.loads(unb64u(no_crl.split('.')[1]))['version']
        env.fc.policy(no_crl)
        poll(lambda: f'policy version {version} in force' in env.gateway.log_text(), 5 * SLOW,
             'the policy without a CRL')
        refused = Channel(dep.site)
        assert refused.status == 401 and b'CMGService_CRL_Unavailable' in refused.body
        env.fc.notify(FakeConnector.doc(EPOCH, 1, all_=True))
        assert [e['id'] for e in by_cert.events(1)] == [f'{EPOCH}-1']
        assert not by_cert.ended
    finally:
        env.close()


def test_reports_never_label_old_deliveries_with_a_new_epoch(env_factory, site):
    """Deliveries of the old epoch still unsent when the site's epoch changes (the site
    answered 503 meanwhile) are dropped, never reported under the new epoch's ids."""
    env = env_factory()
    env.fc.report_statuses = [503, 503, 503]
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 0)
    settle()
    c = Channel(site)
    c.wait(lambda c: c.sse.retry is not None)
    env.fc.notify(FakeConnector.doc(EPOCH, 1, devices=[dev]))
    c.events(1)
    poll(lambda: env.fc.report_attempts, 5 * SLOW, 'the first report (answered 503)')
    env.fc.notify(FakeConnector.doc(EPOCH, 2, devices=[dev]))
    env.fc.notify(FakeConnector.doc(EPOCH, 3, devices=[dev]))
    c.events(3)
    env.fc.sync(OTHER_EPOCH, 0)
    env.fc.notify(FakeConnector.doc(OTHER_EPOCH, 1, devices=[dev]))
    assert c.events(5)[4]['id'] == f'{OTHER_EPOCH}-1'
    reports = env.fc.wait_reports(lambda r: any(f'{OTHER_EPOCH}-1' in x['delivered'] for x in r),
                                  timeout=10)
    keys = [k for x in reports for k in x['delivered']]
    assert f'{EPOCH}-1' in keys
    assert f'{OTHER_EPOCH}-2' not in keys and f'{OTHER_EPOCH}-3' not in keys, keys
    c.close()


def test_a_reset_skips_only_what_the_window_held(env_factory, site):
    """The window holds 3..4 of a site whose newest is 6 (the rest of the backlog late):
    a device whose Last-Event-ID is older than the window gets its reset, then 5 and 6
    when they come (they were skipped for good before)."""
    env = env_factory()
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 6)
    env.fc.notify(FakeConnector.doc(EPOCH, 3, devices=[dev]))
    env.fc.notify(FakeConnector.doc(EPOCH, 4, devices=[dev]))
    settle()
    c = Channel(site, last_id=f'{EPOCH}-1')
    ev = c.events(1, timeout=5)   # after the sync's 2 s grace
    assert ev[0] == {'id': f'{EPOCH}-6', 'event': 'reset', 'data': {'reason': 'window'}}
    env.fc.notify(FakeConnector.doc(EPOCH, 5, devices=[dev]))
    env.fc.notify(FakeConnector.doc(EPOCH, 6, devices=[dev]))
    assert [e['id'] for e in c.events(3)[1:]] == [f'{EPOCH}-5', f'{EPOCH}-6']
    c.close()


def test_hostile_channel_inputs(env_factory, site):
    """HTTP/1.0 gets 505 (a channel is an endless chunked stream); a Last-Event-ID of 20
    digits gets a reset, not a wrapped seq; a device that sends data on its open channel
    is closed; a connector notify with a seq far beyond the site's newest is ignored (the
    next real one is delivered); a reload that changes notify_window warns and keeps it."""
    env = env_factory()
    dev = cert_id(site.device_cert)
    env.fc.sync(EPOCH, 1)
    env.fc.notify(FakeConnector.doc(EPOCH, 1, devices=[dev]))
    settle()
    s = tls_connect(site)
    s.sendall(f'GET /CCM_Notify HTTP/1.0\r\nHost: {site.name}\r\n'
              f'Accept: text/event-stream\r\n\r\n'.encode())
    s.settimeout(5)
    assert s.recv(65536).startswith(b'HTTP/1.1 505 ')
    s.close()
    wrapped = Channel(site, last_id=f'{EPOCH}-18446744073709551617')
    assert wrapped.events(1)[0]['event'] == 'reset'
    wrapped.close()
    chatty = Channel(site)
    chatty.events(1)
    chatty.sock.sendall(b'x' * 16384)
    chatty.wait(lambda c: c.closed, what='the channel of a device that sends data')
    c = Channel(site, last_id=f'{EPOCH}-1')
    c.wait(lambda c: c.sse.retry is not None)
    env.fc.notify(FakeConnector.doc(EPOCH, 10 ** 12, devices=[dev]))
    env.fc.notify(FakeConnector.doc(EPOCH, 2, devices=[dev]))
    assert [e['id'] for e in c.events(1)] == [f'{EPOCH}-2']
    assert 'more than notify_window (1024) beyond the newest' in env.gateway.log_text()
    ini_set(site.gateway_conf, 'gateway', 'notify_window', '64')
    os.kill(env.gateway.pid, signal.SIGHUP)
    poll(lambda: 'notify_window changed (1024 -> 64): it applies at the next start'
         in env.gateway.log_text(), 5 * SLOW, 'the reload warning')
    c.close()
