"""No head-of-line blocking across a tunnel: devices that stop reading hold only their own
streams' buffers. Twenty HTTP/1.1 devices that stop reading mid-download, or one HTTP/2 device
that opens no window (SETTINGS_INITIAL_WINDOW_SIZE = 0) on 17 downloads, do not stall the other
devices on the same tunnel (their requests keep getting whole 200s, and a download of their own
completes); after send_timeout without progress their streams are ended, with a log line naming
the device, the path and the bytes sent; the gateway's RSS stays bounded. A device that reads
slowly but steadily is not a stalled one: its download completes intact, however long it takes."""
import hashlib
import os
import re
import signal
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from cmgtest import SANITIZED, SLOW, CurlProcess, bring_up, client_context, ini_set, poll, request, run_cmg
from internal_service import blob, stream_sha256

MiB = 1 << 20
SEND_TIMEOUT = 3                 # seconds, in gateway.conf
DOWNLOAD = 64 * MiB              # what the stalled devices ask for: far more than anything buffers
STREAM_WINDOW = 4 * MiB          # the gateway's tunnel stream window: what one stalled stream holds
RSS_LIMIT_KIB = 128 * 1024
SEND_TIMEOUT_LINE = re.compile(r'send timeout: device peer=\S+ client=.* path=(\S+) sent=(\d+) bytes')


@pytest.fixture
def tunnel(procs, site):
    """A gateway with send_timeout = 3 s and a connector: one tunnel for every device."""
    ini_set(site.gateway_conf, 'gateway', 'send_timeout', str(SEND_TIMEOUT))
    (gateway,), _ = bring_up(procs, site)
    return gateway


def stalled_socket(site):
    """A TLS connection to the gateway with a small receive buffer: the kernel hides little
    of what a device that stops reading leaves with the gateway."""
    raw = socket.socket(socket.AF_INET6 if ':' in site.addr else socket.AF_INET)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(10 * SLOW)
    raw.connect((site.addr, site.port))
    return client_context(site).wrap_socket(raw, server_hostname=site.name)


def service_ran_ahead(svc, nbytes):
    """The internal service has written at least nbytes of download bodies."""
    return svc.stats()['download_bytes'] >= nbytes


def other_devices_unaffected(site, seed):
    """Requests of another device on the same tunnel: 30 small ones, each answered whole, and a
    download of several stream windows, intact. Returns the latencies of the small ones."""
    size = 3 * STREAM_WINDOW
    dl = CurlProcess(site, site.path(f'download?size={size}&seed={seed}'), timeout=30 * SLOW)
    try:
        latencies = []
        for i in range(30):
            t0 = time.monotonic()
            r = request(site, 'GET', site.path(f'blob/hol-{seed}-{i}'), timeout=10 * SLOW)
            latencies.append(time.monotonic() - t0)
            assert (r.status, r.body) == (200, blob(f'hol-{seed}-{i}')), r
        r = dl.wait(timeout=30 * SLOW)
    finally:
        dl.kill()
    assert (r.rc, r.status) == (0, 200), r
    assert (dl.received, dl.sha256) == (size, stream_sha256(size, seed)), 'the download was not intact'
    return sorted(latencies)


def p99(latencies):
    return latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]


def send_timeouts(gateway):
    return SEND_TIMEOUT_LINE.findall(gateway.log_text())


def drain_until_closed(sock, deadline):
    """Read what the gateway left in the socket until it closes; the bytes read, or None if it
    is still open at the deadline."""
    got = 0
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(1 << 20)
        except socket.timeout:
            continue
        except (ConnectionError, ssl.SSLError):
            return got
        if not data:
            return got
        got += len(data)
    return None


# ---------------------------------------------------------------- HTTP/1.1 devices that stop reading

