"""cmg-load, the benchmarks' load tool, against a real gateway: it presents a client
certificate over HTTP/1.1 and HTTP/2 and counts exactly what came back; it sends a bearer
token and extra headers as given; it exits non-zero when nothing got through, saying why;
it holds idle connections from several source addresses in 127.0.0.0/8."""
import hashlib
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cmgtest import SLOW, make_cert, poll
from internal_service import POLICY

LOAD = os.path.abspath(os.environ.get('CMG_LOAD') or Path(__file__).parent / '../../build/bench/cmg-load')


def cert_args(site):
    return ['--connect', f'127.0.0.1:{site.port}', '--cacert', site.ca,
            '--cert', site.device_cert, '--key', site.device_key]


def run_load(*args, timeout=120):
    r = subprocess.run([LOAD, '-q', *[str(a) for a in args]], capture_output=True, text=True,
                       timeout=timeout * SLOW)
    lines = r.stdout.strip().splitlines()
    return r.returncode, (json.loads(lines[-1]) if lines else None), r.stderr


def test_client_certificate_over_h1_and_h2(site, connector, svc):
    url = f'https://{site.name}:{site.port}{site.path("policy.xml")}'
    for proto in ([], ['--h2', '-m', '4']):
        before = svc.count
        rc, res, err = run_load(*cert_args(site), '-c', 4, '-n', 300, *proto, url)
        assert rc == 0, err
        assert (res['requests'], res['status_2xx'], res['errors']) == (300, 300, 0), res
        assert res['bytes_in'] == 300 * len(POLICY)
        assert res['proto'] == ('h2' if proto else 'h1')
        lat = res['lat_us']
        assert 0 < lat['min'] <= lat['p50'] <= lat['p99'] <= lat['p999'] <= lat['max']
        assert res['latency_samples'] == 300
        assert svc.count - before == 300


def test_without_certificate_every_answer_is_refused(site, connector, svc):
    url = f'https://{site.name}:{site.port}{site.path("policy.xml")}'
    before = svc.count
    rc, res, err = run_load('--connect', f'127.0.0.1:{site.port}', '--cacert', site.ca,
                            '-c', 2, '-n', 20, url)
    assert rc == 0, err                     # answers got through, refusals though they are
    assert res['status_2xx'] == 0 and res['status_4xx'] == 20, res
    assert svc.count == before


