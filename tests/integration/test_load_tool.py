"""cmg-load, the benchmarks' load tool, against a real gateway: it presents a client
certificate over HTTP/1.1 and HTTP/2 and counts exactly what came back; it sends a bearer
token and extra headers as given; it exits non-zero when nothing got through, saying why;
it holds idle connections from several source addresses in 127.0.0.0/8."""
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

from cmgtest import SLOW, poll
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
