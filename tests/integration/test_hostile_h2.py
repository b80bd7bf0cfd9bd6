"""Hostile HTTP/2 peers at the device port: each attack runs while a legitimate device keeps
getting 200s (p99 <= 1 s); the gateway's RSS stays under 128 MiB (reported only in sanitized
builds) and its CPU is not pegged; the attacker's connections close within the documented
deadline (header_timeout = 2 s, idle_timeout = 4 s here); and the internal service sees
nothing of the attacker (its request count grows by the legitimate device's requests only).

Frames are written by hand (the h2 package would refuse to send most of them); the h2
package is the client where a well-behaved one is needed (trailers)."""
import hashlib
import json
import os
import select
import socket
import ssl
import struct
import threading
import time

import h2.connection
import h2.config
import h2.events
import pytest

from cmgtest import SANITIZED, SLOW, DeviceConnection, bring_up, client_context, ini_set
from internal_service import POLICY

HEADER_TIMEOUT, IDLE_TIMEOUT = 2, 4
SLACK = 1.5 * SLOW                     # timer rounding, scheduling, a loaded machine
RSS_LIMIT_KIB = 128 * 1024
CPU_LIMIT = 0.9                        # of one core, averaged over the attack
PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0, 1, 3, 4, 6, 7, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
ENHANCE_YOUR_CALM = 0xb


@pytest.fixture
def hsite(procs, site, svc):
    """Short deadlines; gateway and connector serving."""
    ini_set(site.gateway_conf, 'gateway', 'header_timeout', HEADER_TIMEOUT)
    ini_set(site.gateway_conf, 'gateway', 'idle_timeout', IDLE_TIMEOUT)
    (gateway,), _ = bring_up(procs, site)
    site.gateway_proc = gateway
    return site


# ---------------------------------------------------------------- frames

def frame(ftype, flags, sid, payload=b''):
    return struct.pack('>I', len(payload))[1:] + bytes([ftype, flags]) + struct.pack('>I', sid) + payload


def hpack_int(value, prefix_bits, first=0):
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + [value])


def literal(name, value, indexed=False):
    """A literal field with a new name: incremental indexing, or not indexed."""
    return (hpack_int(0, 6, 0x40) if indexed else b'\x00') + hpack_int(len(name), 7) + name + \
        hpack_int(len(value), 7) + value


def request_block(path, authority, method=b'GET'):
    return (literal(b':method', method) + b'\x87' + literal(b':path', path.encode()) +
            literal(b':authority', authority.encode()))


def parse_frames(data):
    """[(type, flags, stream, payload)] of the whole frames in data."""
    frames, i = [], 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i:i + 3], 'big')
        if i + 9 + n > len(data):
            break
        frames.append((data[i + 3], data[i + 4], int.from_bytes(data[i + 5:i + 9], 'big') & 0x7fffffff,
                       data[i + 9:i + 9 + n]))
        i += 9 + n
    return frames


def goaway_code(data):
    codes = [struct.unpack('>I', p[4:8])[0] for t, _, _, p in parse_frames(data) if t == GOAWAY]
    return codes[0] if codes else None


# ---------------------------------------------------------------- connections

def h2_socket(site, cert=False, timeout=10, preface=True):
    """TLS to the gateway with ALPN h2 (no client certificate unless cert), preface sent."""
    sock = socket.create_connection((site.addr, site.port), timeout=timeout)
    tls = client_context(site, cert=None if cert else False, alpn=('h2',)).wrap_socket(
        sock, server_hostname=site.name)
    assert tls.selected_alpn_protocol() == 'h2'
    if preface:
        tls.sendall(PREFACE + frame(SETTINGS, 0, 0))
    return tls