def test_twenty_http1_devices_that_stop_reading_stall_only_themselves(procs, site, svc, tunnel):
    gateway = tunnel
    stalled = []
    try:
        for i in range(20):
            s = stalled_socket(site)
            s.sendall(f'GET {site.path(f"download?size={DOWNLOAD}&seed={100 + i}")} HTTP/1.1\r\n'
                      f'Host: {site.name}\r\n\r\n'.encode())
            assert s.recv(4096).startswith(b'HTTP/1.1 200 '), 'a stalled device got no 200'
            stalled.append(s)
        # every stalled stream's window has crossed the tunnel: together more than the
        # tunnel's connection window, which used to stall every stream on it
        poll(lambda: service_ran_ahead(svc, 20 * STREAM_WINDOW), 10 * SLOW,
             "the stalled devices' downloads to fill their windows", interval=0.05, check=procs.check)
        filled = time.monotonic()

        latencies = other_devices_unaffected(site, 7)
        print(f'beside 20 stalled HTTP/1.1 devices: p99 {p99(latencies):.3f} s, '
              f'slowest {latencies[-1]:.3f} s over {len(latencies)} requests')
        assert p99(latencies) <= 1.0 * SLOW, f'p99 {p99(latencies):.2f} s beside the stalled devices'

        # the stalled ones are ended once send_timeout has passed without progress, each logged
        poll(lambda: len(send_timeouts(gateway)) >= 20, (SEND_TIMEOUT + 10) * SLOW,
             'all 20 stalled devices to be ended by send_timeout', interval=0.1, check=procs.check)
        ended = time.monotonic()
        lines = send_timeouts(gateway)
        assert len(lines) == 20, lines
        assert all('/download?size=' in path and int(sent) < DOWNLOAD for path, sent in lines), lines
        for s in stalled:
            got = drain_until_closed(s, time.monotonic() + 5 * SLOW)
            assert got is not None, 'a stalled device was still connected after its send timeout'
            assert got < DOWNLOAD
        print(f'all 20 ended {ended - filled:.1f} s after their windows filled')
    finally:
        for s in stalled:
            s.close()
    rss = gateway.peak_rss_kib()
    print(f'gateway peak RSS {rss / 1024:.1f} MiB')
    if not SANITIZED:
        assert rss < RSS_LIMIT_KIB, f'gateway peak RSS {rss / 1024:.1f} MiB'


# ---------------------------------------------------------------- an HTTP/2 device with no window

class ZeroWindowDevice:
    """An HTTP/2 device (Python's h2) that advertises SETTINGS_INITIAL_WINDOW_SIZE = 0 and opens
    GET streams for large downloads: the gateway may send their headers, never their bodies.
    A thread reads frames (and acknowledges SETTINGS and PINGs) and notes responses and resets."""

    def __init__(self, site, paths):
        self.sock = socket.create_connection((site.addr, site.port), timeout=10 * SLOW)
        self.sock = client_context(site, alpn=('h2',)).wrap_socket(self.sock, server_hostname=site.name)
        assert self.sock.selected_alpn_protocol() == 'h2'
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.streams = []
        for path in paths:
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, [(':method', 'GET'), (':scheme', 'https'),
                                       (':authority', site.name), (':path', path)], end_stream=True)
            self.streams.append(sid)
        self.sock.sendall(self.h2.data_to_send())
        self.status, self.reset, self.data = {}, {}, 0
        self.closed = False
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                data = b''
            if not data:
                self.closed = True
                return
            with self.lock:
                for ev in self.h2.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        self.status[ev.stream_id] = dict(ev.headers).get(b':status')
                    elif isinstance(ev, h2.events.StreamReset):
                        self.reset[ev.stream_id] = time.monotonic()
                    elif isinstance(ev, h2.events.DataReceived):
                        self.data += len(ev.data)
                out = self.h2.data_to_send()
            if out:
                self.sock.sendall(out)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


