"""A connector as a gateway sees one, driven by the test: it dials a gateway instance's
tunnel port (mutual TLS with the site's connector certificate, ALPN cmg-tunnel/1) and
plays the HTTP/2 server, as the real connector does. The gateway opens the control stream
(GET /.cmg/control): it is answered 200 and then carries the control lines the test
pushes (hello, policy, notify-sync, notify; contract §4). Requests the gateway sends up
the tunnel are recorded: POST /.cmg/notify-report bodies (parsed, in `notify_reports`)
are answered with the statuses the test queues in `report_statuses` (204 once the queue is
empty); status reports (POST /.cmg/report) and anything else get 204.

    fc = FakeConnector(site, site.tunnel_port).start()   # dials, sends the hello
    fc.policy(jws)                                       # a signed policy, if the test has one
    fc.sync('0123456789abcdef', 0)
    fc.notify(fc.doc(1, 'policy', devices=['cert:...']))

Everything runs on one thread of its own; the test's calls are queued to it."""
import json
import queue
import select
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

CONTROL_PATH = '/.cmg/control'
NOTIFY_REPORT_PATH = '/.cmg/notify-report'


class FakeConnector:
    def __init__(self, site, port, name='fake-connector', roles=None, cert=None, key=None):
        self.site = site
        self.port = port
        self.name = name
        self.roles = list(roles if roles is not None else site.role_ids)
        self.cert = str(cert or site.dir / 'connector.crt')
        self.key = str(key or site.dir / 'connector.key')
        self.notify_reports = []          # parsed bodies answered 204, in the order they came
        self.report_attempts = []         # (status answered, parsed body) of every one
        self.report_statuses = []         # statuses to answer the next notify reports with
        self.requests = []                # (method, path) of every stream the gateway opened
        self.control_stream = None
        self._ctl_out = bytearray()       # control lines not yet sent (stream, flow control)
        self._calls = queue.Queue()
        self._streams = {}                # stream id -> {'headers': {...}, 'body': bytearray}
        self._lock = threading.Lock()
        self._stop = False
        self.closed = threading.Event()
        self.error = None
        self.sock = None
        self.h2 = None
        self.thread = None

    # ---- life

    def start(self, hello=True):
        ctx = ssl.create_default_context(cafile=str(self.site.ca))
        ctx.check_hostname = False
        ctx.load_cert_chain(self.cert, self.key)
        ctx.set_alpn_protocols(['cmg-tunnel/1'])
        raw = socket.create_connection(('127.0.0.1', self.port), timeout=10)
        self.sock = ctx.wrap_socket(raw)
        self.sock.setblocking(False)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                       header_encoding='utf-8'))
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(1 << 24)
        self._flush()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if hello:
            self.control({'type': 'hello', 'name': self.name, 'version': 'test',
                          'roles': self.roles})
        return self

    def close(self):
        """Closes the tunnel (no GOAWAY: as a connector that died)."""
        self._stop = True
        if self.thread:
            self.thread.join(5)
        try:
            self.sock.close()
        except OSError:
            pass

    # ---- what the test sends

    def control(self, msg):
        """Queues one control message (a dict, sent as one JSON line)."""
        self._calls.put(json.dumps(msg, separators=(',', ':')).encode() + b'\n')

    def policy(self, jws):
        self.control({'type': 'policy', 'jws': jws})

    def sync(self, epoch, last):
        self.control({'type': 'notify-sync', 'epoch': epoch, 'last': last})

    def notify(self, doc):
        """A notification document (contract §2) as its control message: the message's
        "type" is "notify", the notification's type goes as "event" (what the connector
        sends)."""
        msg = {'type': 'notify'}
        if 'type' in doc:
            msg['event'] = doc['type']
        msg.update({k: v for k, v in doc.items() if k != 'type'})
        self.control(msg)

    @staticmethod
    def doc(epoch, seq, type_='policy', data=None, devices=None, all_=False, ttl=3600,
            created=None, expired=False):
        """A document of contract §2 (a tombstone with expired=True)."""
        if expired:
            return {'id': f'{epoch}-{seq}', 'seq': seq, 'expired': True}
        now = int(time.time()) if created is None else created
        d = {'id': f'{epoch}-{seq}', 'seq': seq, 'type': type_, 'created': now,
             'expires': now + ttl}
        if data is not None:
            d['data'] = data
        if all_:
            d['all'] = True
        else:
            d['devices'] = list(devices or [])
        return d

    def wait_reports(self, pred, timeout=10):
        """Waits until pred(notify_reports) holds; returns the reports."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                reports = list(self.notify_reports)
            if pred(reports):
                return reports
            time.sleep(0.05)
        raise AssertionError(f'notify reports never matched: {self.notify_reports}')

    # ---- the loop

    def _flush(self):
        data = self.h2.data_to_send()
        while data:
            try:
                n = self.sock.send(data)
                data = data[n:]
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                select.select([], [self.sock], [], 0.1)

    def _send_line(self, line):
        self._ctl_out += line
        self._send_control()

    def _send_control(self):
        """What flow control and the frame size allow of the control lines queued."""
        if self.control_stream is None:
            return
        while self._ctl_out:
            room = min(self.h2.local_flow_control_window(self.control_stream),
                       self.h2.max_outbound_frame_size, len(self._ctl_out))
            if room <= 0:
                return
            self.h2.send_data(self.control_stream, bytes(self._ctl_out[:room]))
            del self._ctl_out[:room]

    def _run(self):
        try:
            while not self._stop:
                while True:
                    try:
                        self._send_line(self._calls.get_nowait())
                    except queue.Empty:
                        break
                self._flush()
                r, _, _ = select.select([self.sock], [], [], 0.05)
                if not r and not self.sock.pending():
                    continue
                try:
                    data = self.sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                if not data:
                    break
                with self._lock:
                    for ev in self.h2.receive_data(data):
                        self._event(ev)
                self._flush()
        except (OSError, h2.exceptions.ProtocolError) as e:
            import traceback; self.error = traceback.format_exc()
        finally:
            self.closed.set()

    def _event(self, ev):
        if isinstance(ev, h2.events.RequestReceived):
            headers = dict(ev.headers)
            self._streams[ev.stream_id] = {'headers': headers, 'body': bytearray()}
            self.requests.append((headers.get(':method'), headers.get(':path')))
            if headers.get(':path') == CONTROL_PATH:
                self.control_stream = ev.stream_id
                self.h2.send_headers(ev.stream_id, [(':status', '200'),
                                                    ('content-type', 'application/x-ndjson')])
                self._send_control()
        elif isinstance(ev, h2.events.DataReceived):
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if ev.stream_id in self._streams:
                self._streams[ev.stream_id]['body'] += ev.data
        elif isinstance(ev, h2.events.WindowUpdated):
            self._send_control()
        elif isinstance(ev, h2.events.StreamEnded):
            st = self._streams.pop(ev.stream_id, None)
            if st is not None and ev.stream_id != self.control_stream:
                self._answer(ev.stream_id, st)

    def _answer(self, sid, st):
        status = 204
        if st['headers'].get(':path') == NOTIFY_REPORT_PATH:
            status = self.report_statuses.pop(0) if self.report_statuses else 204
            self.report_attempts.append((status, json.loads(bytes(st['body']))))
            if status == 204:
                self.notify_reports.append(json.loads(bytes(st['body'])))
        self.h2.send_headers(sid, [(':status', str(status))], end_stream=True)