def drive(sock, within, chunks=(), pause=0.0):
    """Sends chunks (one every `pause` seconds) and reads what comes back, in this one
    thread (an SSL socket is not for two), until the gateway closes the connection.
    Returns (seconds it took, bytes read, chunks sent); fails past `within` seconds."""
    sock.setblocking(False)
    start, got, sent, pending, next_send = time.monotonic(), b'', 0, b'', 0.0
    while True:
        now = time.monotonic()
        assert now - start < within, f'the gateway kept the connection open past {within:.1f} s'
        if not pending and sent < len(chunks) and now >= next_send:
            pending, next_send = chunks[sent], now + pause
            sent += 1
        readable, writable, _ = select.select([sock], [sock] if pending else [], [], 0.05)
        if readable or sock.pending():
            try:
                data = sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                data = None
            except (ConnectionError, ssl.SSLError, OSError):
                data = b''
            if data == b'':
                return time.monotonic() - start, got, sent
            got += data or b''
        if writable and pending:
            try:
                pending = pending[sock.send(pending[:16384]):]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except (ConnectionError, ssl.SSLError, OSError):
                pending, chunks = b'', ()      # closed: what is left to read tells


# ---------------------------------------------------------------- the observers

class LegitDevice(threading.Thread):
    """A device with a certificate fetching policy.xml over one kept-alive connection,
    back to back, while the attack runs; latencies and statuses kept."""

    def __init__(self, site):
        super().__init__(daemon=True)
        self.site, self.stop, self.results = site, threading.Event(), []

    def run(self):
        conn = DeviceConnection(self.site, timeout=10)
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                conn.request('GET', self.site.path('policy.xml'))
                r = conn.getresponse()
                ok = r.status == 200 and r.read() == POLICY
            except (OSError, ssl.SSLError, ConnectionError) as e:
                ok = repr(e)
                conn.close()
                conn = DeviceConnection(self.site, timeout=10)
            self.results.append((time.monotonic() - start, ok))
            time.sleep(0.02)
        conn.close()

    def check(self):
        self.stop.set()
        self.join(15)
        failures = [ok for _, ok in self.results if ok is not True]
        lat = sorted(t for t, _ in self.results)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None
        print(f'legit device: {len(lat)} requests, p99 {p99 * 1000:.0f} ms, failures {len(failures)}')
        assert len(lat) >= 5, 'the legitimate device got almost nothing done'
        assert not failures, f'the legitimate device failed: {failures[:3]}'
        assert p99 <= 1.0 * SLOW, f'legitimate p99 {p99:.2f} s'


