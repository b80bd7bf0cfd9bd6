"""Helpers for the notification tests (issue 14): a 2 × 2 deployment (test_reports.two_by_two)
whose gateway instances each also listen on a device port of their own, so that a test knows
which instance holds a channel; devices of the three methods (a certificate of the site, a
registered device with its site device token, an OIDC token of the test's IdP); and a device's
channel, `GET /CCM_Notify` over HTTP/1.1 or as one HTTP/2 stream, read in a thread and parsed
as Server-Sent Events."""
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from collections import namedtuple

import h2.config
import h2.connection
import h2.events
import pytest

from cmgtest import (SLOW, DeviceConnection, client_context, curl_argv, free_port, ini_set, poll,
                     start_gateway)
from sitetest import Device, IdP
from test_reports import INTERVAL, two_by_two

NOTIFY_ID = re.compile(r'^([0-9a-f]{16})-([1-9][0-9]*)$')
ANY_ID = re.compile(r'\b[0-9a-f]{16}-[1-9][0-9]*\b')
WINDOW = 16                 # notify_window of the test deployment
BUFFER = 16384              # notify_buffer
HEARTBEAT = 2               # notify_heartbeat (s)
RETRY_MS = 1000             # notify_retry: the retry hint is within ±50 % of it
DELIVER = 5 * SLOW          # a notification reaches an online device within this (s)

Event = namedtuple('Event', 'id type data at')


def seq_of(notify_id):
    return int(NOTIFY_ID.match(notify_id).group(2))


# ---------------------------------------------------------------- devices

class NDevice:
    """A device: its id (as the gateway names it), and what it shows: a client certificate
    (crt, key) and/or a bearer token. One TLS context per protocol, kept, so that a session
    of one connection can resume on the next."""

    def __init__(self, name, kind, device_id, cert=None, token=None):
        self.name, self.kind, self.id = name, kind, device_id
        self.cert, self.token = cert, token
        self._ctx = {}

    def context(self, site, proto):
        if proto not in self._ctx:
            alpn = ('h2',) if proto == 'h2' else ('http/1.1',)
            if self.cert:
                ctx = client_context(site, cert=self.cert[0], key=self.cert[1], alpn=alpn)
            else:
                ctx = client_context(site, cert=False, alpn=alpn)
            self._ctx[proto] = ctx
        return self._ctx[proto]

    def headers(self):
        return [('authorization', f'Bearer {self.token}')] if self.token else []

    def __repr__(self):
        return f'<{self.kind} device {self.name} {self.id[:24]}>'


def thumbprint_id(crt):
    der = ssl.PEM_cert_to_DER_cert(open(crt).read())
    return 'cert:' + hashlib.sha256(der).hexdigest()


# ---------------------------------------------------------------- the channel

class _Eof(Exception):
    pass