def test_http2_device_with_zero_window_on_17_streams_stalls_only_itself(procs, site, svc, tunnel):
    gateway = tunnel
    paths = [site.path(f'download?size={DOWNLOAD}&seed={200 + i}') for i in range(17)]
    dev = ZeroWindowDevice(site, paths)
    try:
        poll(lambda: len(dev.status) == 17, 10 * SLOW, 'the 17 responses to start', check=procs.check)
        assert set(dev.status.values()) == {b'200'}, dev.status
        poll(lambda: service_ran_ahead(svc, 17 * STREAM_WINDOW), 10 * SLOW,
             "the zero-window streams to fill their tunnel windows", interval=0.05, check=procs.check)
        filled = time.monotonic()

        latencies = other_devices_unaffected(site, 8)
        print(f'beside 17 zero-window HTTP/2 streams: p99 {p99(latencies):.3f} s, '
              f'slowest {latencies[-1]:.3f} s over {len(latencies)} requests')
        assert p99(latencies) <= 1.0 * SLOW, f'p99 {p99(latencies):.2f} s beside the zero-window streams'

        # each of its streams is reset after send_timeout; the device sent no byte of body
        poll(lambda: len(dev.reset) == 17, (SEND_TIMEOUT + 10) * SLOW,
             "the zero-window streams to be ended by send_timeout", interval=0.1, check=procs.check)
        assert sorted(dev.reset) == dev.streams
        assert dev.data == 0
        earliest = min(dev.reset.values()) - filled
        print(f'17 streams reset {earliest:.1f}..{max(dev.reset.values()) - filled:.1f} s after their '
              f'windows filled')
        lines = send_timeouts(gateway)
        assert sorted(path for path, _ in lines) == sorted(paths), lines
        assert all(sent == '0' for _, sent in lines), lines
    finally:
        dev.close()
    rss = gateway.peak_rss_kib()
    print(f'gateway peak RSS {rss / 1024:.1f} MiB')
    if not SANITIZED:
        assert rss < RSS_LIMIT_KIB, f'gateway peak RSS {rss / 1024:.1f} MiB'


# ---------------------------------------------------------------- a slow reader is not a stalled one

@pytest.mark.parametrize('http', ['1.1', '2'])
def test_slow_reader_completes_past_send_timeout(procs, site, tunnel, http):
    size = 16 * MiB
    dl = CurlProcess(site, site.path(f'download?size={size}&seed=9'), '--limit-rate', '3M', http=http,
                     timeout=60 * SLOW)
    try:
        t0 = time.monotonic()
        r = dl.wait(timeout=90 * SLOW)
        took = time.monotonic() - t0
    finally:
        dl.kill()
    print(f'HTTP/{http}: {size / MiB:.0f} MiB at 3 MB/s in {took:.1f} s (send_timeout {SEND_TIMEOUT} s)')
    assert (r.rc, r.status) == (0, 200), r
    assert (dl.received, dl.sha256) == (size, stream_sha256(size, 9)), 'the slow download was not intact'
    assert took > SEND_TIMEOUT, 'the download was not slow enough to outlast send_timeout'
    assert send_timeouts(tunnel) == []


# ---------------------------------------------------------------- the buffer budget