class Watch:
    """Gateway CPU over the attack, its RSS, and what the service saw."""

    def __init__(self, site, svc, may_forward=0):
        self.site, self.svc, self.proc = site, svc, site.gateway_proc
        self.may_forward = may_forward
        self.device = LegitDevice(site)

    def cpu_ticks(self):
        fields = open(f'/proc/{self.proc.pid}/stat').read().rsplit(')', 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def __enter__(self):
        self.t0, self.c0 = time.monotonic(), self.cpu_ticks()
        self.count0 = self.svc.count
        self.device.start()
        return self

    def __exit__(self, *exc):
        if exc[0]:
            self.device.stop.set()
            return False
        cpu = (self.cpu_ticks() - self.c0) / os.sysconf('SC_CLK_TCK') / (time.monotonic() - self.t0)
        rss = self.proc.peak_rss_kib()
        print(f'gateway: CPU {cpu * 100:.0f} % of a core, peak RSS {rss / 1024:.1f} MiB')
        self.device.check()
        if not SANITIZED:
            assert rss < RSS_LIMIT_KIB, f'gateway peaked at {rss / 1024:.1f} MiB'
            assert cpu < CPU_LIMIT, f'gateway CPU at {cpu * 100:.0f} %'
        # Every request of the legitimate device reached the service once (it got a 200).
        stats = self.svc.stats()
        seen = stats['requests'] - self.count0 - len(self.device.results)
        print(f'the internal service saw {seen} of the attacker\'s requests')
        assert seen <= self.may_forward, \
            f'the internal service saw the attacker: {[p for p in stats["paths"] if "attack" in p][:3]}'
        return False


# ---------------------------------------------------------------- the attacks

def test_half_open_refused_streams(hsite, svc):
    """40 connections x 100 HEADERS (unmapped path, no END_STREAM) in one packet each: every
    stream answered and reset; the connections close at header_timeout."""
    block = request_block('/attack/unmapped', hsite.name)
    packet = b''.join(frame(HEADERS, END_HEADERS, 2 * i + 1, block) for i in range(100))
    with Watch(hsite, svc):
        socks = [h2_socket(hsite) for _ in range(40)]
        for s in socks:
            s.sendall(packet)
        start = time.monotonic()
        results = [drive(s, HEADER_TIMEOUT + SLACK + 1) for s in socks]
        took = time.monotonic() - start
    frames = parse_frames(results[0][1])
    resets = {sid for t, _, sid, _ in frames if t == RST_STREAM}
    answered = {sid for t, _, sid, _ in frames if t == HEADERS}
    print(f'40 attackers closed within {took:.1f} s; first: {len(answered)} answered, {len(resets)} reset')
    assert len(answered) == 100 and resets == answered
    for s in socks:
        s.close()


def test_ping_keepalive_does_not_hold_a_connection(hsite, svc):
    """PINGs every 0.3 s: without a request the connection closes at header_timeout, after
    one served request at idle_timeout; neither is extended by the PINGs."""
    pings = [frame(PING, 0, 0, struct.pack('>Q', i)) for i in range(100)]
    with Watch(hsite, svc, may_forward=1):    # the one request that serves the second connection
        s = h2_socket(hsite)
        took, _, _ = drive(s, HEADER_TIMEOUT + SLACK, pings, 0.3)
        print(f'PINGs without a request: closed after {took:.1f} s')

        s2 = h2_socket(hsite, cert=True)
        s2.sendall(frame(HEADERS, END_HEADERS | END_STREAM, 1,
                         request_block(hsite.path('policy.xml'), hsite.name)))
        took, got, _ = drive(s2, IDLE_TIMEOUT + SLACK, pings, 0.3)
        print(f'PINGs after one request: closed after {took:.1f} s')
        assert took >= IDLE_TIMEOUT - 1, 'closed before idle_timeout: was it the request deadline?'
        assert any(t == HEADERS and sid == 1 for t, _, sid, _ in parse_frames(got)), 'no answer'
    s.close()
    s2.close()


def test_silent_h2_connection_is_held_to_header_timeout(hsite, svc):
    with Watch(hsite, svc):
        socks = [h2_socket(hsite) for _ in range(20)]
        took = max(drive(s, HEADER_TIMEOUT + SLACK)[0] for s in socks)
        print(f'20 silent connections closed within {took:.1f} s')
    for s in socks:
        s.close()


def test_headers_trickled_a_byte_a_second(hsite, svc):
    """The first HEADERS frame, one byte a second: closed at header_timeout. Then on a
    connection that was served: a HEADERS frame's payload a byte a second is closed at
    header_timeout from the frame's start, before idle_timeout."""
    hf = frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block('/attack/trickle', hsite.name))
    with Watch(hsite, svc, may_forward=1):    # the one request that serves the second connection
        s = h2_socket(hsite)
        took, _, _ = drive(s, HEADER_TIMEOUT + SLACK, [bytes([b]) for b in hf], 1.0)
        print(f'HEADERS a byte a second: closed after {took:.1f} s')

        s2 = h2_socket(hsite, cert=True)
        s2.sendall(frame(HEADERS, END_HEADERS | END_STREAM, 1,
                         request_block(hsite.path('policy.xml'), hsite.name)))
        time.sleep(0.5)
        hf3 = frame(HEADERS, END_HEADERS | END_STREAM, 3, request_block(hsite.path('attack/trickle'), hsite.name))
        s2.sendall(hf3[:10])
        took, _, _ = drive(s2, HEADER_TIMEOUT + SLACK, [bytes([b]) for b in hf3[10:]], 1.0)
        print(f'served, then a HEADERS payload a byte a second: closed after {took:.1f} s')
        assert took < IDLE_TIMEOUT, 'closed by idle_timeout, not by the header deadline'
    s.close()
    s2.close()