class Channel:
    """A device's channel: GET /CCM_Notify on a TLS connection of its own to `port`, over
    HTTP/1.1 ('h1') or as one HTTP/2 stream ('h2'), read in a thread.

    status, headers   the answer's (None until it came)
    body              the body of an answer other than 200
    retry             the `retry:` hint (ms)
    events            Event(id, type, data (JSON-decoded), arrival time), in arrival order
    comments          comment lines seen (heartbeats)
    end               how it ended: 'last-chunk' (HTTP/1.1 chunked end), 'end-stream'
                      (HTTP/2), 'eof', 'reset' (RST_STREAM), 'answered' (not 200),
                      'error: ...'; None while open
    goaway            an HTTP/2 GOAWAY came
    session_reused    whether the TLS handshake resumed a session; session: the newest one

    hold=True: the thread reads the answer's head and then nothing until resume().
    rcvbuf: SO_RCVBUF of the device's socket (a small one fills quickly)."""

    def __init__(self, site, port, device, proto='h1', last_id=None, hold=False, rcvbuf=None,
                 accept='text/event-stream', session=None, name=None):
        self.site, self.port, self.device, self.proto = site, port, device, proto
        self.last_id, self.accept, self.rcvbuf = last_id, accept, rcvbuf
        self.name = name or f'{device.name}/{proto}/:{port}'
        self.status = self.headers = self.retry = self.end = None
        self.body = b''
        self.events, self.comments, self.received = [], 0, 0
        self.session, self.session_reused = session, None
        self.goaway = False
        self._pending, self._text = {}, b''
        self._cond = threading.Condition()
        self._resume = threading.Event()
        if not hold:
            self._resume.set()
        self._raw = self._tls = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=self.name)
        self._thread.start()

    # ---- what a test asks

    def ids(self, with_resets=False):
        with self._cond:
            return [e.id for e in self.events if with_resets or e.type != 'reset']

    def event(self, notify_id):
        with self._cond:
            return [e for e in self.events if e.id == notify_id and e.type != 'reset']

    def wait(self, pred, timeout, what):
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self), timeout):
                raise AssertionError(f'{self.name}: timed out after {timeout} s waiting for '
                                     f'{what}; status {self.status}, end {self.end}, events '
                                     f'{[(e.id, e.type) for e in self.events]}')

    def wait_open(self, timeout=DELIVER):
        """The answer's status (200 for an open channel)."""
        self.wait(lambda c: c.status is not None or c.end is not None, timeout, 'the answer')
        return self.status

    def wait_ids(self, ids, timeout=DELIVER):
        """Until every id in ids arrived (as a non-reset event)."""
        want = set(ids)
        self.wait(lambda c: want <= set(c.ids()), timeout, f'events {sorted(want)}')

    def wait_end(self, timeout):
        self.wait(lambda c: c.end is not None, timeout, 'the channel to end')
        return self.end

    def resume(self):
        self._resume.set()

    def close(self):
        """The device goes away (closes its connection)."""
        self._closing = True
        self._resume.set()
        sock = self._tls if self._tls is not None else self._raw
        if sock is not None:
            try:   # the socket's own shutdown: wakes the reader's recv (the TLS state untouched)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(10)
        assert not self._thread.is_alive(), f'{self.name}: the reader did not stop'

    # ---- the reader thread

    def _run(self):
        try:
            self._connect()
            if self.proto == 'h2':
                self._h2()
            else:
                self._h1()
        except _Eof:
            self._finish('eof')
        except Exception as e:  # noqa: BLE001 (every way a channel can end is a result)
            self._finish('eof' if self._closing else f'error: {e!r}')
        finally:
            if self._tls is not None:
                self._tls.close()

    def _connect(self):
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.rcvbuf:
            # a small receive buffer, and the segment size of a real network rather than
            # loopback's 64 KiB, which would let the gateway's kernel hold megabytes for it
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1400)
        raw.settimeout(10 * SLOW)
        raw.connect((self.site.addr, self.port))
        self._raw = raw
        ctx = self.device.context(self.site, self.proto)
        self._tls = ctx.wrap_socket(raw, server_hostname=self.site.name, session=self.session)
        self._tls.settimeout(None)
        self.session_reused = self._tls.session_reused

    def _recv(self):
        self._resume.wait()
        data = self._tls.recv(65536)
        if not data:
            raise _Eof()
        self.received += len(data)
        if self._tls.session is not None:
            self.session = self._tls.session
        return data

    def _finish(self, how):
        with self._cond:
            if self.end is None:
                self.end = how
            self._cond.notify_all()

    def _answer(self, status, headers):
        with self._cond:
            self.status, self.headers = status, headers
            self._cond.notify_all()

    def _request_headers(self):
        h = [('accept', self.accept)] + self.device.headers()
        if self.last_id:
            h.append(('last-event-id', self.last_id))
        return h

    # HTTP/1.1: the head, then the chunked body
    def _h1(self):
        lines = ['GET /CCM_Notify HTTP/1.1', f'Host: {self.site.name}']
        lines += [f'{k}: {v}' for k, v in self._request_headers()]
        self._tls.sendall(('\r\n'.join(lines) + '\r\n\r\n').encode())
        buf = b''
        while b'\r\n\r\n' not in buf:
            buf += self._recv_head()
        head, buf = buf.split(b'\r\n\r\n', 1)
        first, *rest = head.decode('latin-1').split('\r\n')
        headers = {}
        for line in rest:
            k, _, v = line.partition(':')
            headers[k.strip().lower()] = v.strip()
        status = int(first.split()[1])
        if status != 200:
            self.body = buf
            n = int(headers.get('content-length', '0'))
            while len(self.body) < n:
                self.body += self._recv()
            self._answer(status, headers)
            self._finish('answered')
            return
        self._answer(status, headers)
        if headers.get('transfer-encoding', '').lower() != 'chunked':
            self._feed(buf)
            while True:
                self._feed(self._recv())
        self._buf = buf
        while True:
            size = int(self._line().split(b';')[0], 16)
            if size == 0:
                self._finish('last-chunk')
                return
            self._feed(self._exact(size))
            if self._exact(2) != b'\r\n':
                raise AssertionError('a chunk not followed by CRLF')

    def _recv_head(self):
        data = self._tls.recv(65536)    # the head is read even while held
        if not data:
            raise _Eof()
        return data

    def _line(self):
        while b'\r\n' not in self._buf:
            self._buf += self._recv()
        line, self._buf = self._buf.split(b'\r\n', 1)
        return line

    def _exact(self, n):
        while len(self._buf) < n:
            self._buf += self._recv()
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    # HTTP/2: one stream
    def _h2(self):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                    header_encoding='utf-8'))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(':method', 'GET'), (':scheme', 'https'),
                                (':authority', self.site.name), (':path', '/CCM_Notify')]
                          + self._request_headers(), end_stream=True)
        self._tls.sendall(conn.data_to_send())
        ok, frames = None, b''
        while True:
            frames += self._recv_head() if self.status is None else self._recv()
            events, frames = self._h2_events(conn, frames)
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    headers = dict(ev.headers)
                    ok = headers.get(':status') == '200'
                    self._answer(int(headers[':status']), headers)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    if ok:
                        self._feed(ev.data)
                    else:
                        self.body += ev.data
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self._finish('end-stream' if ok else 'answered')
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    self._finish('reset')
            out = conn.data_to_send()
            if out:
                self._tls.sendall(out)
            if self.end is not None:
                return

    def _h2_events(self, conn, frames):
        """The h2 events of the whole frames in `frames`, and the bytes left. A GOAWAY is
        noted (self.goaway) and not given to h2, which would refuse every frame after it: a
        draining gateway sends one as a notice, then ends the channel's stream."""
        events = []
        while len(frames) >= 9:
            size = 9 + int.from_bytes(frames[:3], 'big')
            if len(frames) < size:
                break
            frame, frames = frames[:size], frames[size:]
            if frame[3] == 0x7:
                self.goaway = True
            else:
                events += conn.receive_data(frame)
        return events, frames

    # Server-Sent Events
    def _feed(self, data):
        self._text += data
        while b'\n' in self._text:
            line, self._text = self._text.split(b'\n', 1)
            self._sse_line(line.rstrip(b'\r').decode())

    def _sse_line(self, line):
        p = self._pending
        if line == '':
            if 'data' in p:
                try:
                    data = json.loads(p['data'])
                except ValueError:
                    data = ('not JSON', p['data'])
                with self._cond:
                    self.events.append(Event(p.get('id'), p.get('event', 'message'), data,
                                             time.monotonic()))
                    self._cond.notify_all()
            self._pending = {}
        elif line.startswith(':'):
            with self._cond:
                self.comments += 1
                self._cond.notify_all()
        else:
            field, _, value = line.partition(':')
            value = value[1:] if value.startswith(' ') else value
            if field == 'data':
                p['data'] = p['data'] + '\n' + value if 'data' in p else value
            elif field in ('id', 'event'):
                p[field] = value
            elif field == 'retry':
                with self._cond:
                    self.retry = int(value)
                    self._cond.notify_all()