class OneShotServer:
    """Plain HTTP on loopback: answers each request with 200 "ok" and keeps the heads."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.heads = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        conn, _ = self.sock.accept()
        with conn:
            data = b''
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
                while b'\r\n\r\n' in data:
                    head, data = data.split(b'\r\n\r\n', 1)
                    self.heads.append(head.decode())
                    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok')


def test_bearer_token_and_headers_are_sent():
    srv = OneShotServer()
    with srv.sock:
        rc, res, err = run_load('--bearer', 'tok.en.sig', '-H', 'X-Probe: 42', '-c', 1, '-n', 3,
                                f'http://127.0.0.1:{srv.port}/x?y=1')
    assert rc == 0, err
    assert res['status_2xx'] == 3 and res['bytes_in'] == 6
    assert len(srv.heads) == 3
    lines = srv.heads[0].split('\r\n')
    assert lines[0] == 'GET /x?y=1 HTTP/1.1'
    assert 'Authorization: Bearer tok.en.sig' in lines
    assert 'X-Probe: 42' in lines


def test_nothing_got_through_exits_1_with_the_reason():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))            # bound, not listening: refused
        rc, res, err = run_load('-c', 2, '-d', 1, '-w', 0, f'http://127.0.0.1:{s.getsockname()[1]}/')
    assert rc == 1
    assert res['requests'] == 0 and res['errors'] > 0
    assert 'Connection refused' in res['first_error']


def test_usage_errors_exit_2():
    for args in (['ftp://x/'], ['-c', '0', 'http://127.0.0.1:1/'], []):
        r = subprocess.run([LOAD, *args], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, args
        assert r.stderr.strip()


def established_by_source(port):
    out = subprocess.run(['ss', '-Htn', 'state', 'established', f'dport = :{port}'],
                         capture_output=True, text=True, check=True).stdout
    counts = {}
    for line in out.splitlines():
        src = line.split()[-2].rsplit(':', 1)[0]
        counts[src] = counts.get(src, 0) + 1
    return counts


def test_idle_connections_from_several_source_addresses(site, connector):
    url = f'https://{site.name}:{site.port}{site.path("policy.xml")}'
    p = subprocess.Popen([LOAD, '-q', *[str(a) for a in cert_args(site)], '--idle', '-c', '40', '-p', '2',
                          '--src', '127.0.0.2-127.0.0.5', '--hold', str(3 * SLOW), url],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holding = json.loads(p.stdout.readline())
        assert holding['event'] == 'holding' and holding['established'] == 40, holding
        counts = poll(lambda: established_by_source(site.port) or None, 5, 'connections in ss')
        assert counts == {f'127.0.0.{i}': 10 for i in range(2, 6)}, counts
        final = json.loads(p.stdout.readline())
        assert p.wait(60 * SLOW) == 0, p.stderr.read()
        assert final['established'] == 40 and final['errors'] == 0, final
    finally:
        p.kill()
        p.wait()


class SseServer:
    """Server-Sent Events over TLS on loopback, mutual TLS with the site's CA: keeps each
    channel (the device's CN, its source address, its request head) and sends events to
    the channels the test names."""

    def __init__(self, site):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(site.dir / 'gateway.crt', site.dir / 'gateway.key')
        self.ctx.load_verify_locations(site.ca)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.channels = []          # (cn, source address, head, tls socket, DER certificate)
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                raw, addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.channel, args=(raw, addr), daemon=True).start()

    def channel(self, raw, addr):
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
            head = b''
            while b'\r\n\r\n' not in head:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                head += chunk
            der = tls.getpeercert(binary_form=True)
            cn = dict(x[0] for x in tls.getpeercert()['subject'])['commonName']
            tls.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n'
                        b'Transfer-Encoding: chunked\r\n\r\n')
            self.chunk(tls, b'retry: 3000\n\n')
            with self.lock:
                self.channels.append((cn, addr[0], head.decode(), tls, der))
        except (OSError, ssl.SSLError):
            raw.close()

    @staticmethod
    def chunk(tls, data):
        tls.sendall(b'%x\r\n%s\r\n' % (len(data), data))

    def send(self, channels, event_id, data='{}'):
        with self.lock:
            for c in channels:
                # a heartbeat first, and the event split over two chunks: neither counts twice
                ev = f': hb\n\nid: {event_id}\nevent: policy\ndata: {data}\n\n'.encode()
                self.chunk(c[3], ev[:9])
                self.chunk(c[3], ev[9:])


def notify_load(site, srv, *args):
    argv = [LOAD, '--notify', '--connect', f'127.0.0.1:{srv.port}', '--cacert', site.ca, '--mint-ca',
            site.ca, '--mint-ca-key', site.dir / 'ca.key', *args, f'https://{site.name}:{srv.port}/CCM_Notify']
    return subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)


def ask(p, command):
    p.stdin.write(command + '\n')
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def test_notify_channels_each_with_its_certificate_stamped_events_and_replay(site, tmp_path):
    srv = SseServer(site)
    p = notify_load(site, srv, '-c', 6, '--device-offset', 10, '--bind', '127.0.0.2,127.0.0.3',
                    '--connect-rate', 1000, '--ids-out', tmp_path / 'ids')
    try:
        up = json.loads(p.stdout.readline())
        assert (up['event'], up['up'], up['failed']) == ('up', 6, 0), up
        poll(lambda: len(srv.channels) == 6, 5 * SLOW, 'six channels at the server')
        chans = sorted(srv.channels, key=lambda c: int(c[0].rsplit('-', 1)[1]))
        # one certificate per channel, CN bench-device-<offset + i>, and its thumbprint listed
        assert [c[0] for c in chans] == [f'bench-device-{i}' for i in range(10, 16)]
        ids = (tmp_path / 'ids').read_text().split()
        assert sorted(ids) == sorted(f'cert:{hashlib.sha256(c[4]).hexdigest()}' for c in chans)
        assert sorted(c[1] for c in chans) == ['127.0.0.2'] * 3 + ['127.0.0.3'] * 3
        head = chans[0][2].split('\r\n')
        assert head[0] == 'GET /CCM_Notify HTTP/1.1' and 'Accept: text/event-stream' in head
        assert not any(h.lower().startswith('last-event-id') for h in head)

        t0 = time.time_ns()
        srv.send(chans, 'e-1')
        srv.send(chans[:2], 'e-2')     # devices 10 and 11, the first two channels of cmg-load
        poll(lambda: ask(p, 'stats')['events'] == 8, 5 * SLOW, 'eight events at cmg-load')
        t1 = time.time_ns()
        assert ask(p, f'dump {tmp_path / "d1"}')['keys'] == 2
        rows = {f[0]: [int(x) for x in f[1:]] for f in
                (line.split() for line in (tmp_path / 'd1').read_text().splitlines())}
        assert sorted(rows) == ['e-1', 'e-2']
        for key, n in (('e-1', 6), ('e-2', 2)):
            count, first, last, *times = rows[key]
            assert count == n and len(times) == n
            assert t0 <= first == min(times) <= last == max(times) <= t1   # one clock: CLOCK_REALTIME
        assert ask(p, 'stats')['events'] == 0                              # a dump starts afresh

        # mark, miss one, come back with Last-Event-ID: the channel's own last id
        assert ask(p, 'mark')['channels'] == 6
        assert ask(p, 'replay 2')['channels'] == 2
        poll(lambda: len(srv.channels) == 8, 5 * SLOW, 'two channels back at the server')
        back = srv.channels[6:]
        assert sorted(c[0] for c in back) == ['bench-device-10', 'bench-device-11']
        assert all('Last-Event-ID: e-2' in c[2].split('\r\n') for c in back)
        srv.send(back, 'e-3')
        poll(lambda: ask(p, 'replay-stats')['events'] == 2, 5 * SLOW, 'the replayed events')
        assert ask(p, 'replay-stats') == {'event': 'replay', 'channels': 2, 'up': 2, 'events': 2,
                                          'min': 1, 'max': 1}

        # a channel the server ends is lost, and not dialled again
        SseServer.chunk(chans[5][3], b'')
        poll(lambda: ask(p, 'stats')['lost'] == 1, 5 * SLOW, 'the ended channel counted as lost')
        time.sleep(0.2)
        assert len(srv.channels) == 8
        p.stdin.close()
        final = json.loads(p.stdout.readline())
        assert p.wait(10 * SLOW) == 0
        assert (final['event'], final['up'], final['lost'], final['events_total']) == ('final', 5, 1, 10)
    finally:
        p.kill()
        p.wait()
        srv.sock.close()


def test_notify_refused_channels_are_failed_with_the_reason(site):
    srv = SseServer(site)
    other = tempfile.mkdtemp()   # a CA the server does not trust
    make_cert(Path(other) / 'ca', 'another CA', ca=True)
    p = subprocess.Popen([str(a) for a in (
        LOAD, '--notify', '-c', 3, '--connect', f'127.0.0.1:{srv.port}', '--cacert', site.ca,
        '--mint-ca', Path(other) / 'ca.crt', '--mint-ca-key', Path(other) / 'ca.key',
        f'https://{site.name}:{srv.port}/CCM_Notify')],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        up = json.loads(p.stdout.readline())
        assert (up['up'], up['failed']) == (0, 3), up
        assert 'TLS' in up['first_error'] or 'closed' in up['first_error'], up
        p.stdin.close()
        assert p.wait(10 * SLOW) == 1          # nothing held: a benchmark of errors is no figure
    finally:
        p.kill()
        p.wait()
        srv.sock.close()
