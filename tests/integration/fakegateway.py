"""A stand-in for a gateway instance on its tunnel port, for testing the connector alone:
a TLS server presenting the test site's gateway certificate (ALPN cmg-tunnel/1) that
speaks HTTP/2 as the gateway does on a tunnel (the client side): it opens GET
/.cmg/control and collects the connector's control lines, and can POST to the connector
(e.g. /.cmg/notify-report) and wait for the answer.

    gw = FakeGateway(site, port)          # listens; accepts one tunnel at a time
    gw.wait_lines(lambda ls: ..., what)   # the control messages so far, parsed
    r = gw.post('/.cmg/notify-report', body)   # -> FakeGateway.Answer (status, body)
"""
import json
import socket
import ssl
import threading
import time

import h2.config
import h2.connection
import h2.events

from cmgtest import SLOW, poll

CONTROL_PATH = '/.cmg/control'


class FakeGateway:
    class Answer:
        def __init__(self):
            self.status = None
            self.body = b''
            self.reset = None
            self.done = threading.Event()

        def wait(self, timeout=15):
            assert self.done.wait(timeout * SLOW), 'no answer from the connector'
            return self

    def __init__(self, site, port):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(site.dir / 'gateway.crt', site.dir / 'gateway.key')
        # The connector's certificate is not checked here (Python's check wants the
        # clientAuth usage; a connector's carries OpenCMG's own): the real gateway does.
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.set_alpn_protocols(['cmg-tunnel/1'])
        self.port = port
        self.sock = socket.create_server(('127.0.0.1', port))
        self.lock = threading.Lock()
        self.lines = []          # control messages, parsed, in order, over all tunnels
        self.tunnels = 0         # tunnels accepted
        self.answers = {}
        self.conn = self.tls = None
        self.closed = False
        self._buf = b''
        threading.Thread(target=self._accept, daemon=True).start()

    # ---- the tunnel

    def _accept(self):
        while not self.closed:
            try:
                raw, _ = self.sock.accept()
                tls = self.ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                if self.closed:
                    return
                continue
            self._serve(tls)

    def _send(self):
        data = self.conn.data_to_send()
        if data:
            self.tls.sendall(data)

    def _serve(self, tls):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                    header_encoding='utf-8'))
        with self.lock:
            self.tls, self.conn, self._buf = tls, conn, b''
            self.tunnels += 1
            conn.initiate_connection()
            conn.increment_flow_control_window(64 * 1024 * 1024)
            self.control = conn.get_next_available_stream_id()
            conn.send_headers(self.control, [(':method', 'GET'), (':path', CONTROL_PATH),
                                             (':scheme', 'https'), (':authority', 'connector')],
                              end_stream=True)
            self._send()
        try:
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                with self.lock:
                    for ev in conn.receive_data(data):
                        self._event(ev)
                    self._send()
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            with self.lock:
                self.conn = None
                for a in self.answers.values():
                    a.done.set()
            tls.close()

    def _event(self, ev):
        if isinstance(ev, h2.events.DataReceived):
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if ev.stream_id == self.control:
                self._buf += ev.data
                *whole, self._buf = self._buf.split(b'\n')
                for line in whole:   # each message has one "type"
                    self.lines.append(json.loads(line, object_pairs_hook=self._one_type))
            elif ev.stream_id in self.answers:
                self.answers[ev.stream_id].body += ev.data
        elif isinstance(ev, h2.events.ResponseReceived) and ev.stream_id in self.answers:
            self.answers[ev.stream_id].status = int(dict(ev.headers)[':status'])
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in self.answers:
            self.answers.pop(ev.stream_id).done.set()
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in self.answers:
            a = self.answers.pop(ev.stream_id)
            a.reset = ev.error_code
            a.done.set()

    @staticmethod
    def _one_type(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f'a control message with a key twice: {keys}'
        return dict(pairs)

    # ---- for tests

    def wait_tunnel(self, timeout=10):
        poll(lambda: self.conn is not None and any(m['type'] == 'hello' for m in self.lines),
             timeout * SLOW, 'the connector to open its tunnel and say hello')

    def wait_lines(self, until, what, timeout=10):
        """Waits until until(messages) is truthy; returns it."""
        return poll(lambda: until(list(self.lines)), timeout * SLOW, what)

    def messages(self, type_):
        return [m for m in list(self.lines) if m.get('type') == type_]

    def post(self, path, body, wait=True, content_type='application/json'):
        """POSTs body on a new stream of the tunnel; returns its Answer (waited for)."""
        a = FakeGateway.Answer()
        with self.lock:
            sid = self.conn.get_next_available_stream_id()
            self.answers[sid] = a
            self.conn.send_headers(sid, [(':method', 'POST'), (':path', path), (':scheme', 'https'),
                                         (':authority', 'connector'), ('content-type', content_type),
                                         ('content-length', str(len(body)))])
            self._send()
        sent = 0
        while sent < len(body):   # as the flow control windows allow
            with self.lock:
                if sid not in self.answers or self.conn is None:
                    break
                room = min(self.conn.local_flow_control_window(sid), 16384, len(body) - sent)
                if room > 0:
                    self.conn.send_data(sid, body[sent:sent + room])
                    sent += room
                    self._send()
            if room <= 0:
                time.sleep(0.005)
        with self.lock:
            if sid in self.answers and self.conn is not None:
                self.conn.end_stream(sid)
                self._send()
        return a.wait() if wait else a

    def close(self):
        self.closed = True
        self.sock.close()
        with self.lock:
            if self.tls:
                try:
                    self.tls.close()
                except OSError:
                    pass
