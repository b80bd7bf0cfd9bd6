"""`cmg client listen` against a small Server-Sent Events server over mutual TLS (a Python
stand-in for the gateway's GET /CCM_Notify): events printed as JSON lines, the retry:
hint honoured, reconnection with Last-Event-ID, the last id kept in the state directory
across restarts, --exec and its environment, garbage and an endless line survived with
bounded memory, SIGTERM ends it with status 0."""
import json
import os
import queue
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmgtest import CMG, SLOW, free_port, make_cert, poll

EPOCH = '3f9a1c0e5b7d2a64'


def chunk(data):
    if isinstance(data, str):
        data = data.encode()
    return b'%x\r\n%s\r\n' % (len(data), data)


class SSEServer:
    """Serves GET /CCM_Notify: each connection takes the next script from `scripts` (a
    function of (tls socket, request headers)); without one it holds the channel with
    heartbeats. Records every request's headers and when it came."""

    def __init__(self, tmp):
        tmp = Path(tmp)
        self.ca, self.ca_key, (self.ca_crt, _) = make_cert(tmp / 'ca', 'test ca', ca=True)
        _, _, (crt, key) = make_cert(tmp / 'server', 'gateway', self.ca, self.ca_key,
                                     eku=(ExtendedKeyUsageOID.SERVER_AUTH,), san=('127.0.0.1',))
        _, _, self.device = make_cert(tmp / 'device', 'device-1', valid_days=3650)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(crt, key)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(self.device[0])
        self.port = free_port()
        self.sock = socket.create_server(('127.0.0.1', self.port))
        self.scripts = queue.Queue()
        self.requests = []
        self.closed = threading.Event()
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def trust(self, crt):
        self.ctx.load_verify_locations(crt)

    def _accept(self):
        while not self.closed.is_set():
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, raw):
        try:
            s = self.ctx.wrap_socket(raw, server_side=True)
            self.conns.append(s)
            head = b''
            while b'\r\n\r\n' not in head:
                data = s.recv(4096)
                if not data:
                    return
                head += data
            lines = head.split(b'\r\n\r\n')[0].decode().split('\r\n')
            headers = {k.strip().lower(): v.strip() for k, v in
                       (line.split(':', 1) for line in lines[1:])}
            headers[':request'] = lines[0]
            headers[':time'] = time.monotonic()
            self.requests.append(headers)
            try:
                script = self.scripts.get_nowait()
            except queue.Empty:
                script = hold
            script(s, headers)
        except (OSError, ssl.SSLError):
            pass
        finally:
            raw.close()

    def close(self):
        self.closed.set()
        self.sock.close()
        for s in self.conns:
            try:
                s.close()
            except OSError:
                pass


def start_stream(s, first=''):
    s.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n'
              b'Transfer-Encoding: chunked\r\n\r\n' + (chunk(first) if first else b''))


def end_stream(s):
    s.sendall(b'0\r\n\r\n')
    s.close()


def hold(s, headers):
    start_stream(s, 'retry: 100\n\n')
    while True:
        time.sleep(0.2)
        s.sendall(chunk(': hb\n\n'))


def events(*evs, retry=100, end=True, then=None):
    """A script: retry:, the events (id seq, type, data), then the end of the stream."""
    def script(s, headers):
        start_stream(s, f'retry: {retry}\n\n')
        for seq, typ, data in evs:
            s.sendall(chunk(f'id: {EPOCH}-{seq}\nevent: {typ}\ndata: {data}\n\n'))
        if then:
            then(s, headers)
        if end:
            end_stream(s)
        else:
            hold(s, headers)
    return script


@pytest.fixture
def server(tmp_path):
    srv = SSEServer(tmp_path)
    yield srv
    srv.close()


def listen_argv(server, *args):
    return [CMG, 'client', 'listen', '--gateway', f'127.0.0.1:{server.port}',
            '--cert', str(server.device[0]), '--key', str(server.device[1]),
            '--ca', str(server.ca_crt), *args]


def run_listen(argv, timeout=20, env=None):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout * SLOW, env=env)


def lines(out):
    return [json.loads(line) for line in out.splitlines()]


def make_state(server, tmp, token='dev-token.abc'):
    """A registered device's state directory, written as `cmg client register` leaves it."""
    state = Path(tmp) / 'state'
    state.mkdir()
    _, _, (crt, key) = make_cert(state / 'device', 'device-2', valid_days=3650)
    server.trust(crt)
    (state / 'ca.crt').write_bytes(server.ca_crt.read_bytes())
    far = int(time.time()) + 86400
    (state / 'device.json').write_text(json.dumps({
        'gateway': f'127.0.0.1:{server.port}', 'server_name': '127.0.0.1',
        'prefix': '/CCM_Proxy_ServerAuth/SITE_x', 'device_id': 'dev-2', 'token': token,
        'expires': far, 'renew_after': far}))
    (state / 'device.json').chmod(0o600)
    return state