def test_spent_buffer_budget_pauses_the_tunnel_then_resumes(procs, site):
    """max_buffer_memory = 16 MiB and 16 devices that stop reading: together their stream
    windows (64 MiB) would take four budgets; the gateway stops opening windows once the budget
    is spent (a warning says so), so it holds the budget and at most a tunnel's connection
    window more (16 MiB) rather than every window (its RSS shows it: about 80 MiB without the
    budget). Once send_timeout has ended the stalled devices, the budget is free again."""
    ini_set(site.gateway_conf, 'gateway', 'send_timeout', str(SEND_TIMEOUT))
    ini_set(site.gateway_conf, 'gateway', 'max_buffer_memory', str(16 * MiB))
    (gateway,), _ = bring_up(procs, site)
    stalled = []
    try:
        for i in range(16):
            s = stalled_socket(site)
            s.sendall(f'GET {site.path(f"download?size={DOWNLOAD}&seed={300 + i}")} HTTP/1.1\r\n'
                      f'Host: {site.name}\r\n\r\n'.encode())
            stalled.append(s)
        poll(lambda: 'buffer budget spent' in gateway.log_text(), 10 * SLOW, 'the budget to be spent',
             check=procs.check)
        poll(lambda: len(send_timeouts(gateway)) == 16, (SEND_TIMEOUT + 10) * SLOW,
             'the stalled devices to be ended by send_timeout', interval=0.1, check=procs.check)
        poll(lambda: 'below the low mark again' in gateway.log_text(), 5 * SLOW,
             'the budget to be paid back', check=procs.check)
    finally:
        for s in stalled:
            s.close()
    size = 3 * STREAM_WINDOW
    dl = CurlProcess(site, site.path(f'download?size={size}&seed=10'), timeout=30 * SLOW)
    try:
        r = dl.wait(timeout=30 * SLOW)
    finally:
        dl.kill()
    assert (r.rc, r.status, dl.received, dl.sha256) == (0, 200, size, stream_sha256(size, 10)), r
    rss = gateway.peak_rss_kib()
    # the budget, a tunnel window past it, 16 connections' output and TLS, the process itself
    limit_kib = (16 + 16 + 16 // 2 + 24) * 1024
    print(f'gateway peak RSS {rss / 1024:.1f} MiB (limit {limit_kib / 1024:.0f} MiB)')
    if not SANITIZED:
        assert rss < limit_kib, f'gateway peak RSS {rss / 1024:.1f} MiB'


@pytest.mark.parametrize('key,value', [('send_timeout', '0'), ('send_timeout', 'soon'),
                                       ('max_buffer_memory', '1048576'), ('max_buffer_memory', '1G')])
def test_buffer_settings_out_of_range_are_refused_by_name(site, key, value):
    ini_set(site.gateway_conf, 'gateway', key, value)
    r = run_cmg('gateway', '-c', site.gateway_conf, timeout=20)
    assert r.returncode != 0
    assert f'{key}: \'{value}\' is not a number' in r.stderr, r.stderr


# ---------------------------------------------------------------- device window credit

def test_abandoned_uploads_give_back_their_connection_window(procs, site, svc):
    """HTTP/2 uploads cancelled by the device while the gateway still holds some of their
    body (here: the connector is frozen, so the tunnel takes nothing more) must give that
    share of the device's connection window back: four of them would otherwise strand the
    whole 1 MiB window, and every later upload on the connection would wait forever."""
    _, connector = bring_up(procs, site)
    sock = socket.create_connection((site.addr, site.port), timeout=10 * SLOW)
    sock = client_context(site, alpn=('h2',)).wrap_socket(sock, server_hostname=site.name)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding='utf-8'))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    chunk = b'\0' * 16384

    def headers(sid):
        conn.send_headers(sid, [(':method', 'POST'), (':scheme', 'https'), (':authority', site.name),
                                (':path', site.path('upload'))])

    def pump(until, within):
        """Reads (acknowledging nothing but settings) until until() or within seconds."""
        sock.settimeout(0.2)
        end = time.monotonic() + within
        while not until() and time.monotonic() < end:
            try:
                data = sock.recv(65536)
            except (socket.timeout, ssl.SSLWantReadError):
                continue
            assert data, 'the gateway closed the connection'
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.StreamEnded):
                    done.add(ev.stream_id)
                elif isinstance(ev, h2.events.DataReceived):
                    body.extend(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            sock.sendall(conn.data_to_send())
    done, body = set(), bytearray()
    os.kill(connector.pid, signal.SIGSTOP)
    try:
        for sid in (1, 3, 5, 7):
            headers(sid)
            # Send until the gateway stops giving credit: its buffers hold what it took.
            while True:
                window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if window > 0:
                    conn.send_data(sid, chunk[:window])
                    sock.sendall(conn.data_to_send())
                    continue
                before = conn.local_flow_control_window(sid)
                pump(lambda: conn.local_flow_control_window(sid) > before, 0.5)
                if conn.local_flow_control_window(sid) <= before:
                    break
            conn.reset_stream(sid)
            sock.sendall(conn.data_to_send())
        pump(lambda: False, 0.5)   # the gateway's WINDOW_UPDATEs for what it held
    finally:
        os.kill(connector.pid, signal.SIGCONT)
    payload = bytes(range(256)) * 8192   # 2 MiB
    headers(9)
    sent = 0
    deadline = time.monotonic() + 20 * SLOW
    while 9 not in done:
        assert time.monotonic() < deadline, f'the upload on the same connection stalled at {sent} bytes'
        while sent < len(payload) and min(conn.local_flow_control_window(9), conn.max_outbound_frame_size) > 0:
            n = min(len(payload) - sent, conn.local_flow_control_window(9), conn.max_outbound_frame_size)
            conn.send_data(9, payload[sent:sent + n], end_stream=sent + n == len(payload))
            sent += n
        sock.sendall(conn.data_to_send())
        pump(lambda: 9 in done or (sent < len(payload) and conn.local_flow_control_window(9) > 0), 1)
    sock.close()
    assert hashlib.sha256(payload).hexdigest() in body.decode()