def hpack_bomb(site, first):
    """A request whose header block decodes to ~64 MiB: one 4 KiB field put in the dynamic
    table (on the first block), then ~16,000 one-byte references to it."""
    head = request_block(site.path('attack/bomb'), site.name)
    if first:
        head += literal(b'x-bomb', b'a' * 4000, indexed=True)
    return head + b'\xbe' * 16000          # index 62: the newest dynamic table entry


def header_frames(sid, block, end_stream=True):
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    out = frame(HEADERS, (END_STREAM if end_stream else 0) | (END_HEADERS if len(chunks) == 1 else 0),
                sid, chunks[0])
    for i, c in enumerate(chunks[1:], 2):
        out += frame(CONTINUATION, END_HEADERS if i == len(chunks) else 0, sid, c)
    return out


def test_hpack_bomb(hsite, svc):
    """An authenticated device sends HPACK-bombed header blocks on new streams as fast as it
    can: each fails at the first field past max_header_size; the connection is told to go
    away (ENHANCE_YOUR_CALM) or closed at header_timeout, and reconnecting starts over."""
    bombs, calm, sent = 0, 0, 0
    with Watch(hsite, svc):
        end = time.monotonic() + 4
        while time.monotonic() < end:
            s = h2_socket(hsite, cert=True)
            chunks = [header_frames(2 * i + 1, hpack_bomb(hsite, i == 0)) for i in range(400)]
            took, got, n = drive(s, HEADER_TIMEOUT + SLACK, chunks)
            bombs += 1
            sent += n
            calm += goaway_code(got) == ENHANCE_YOUR_CALM
            s.close()
    print(f'{bombs} bombing connections, {sent} bombs sent (~{sent * 64} MiB decoded), {calm} told ENHANCE_YOUR_CALM')


ATTACK_SECONDS = 2.5


@pytest.mark.parametrize('cert', [False, True], ids=['anonymous', 'authenticated'])
def test_rapid_reset(hsite, svc, cert):
    """HEADERS then RST_STREAM, over and over, reconnecting for 2.5 s: each connection gets
    GOAWAY ENHANCE_YOUR_CALM and is closed. Anonymous streams are refused before anything
    is forwarded; an authenticated device's streams are admitted, and those reset within
    one read never leave the gateway, but one whose RST comes in a later read may reach
    the internal service: at most the cap (100 a second) per connection, far fewer seen."""
    block = request_block(hsite.path('attack/reset'), hsite.name)
    pairs = b''.join(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, block) +
                     frame(RST_STREAM, 0, 2 * i + 1, struct.pack('>I', 8)) for i in range(5000))
    chunks = [pairs[i:i + 16384] for i in range(0, len(pairs), 16384)]
    conns, worst = 0, 0.0
    with Watch(hsite, svc, may_forward=100 if cert else 0) as watch:
        end = time.monotonic() + ATTACK_SECONDS
        while time.monotonic() < end and conns < (10 if cert else 10 ** 6):
            s = h2_socket(hsite, cert=cert)
            took, got, _ = drive(s, 2 * SLACK, chunks)
            assert goaway_code(got) == ENHANCE_YOUR_CALM, f'GOAWAY {goaway_code(got)}'
            conns, worst = conns + 1, max(worst, took)
            s.close()
        time.sleep(0.5 if cert else 0)   # what was forwarded has reached the service
        watch.may_forward *= conns
    print(f'rapid reset: {conns} connections, each told ENHANCE_YOUR_CALM and closed within {worst:.2f} s')