class CurlChannel(Channel):
    """The same channel held by `curl -N` (HTTP/1.1 or HTTP/2) on the shared device port: the
    answer's head (`-D -`) and the events from curl's output."""

    def __init__(self, site, device, http='2', **kw):
        self.http, self._curl = http, None
        super().__init__(site, site.port, device, proto=f'curl-http{http}', **kw)

    def _run(self):
        args = ['-N', '-D', '-', '-H', f'Accept: {self.accept}']
        for k, v in self._request_headers()[1:]:
            args += ['-H', f'{k}: {v}']
        self._curl = subprocess.Popen(
            curl_argv(self.site, '/CCM_Notify', *args, http=self.http,
                      cert=self.device.cert or False, timeout=600),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        out, head = self._curl.stdout, b''
        try:
            while b'\r\n\r\n' not in head:
                data = out.read1(65536)
                if not data:
                    raise _Eof()
                head += data
            head, rest = head.split(b'\r\n\r\n', 1)
            first, *lines = head.decode('latin-1').split('\r\n')
            self._answer(int(first.split()[1]),
                         {k.strip().lower(): v.strip() for k, _, v in
                          (line.partition(':') for line in lines)})
            self._feed(rest)
            while True:
                data = out.read1(65536)
                if not data:
                    raise _Eof()
                self.received += len(data)
                self._feed(data)
        except _Eof:
            self._finish('eof')
        finally:
            self._curl.wait()

    def close(self):
        self._closing = True
        poll(lambda: self._curl is not None, 10, 'curl to start')
        if self._curl.poll() is None:
            self._curl.kill()
        self._thread.join(10)
        assert not self._thread.is_alive(), f'{self.name}: the reader did not stop'


# ---------------------------------------------------------------- the deployment

class Fleet:
    """The 2 × 2 deployment of test_reports.two_by_two with notification settings (window
    16, buffer 16 KiB, heartbeat 2 s, retry 1 s), OIDC set to the test's IdP, and each gateway
    instance i also on a device port of its own, ports[i]."""

    def __init__(self, procs, tmp_path, svc):
        self.procs, self.tmp, self.svc = procs, tmp_path, svc
        self.idp = IdP(tmp_path)
        self.ports = [free_port(), free_port()]
        self.channels = []
        self.dep = None
        self._confs = []
        self.dep = two_by_two(procs, tmp_path, svc, configure=self._configure,
                              gateway_conf=self.conf)
        self.site = self.dep.site
        for i in range(2):
            self.wait_instance(i)
        for g in self.dep.gateways:      # the site's policy (with the IdP) at both
            self.dep.wait_policy(gateway=g)
        self._bulk = None
        self._n = 0

    def conf(self, i):
        return self._confs[i]

    def _configure(self, d):
        g = d.site.gateway_conf
        ini_set(g, 'gateway', 'notify_window', WINDOW)
        ini_set(g, 'gateway', 'notify_buffer', BUFFER)
        ini_set(g, 'gateway', 'notify_heartbeat', HEARTBEAT)
        ini_set(g, 'gateway', 'notify_retry', f'{RETRY_MS // 1000}s')
        self._confs = [d.site.dir / f'gateway-{i}.conf' for i in range(2)]
        for i, conf in enumerate(self._confs):
            conf.write_text(g.read_text())
            ini_set(conf, 'gateway', 'listen', f'127.0.0.1:{d.site.port}', f'127.0.0.1:{self.ports[i]}')
        d.cmg_site('oidc', 'set', '--issuer', self.idp.ISSUER, '--tenant', self.idp.TENANT,
                   '--audience', self.idp.AUDIENCE, '--jwks', self.idp.jwks)

    # ---- processes

    @property
    def gateways(self):
        return self.dep.gateways

    def start_instance(self, i):
        self.dep.gateways[i] = start_gateway(self.procs, self.site, i, conf=self.conf(i))
        self.wait_instance(i)

    def wait_instance(self, i):
        """Until instance i serves devices on its own port (a tunnel is up)."""
        def serving():
            conn = DeviceConnection(self.site, timeout=5 * SLOW)
            conn.port = self.ports[i]
            try:
                conn.request('GET', self.site.path('policy.xml'))
                return conn.getresponse().status == 200
            finally:
                conn.close()
        poll(serving, 20 * SLOW, f'gateway instance {i} to serve on port {self.ports[i]}',
             check=self.procs.check)

    def fds(self, i):
        return len(os.listdir(f'/proc/{self.dep.gateways[i].pid}/fd'))

    # ---- devices

    def cert_device(self, name):
        """device1 (from site init) or a device certificate `cmg site cert issue` makes."""
        if name == 'device1':
            crt, key = self.site.device_cert, self.site.device_key
        else:
            out = self.tmp / 'issued'
            if not (out / f'{name}.crt').exists():
                out.mkdir(exist_ok=True)
                self.dep.cmg_site('cert', 'issue', '--device', name, '--out', out)
            crt, key = out / f'{name}.crt', out / f'{name}.key'
        return NDevice(name, 'cert', thumbprint_id(crt), cert=(str(crt), str(key)))

    def bulk(self):
        if self._bulk is None:
            self._bulk = self.dep.bulk_token()[1]
        return self._bulk

    def registered_device(self, name):
        """A device with a self-signed certificate, registered with a bulk token: its site
        device token is bound to that certificate."""
        dev = Device(self.tmp, name)
        self.dep.register(dev, self.bulk())
        return NDevice(name, 'token', dev.device_id, cert=(str(dev.crt), str(dev.key)),
                       token=dev.token)

    def oidc_device(self, name):
        """A device with an OIDC token of the IdP naming its `deviceid`, no certificate."""
        device_id = f'oidc-device-{name}'
        return NDevice(name, 'oidc', device_id, token=self.idp.token(deviceid=device_id,
                                                                      upn=f'{name}@example.test'))

    def every_method(self):
        """Two devices of each method: [cert, cert, token, token, oidc, oidc]."""
        return [self.cert_device('device1'), self.cert_device('dev-cert-b'),
                self.registered_device('dev-token-a'), self.registered_device('dev-token-b'),
                self.oidc_device('a'), self.oidc_device('b')]

    def channel(self, device, instance=0, proto='h1', **kw):
        ch = Channel(self.site, self.ports[instance], device, proto=proto, **kw)
        self.channels.append(ch)
        return ch

    def curl(self, device, http='2', **kw):
        """A channel held by curl -N, checked open (200)."""
        ch = CurlChannel(self.site, device, http=http, **kw)
        self.channels.append(ch)
        assert ch.wait_open() == 200, (ch.name, ch.status, ch.end)
        return ch

    def open(self, device, instance=0, proto='h1', **kw):
        """A channel, checked open (200)."""
        ch = self.channel(device, instance, proto, **kw)
        assert ch.wait_open() == 200, (ch.name, ch.status, ch.body, ch.end)
        return ch

    def close(self):
        for ch in self.channels:
            ch.close()

    # ---- the site's commands

    def notify(self, *args, check=True):
        """`cmg site notify ARGS --json`: its JSON answer."""
        r = self.dep.cmg_site('notify', *map(str, args), '--json', check=check)
        return json.loads(r.stdout) if r.returncode == 0 else r

    def notify_api(self, **args):
        """The admin API's `notify` op (a loop's quicker way): its answer."""
        return self.dep.api('POST', '/v1/ops/notify', args)

    def broadcast(self, type='policy', data=None, **extra):
        self._n += 1
        return self.notify('--all', '--type', type, '--data',
                           json.dumps(data if data is not None else {'n': self._n}), *extra)

    def status(self, notify_id):
        r = self.dep.cmg_site('notify', 'status', notify_id, '--json')
        return json.loads(r.stdout)

    def counts(self, notify_id):
        s = self.status(notify_id)
        return {k: s[k] for k in ('targets', 'delivered', 'waiting', 'expired')}

    def device_rows(self):
        return {d['id']: d for d in json.loads(self.dep.cmg_site('device', 'list', '--json').stdout)}


@pytest.fixture
def fleet(procs, tmp_path, svc):
    f = Fleet(procs, tmp_path, svc)
    yield f
    f.close()


__all__ = ['ANY_ID', 'BUFFER', 'Channel', 'CurlChannel', 'DELIVER', 'Event', 'Fleet', 'HEARTBEAT', 'INTERVAL',
           'NDevice', 'NOTIFY_ID', 'RETRY_MS', 'WINDOW', 'fleet', 'seq_of', 'thumbprint_id']