def test_help_tells_the_truth():
    r = subprocess.run([CMG, 'client', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and 'listen' in r.stdout
    r = subprocess.run([CMG, 'client', 'listen', '--help'], capture_output=True, text=True)
    assert r.returncode == 0
    for word in ('/CCM_Notify', 'Last-Event-ID', 'notify.last-id', '--exec', 'CMG_EVENT_ID',
                 'CMG_EVENT_TYPE', 'CMG_EVENT_DATA', '--once', '--max-events', 'SIGTERM'):
        assert word in r.stdout, word
    r = subprocess.run([CMG, 'client', 'listen', '--max-events', '0'], capture_output=True,
                       text=True)
    assert r.returncode == 2 and '--max-events' in r.stderr


def test_unusable_state_or_token_exits_at_once(tmp_path, server):
    r = run_listen([CMG, 'client', 'listen', '--state', str(tmp_path / 'nothing')], timeout=10)
    assert r.returncode == 1 and 'not registered' in r.stderr, r.stderr
    bad = tmp_path / 'bad.token'
    bad.write_text('not a token\n')
    r = run_listen(listen_argv(server, '--token', str(bad)), timeout=10)
    assert r.returncode == 1 and 'not a token' in r.stderr, r.stderr
    assert not server.requests


def test_events_printed_as_json_lines(server):
    """Each event one JSON line, whatever the line ends; comments and unknown fields
    ignored; data that is not JSON printed as a string; a bare named event too."""
    def script(s, headers):
        start_stream(s, 'retry: 100\n\n: hb\n\n')
        s.sendall(chunk(f'id: {EPOCH}-1\nevent: policy\ndata: {{"fetch":true}}\n\n'))
        s.sendall(chunk(f'id: {EPOCH}-2\r\nevent: script\r\nfoo: bar\r\ndata: [1,\r\ndata: 2]\r\n\r\n'))
        s.sendall(chunk(f'id: {EPOCH}-3\revent: compliance\rdata: not json\r\r'))
        s.sendall(chunk(f'id: {EPOCH}-3\nevent: reset\n\n'))
        s.sendall(chunk(f'id: {EPOCH}-4\nevent: x'.encode() + b'\xffy\ndata: {"a":"\xc3"}\n\n'))
        end_stream(s)
    server.scripts.put(script)
    r = run_listen(listen_argv(server, '--max-events', '5'))
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [
        {'id': f'{EPOCH}-1', 'event': 'policy', 'data': {'fetch': True}},
        {'id': f'{EPOCH}-2', 'event': 'script', 'data': [1, 2]},
        {'id': f'{EPOCH}-3', 'event': 'compliance', 'data': 'not json'},
        {'id': f'{EPOCH}-3', 'event': 'reset', 'data': None},
        {'id': f'{EPOCH}-4', 'event': 'x\ufffdy', 'data': {'a': '\ufffd'}},   # valid UTF-8 out
    ]
    req = server.requests[0]
    assert req[':request'] == 'GET /CCM_Notify HTTP/1.1'
    assert req['accept'] == 'text/event-stream'
    assert 'last-event-id' not in req
    assert 'channel open' in r.stderr


def test_reconnect_honours_retry_and_sends_last_event_id(server):
    """The stream ends: the next connection comes after the retry: hint (1 s, jittered
    +-50 %), with Last-Event-ID of the last event."""
    ended = {}

    def mark_end(s, headers):
        ended['at'] = time.monotonic()
    server.scripts.put(events((1, 'policy', '{}'), (2, 'policy', '{}'), retry=1000, then=mark_end))
    server.scripts.put(events((3, 'script', '{"n":3}')))
    r = run_listen(listen_argv(server, '--max-events', '3'))
    assert r.returncode == 0, r.stderr
    assert [e['id'] for e in lines(r.stdout)] == [f'{EPOCH}-{i}' for i in (1, 2, 3)]
    assert len(server.requests) == 2
    assert server.requests[1]['last-event-id'] == f'{EPOCH}-2'
    gap = server.requests[1][':time'] - ended['at']
    assert gap >= 0.45, gap   # 1 s less half of it, less scheduling slack
    assert 'reconnecting in' in r.stderr


def test_refused_is_retried_then_once_exits_1(server):
    def refuse(s, headers):
        body = b'CMGService_Unauthorized\r\n'
        s.sendall(b'HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n'
                  b'\r\n%s' % (len(body), body))
        s.close()
    server.scripts.put(refuse)
    server.scripts.put(events((7, 'policy', '1')))
    r = run_listen(listen_argv(server, '--max-events', '1'))
    assert r.returncode == 0, r.stderr
    assert 'refused: 401' in r.stderr and lines(r.stdout)[0]['data'] == 1
    server.scripts.put(refuse)
    r = run_listen(listen_argv(server, '--once'))
    assert r.returncode == 1, r.stderr
    assert 'CMGService_Unauthorized' in r.stderr


def test_state_dir_token_and_last_id_across_restarts(server, tmp_path):
    state = make_state(server, tmp_path)
    server.scripts.put(events((1, 'policy', '{}'), (2, 'script', '{"s":1}')))
    r = run_listen([CMG, 'client', 'listen', '--state', str(state), '--max-events', '2'])
    assert r.returncode == 0, r.stderr
    assert server.requests[0]['authorization'] == 'Bearer dev-token.abc'
    assert (state / 'notify.last-id').read_text().strip() == f'{EPOCH}-2'
    assert oct((state / 'notify.last-id').stat().st_mode & 0o777) == '0o600'
    assert not [p for p in state.iterdir() if p.name.startswith('notify.last-id.')]
    server.scripts.put(events((3, 'policy', '{}')))
    r = run_listen([CMG, 'client', 'listen', '--state', str(state), '--max-events', '1'])
    assert r.returncode == 0, r.stderr
    assert server.requests[1]['last-event-id'] == f'{EPOCH}-2'
    assert (state / 'notify.last-id').read_text().strip() == f'{EPOCH}-3'
    # --token FILE replaces the state's token
    tok = tmp_path / 'oidc.token'
    tok.write_text('eyJh.eyJi.c2ln\n')
    server.scripts.put(events((4, 'policy', '{}')))
    r = run_listen([CMG, 'client', 'listen', '--state', str(state), '--token', str(tok),
                    '--max-events', '1'])
    assert r.returncode == 0, r.stderr
    assert server.requests[2]['authorization'] == 'Bearer eyJh.eyJi.c2ln'
    assert server.requests[2]['last-event-id'] == f'{EPOCH}-3'


def test_exec_gets_the_environment_one_at_a_time(server, tmp_path):
    out = tmp_path / 'exec.log'
    cmd = (f'echo "start $CMG_EVENT_ID" >> {out}; sleep 0.1; '
           f'printf "%s|%s|%s\\n" "$CMG_EVENT_ID" "$CMG_EVENT_TYPE" "$CMG_EVENT_DATA" >> {out}; '
           'echo to-stdout')
    server.scripts.put(events((1, 'policy', '{"a": "b c"}'), (2, 'script', '"x"')))
    r = run_listen(listen_argv(server, '--exec', cmd, '--max-events', '2'))
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines() == [
        f'start {EPOCH}-1', f'{EPOCH}-1|policy|{{"a": "b c"}}',
        f'start {EPOCH}-2', f'{EPOCH}-2|script|"x"']
    assert 'to-stdout' in r.stderr and 'to-stdout' not in r.stdout
    assert len(lines(r.stdout)) == 2


def test_garbage_and_an_endless_line_are_survived(server):
    """Binary garbage, then a line that never ends: the client gives up on that
    connection at its line limit (it does not buffer the line) and reconnects; its
    memory stays small."""
    sent = {}

    def endless(s, headers):
        start_stream(s, 'retry: 100\n\n')
        s.sendall(chunk(bytes(range(256)) * 4 + b'\n\n'))
        block = chunk(b'a' * 65536)
        sent['bytes'] = 0
        try:
            while sent['bytes'] < 64 * 1024 * 1024:
                s.sendall(block)
                sent['bytes'] += len(block)
        except OSError:
            sent['cut'] = True
    def peak_rss_kib():
        p = subprocess.Popen(listen_argv(server, '--max-events', '1'), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out, err = p.communicate()
        assert p.returncode == 0, err
        return out, err, usage.ru_maxrss

    server.scripts.put(events((4, 'policy', '{}')))
    _, _, baseline = peak_rss_kib()          # one plain event: the same process otherwise
    server.scripts.put(endless)
    server.scripts.put(events((5, 'policy', '{}')))
    out, err, rss = peak_rss_kib()
    assert sent.get('cut'), sent          # the client hung up, the server did not finish
    assert sent['bytes'] < 16 * 1024 * 1024, sent
    assert 'a line over 65536 bytes' in err
    assert lines(out) == [{'id': f'{EPOCH}-5', 'event': 'policy', 'data': {}}]
    assert rss < baseline + 4 * 1024, (rss, baseline)   # KiB: no line buffered
    print(f'peak RSS: {rss} KiB with the endless line, {baseline} KiB without; '
          f'{sent["bytes"]} bytes sent before the client hung up')


def test_sigterm_exits_0(server):
    p = subprocess.Popen(listen_argv(server), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        poll(lambda: server.requests, 10 * SLOW, 'the channel to open')
        time.sleep(0.3)   # a few heartbeats
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=5 * SLOW) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