def test_continuation_flood(hsite, svc):
    """A HEADERS frame without END_HEADERS, then CONTINUATION frames without end (with
    fields, and empty): closed after the few that max_header_size needs."""
    first = frame(HEADERS, 0, 1, request_block(hsite.path('attack/continuation'), hsite.name))
    for payload in (literal(b'x-c', b'v' * 100), b''):
        conns, worst = 0, 0.0
        with Watch(hsite, svc):
            end = time.monotonic() + ATTACK_SECONDS / 2
            while time.monotonic() < end:
                s = h2_socket(hsite, cert=True)
                took, _, n = drive(s, 2 * SLACK, [first] + [frame(CONTINUATION, 0, 1, payload) * 100] * 1000)
                conns, worst = conns + 1, max(worst, took)
                s.close()
        print(f'CONTINUATION flood ({len(payload)}-byte frames): {conns} connections, each closed '
              f'within {worst:.2f} s')


def test_trailers_end_the_request(hsite, svc):
    """A request body followed by trailers (HEADERS with END_STREAM): 200, body intact."""
    body = os.urandom(100_000)
    sock = h2_socket(hsite, cert=True, preface=False)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding='utf-8'))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    conn.send_headers(1, [(':method', 'POST'), (':scheme', 'https'), (':authority', hsite.name),
                          (':path', hsite.path('upload')), ('te', 'trailers')])
    sent, status, data, ended = 0, None, b'', False
    while not ended:
        while sent < len(body) and conn.local_flow_control_window(1) > 0:
            n = min(len(body) - sent, conn.local_flow_control_window(1), conn.max_outbound_frame_size)
            conn.send_data(1, body[sent:sent + n])
            sent += n
            if sent == len(body):
                conn.send_headers(1, [('x-checksum', 'trailer')], end_stream=True)
        sock.sendall(conn.data_to_send())
        chunk = sock.recv(65536)
        assert chunk, 'the gateway closed the connection'
        for ev in conn.receive_data(chunk):
            if isinstance(ev, h2.events.ResponseReceived):
                status = dict(ev.headers)[':status']
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, 1)
            elif isinstance(ev, h2.events.StreamEnded):
                ended = True
            elif isinstance(ev, h2.events.StreamReset):
                raise AssertionError(f'stream reset: {ev.error_code}')
        sock.sendall(conn.data_to_send())
    sock.close()
    assert status == '200'
    assert json.loads(data) == {'bytes': len(body), 'sha256': hashlib.sha256(body).hexdigest()}


def test_stalled_request_body_ends_its_stream(hsite, svc):
    """An admitted upload whose body makes no progress for idle_timeout is reset (it would
    otherwise keep the connection busy, and so open, for ever); then, with nothing admitted
    left, the connection closes idle_timeout later. A body that keeps coming, however
    slowly, is not cut: 7 bytes a second apart for longer than idle_timeout get 200."""
    post = request_block(hsite.path('upload'), hsite.name, method=b'POST')
    s = h2_socket(hsite, cert=True)
    s.sendall(frame(HEADERS, END_HEADERS, 1, post))
    took, got, _ = drive(s, 2 * IDLE_TIMEOUT + 2 * SLACK)
    resets = [sid for t, _, sid, _ in parse_frames(got) if t == RST_STREAM and sid == 1]
    print(f'stalled upload: connection closed after {took:.1f} s')
    assert resets, 'stream 1 was never reset'
    assert took >= 2 * IDLE_TIMEOUT - 1
    s.close()

    s = h2_socket(hsite, cert=True)
    chunks = [frame(HEADERS, END_HEADERS, 1, post)]
    chunks += [frame(DATA, 0, 1, b'x') for _ in range(6)] + [frame(DATA, END_STREAM, 1, b'x')]
    s.setblocking(True)
    start = time.monotonic()
    for c in chunks:
        s.sendall(c)
        time.sleep(1)
    s.settimeout(5 * SLOW)
    got = b''
    while b'"bytes": 7' not in got:
        data = s.recv(65536)
        assert data, f'closed after {time.monotonic() - start:.1f} s: {parse_frames(got)}'
        got += data
    s.close()
