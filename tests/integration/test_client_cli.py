"""`cmg client` on its own: help texts, usage errors, the HTTP(S) client against local Python
TLS servers (lengths, chunked, close-delimited, errors, wrong CA, wrong name, timeouts,
IPv6), and register / get / renew against a mock of the gateway's registration endpoint
(nothing from the site or the real gateway is needed).

The mock gateway answers POST <prefix>/register and <prefix>/renew as the protocol says,
and /echo, /status/N, ... for everything else; it asks for a client certificate and trusts
the certificates in `server.trusted` (a device's self-signed one is added once it exists).
"""
import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import socketserver
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cmgtest import CMG, SANITIZED, SLOW, make_cert

PREFIX = '/CCM_Proxy_ServerAuth/SITE_ab12cd'
SERVER_NAME = 'cmg.test'


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b'=').decode()


def jwt(payload):
    """A compact JWS shaped like the site's (the client never checks the signature)."""
    header = {'alg': 'ES256', 'typ': 'JWT', 'kid': 'test'}
    return '.'.join([b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()),
                     b64url(os.urandom(64))])


def bulk_token(reg=PREFIX, use='bulk'):
    payload = {'iss': 'site', 'exp': int(time.time()) + 3600, 'jti': b64url(os.urandom(9))}
    if use is not None:
        payload['cmg_use'] = use
    if reg is not None:
        payload['cmg_reg'] = reg
    return jwt(payload)


class Result:
    def __init__(self, p):
        self.returncode = p.returncode
        # decoded by hand: universal newlines would hide the CRLFs of -i
        self.stdout = p.stdout.decode('utf-8', 'replace')
        self.stderr = p.stderr.decode('utf-8', 'replace')

    def __repr__(self):
        return f'<exit {self.returncode}, stdout {self.stdout[:300]!r}, stderr {self.stderr[:600]!r}>'


def run(*args, input=None, env=None, timeout=60):
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault('ASAN_OPTIONS', 'detect_leaks=1:abort_on_error=0')
    p = subprocess.run([CMG, *map(str, args)], capture_output=True, timeout=timeout * SLOW, env=full_env,
                       input=input.encode() if input is not None else None,
                       stdin=None if input is not None else subprocess.DEVNULL)
    return Result(p)


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pattern(n):
    block = hashlib.sha256(b'cmg').digest() * 64          # 2 KiB
    return (block * (n // len(block) + 1))[:n]


# ---------------------------------------------------------------- the mock gateway

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'mock-gateway'

    def log_message(self, fmt, *args):
        pass

    def setup(self):
        self.request.settimeout(15)
        self.tls_ok = True
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError) as e:
            self.tls_ok = False
            self.server.tls_errors.append(repr(e))
        super().setup()

    def handle(self):
        if self.tls_ok:
            try:
                super().handle()
            except (ssl.SSLError, OSError):
                pass

    # ---- answers

    def send(self, status, body=b'', ctype='text/plain', headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj), 'application/json')

    def peer_sha256(self):
        der = self.request.getpeercert(binary_form=True)
        return hashlib.sha256(der).hexdigest() if der else None

    def read_body(self):
        n = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(n) if n else b''

    def record(self, body):
        self.server.requests.append({
            'method': self.command, 'path': self.path, 'headers': dict(self.headers.items()),
            'body': body, 'peer': self.peer_sha256()})

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_HEAD = do_DELETE = do_GET

    def dispatch(self):
        body = self.read_body()
        self.record(body)
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        srv = self.server
        if path == f'{PREFIX}/register' and self.command == 'POST':
            return self.register(body)
        if path == f'{PREFIX}/renew' and self.command == 'POST':
            return self.renew(body)
        if path.endswith('/echo'):
            return self.send_json(200, {
                'method': self.command, 'path': self.path, 'headers': dict(self.headers.items()),
                'body': body.decode('latin-1'), 'peer': self.peer_sha256()})
        if path.endswith('/hello'):
            return self.send(200, 'hello\n', headers=[('X-Test', 'yes')])
        if path.endswith('/big'):
            return self.send(200, pattern(int(q['n'])), 'application/octet-stream')
        if path.endswith('/chunked'):
            data = pattern(int(q.get('n', 100000)))
            self.send_response(200)
            self.send_header('Content-Type', 'application/octet-stream')
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
            step = 7777
            for i in range(0, len(data), step):
                piece = data[i:i + step]
                self.wfile.write(b'%x\r\n%s\r\n' % (len(piece), piece))
            self.wfile.write(b'0\r\n\r\n')
            return
        if path.endswith('/close'):          # no length: the body ends with the connection
            self.send_response(200)
            self.send_header('Content-Type', 'text/plain')
            self.send_header('Connection', 'close')
            self.end_headers()
            self.wfile.write(b'until the end\n' * 1000)
            self.close_connection = True
            return
        if path.endswith('/short'):          # promises more than it sends
            self.send_response(200)
            self.send_header('Content-Length', '1000')
            self.end_headers()
            self.wfile.write(b'x' * 10)
            self.close_connection = True
            return
        if path.endswith('/hang'):
            srv.stop.wait(30)
            return
        if path.startswith('/status/'):
            status = int(path.split('/')[2])
            if q.get('type') == 'json':
                return self.send_json(status, {'error': q.get('reason', 'CMGService_Error')})
            return self.send(status, q.get('reason', '') + ('\r\n' if 'reason' in q else ''))
        return self.send(404, 'CMGService_No_Mapping\r\n')

    # ---- the registration protocol

    def bearer(self):
        auth = self.headers.get('Authorization', '')
        return auth[7:] if auth.startswith('Bearer ') else None

    def issue(self, device_id):
        srv = self.server
        srv.n_tokens += 1
        now = int(time.time())
        token = jwt({'sub': device_id, 'n': srv.n_tokens, 'cnf': {'x5t#S256': self.peer_sha256()}})
        srv.tokens[token] = device_id
        return self.send_json(200, {'device_id': device_id, 'token': token,
                                    'expires': now + srv.lifetime,
                                    'renew_after': now + srv.renew_in})

    def register(self, body):
        srv = self.server
        if srv.refuse:
            status, reason, kind = srv.refuse
            return self.send_json(status, {'error': reason}) if kind == 'json' else self.send(status, reason + '\r\n')
        if self.bearer() != srv.bulk:
            return self.send(401, 'CMGService_Invalid_Token\r\n')
        if not self.peer_sha256():
            return self.send(401, 'CMGService_Invalid_Client_Certificate\r\n')
        if self.headers.get('Content-Type') != 'application/json':
            return self.send_json(400, {'error': 'CMGService_Bad_Request'})
        name = json.loads(body)['name']
        srv.names.append(name)
        return self.issue(f'dev-{len(srv.names)}')

    def renew(self, body):
        srv = self.server
        if srv.refuse_renew:
            return self.send(srv.refuse_renew, 'CMGService_Unavailable\r\n')
        device = srv.tokens.get(self.bearer())
        if device is None or json.loads(body) != {}:
            return self.send(401, 'CMGService_Invalid_Token\r\n')
        return self.issue(device)


class MockGateway(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, certs, host='127.0.0.1'):
        self.address_family = socket.AF_INET6 if ':' in host else socket.AF_INET
        super().__init__((host, 0), Handler)
        self.certs = certs
        self.ask_cert = True           # False: no client certificate is asked for
        self.trusted = [certs['client_ca']]
        self.requests, self.tls_errors, self.names = [], [], []
        self.tokens, self.n_tokens = {}, 0
        self.bulk = bulk_token()
        self.lifetime, self.renew_in = 3600, 1800
        self.refuse = None              # (status, reason, 'json' | 'text') for register
        self.refuse_renew = None        # a status for renew
        self.stop = threading.Event()
        self.port = self.server_address[1]
        self.addr = f'[{host}]:{self.port}' if ':' in host else f'{host}:{self.port}'
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def context(self):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.certs['server_crt'], self.certs['server_key'])
        ctx.verify_mode = ssl.CERT_REQUIRED if self.ask_cert else ssl.CERT_NONE
        for path in self.trusted:
            ctx.load_verify_locations(path)
        return ctx

    def get_request(self):
        sock, addr = self.socket.accept()
        return self.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def close(self):
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture(scope='module')
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp('pki')
    ca, ca_key, (ca_crt, _) = make_cert(d / 'ca', 'Test Root', ca=True, valid_days=365)
    _, _, (srv_crt, srv_key) = make_cert(d / 'server', SERVER_NAME, ca, ca_key,
                                         eku=(ExtendedKeyUsageOID.SERVER_AUTH,),
                                         san=(SERVER_NAME, 'localhost', '127.0.0.1', '::1'))
    other, _, (other_crt, _) = make_cert(d / 'other-ca', 'Other Root', ca=True, valid_days=365)
    cca, cca_key, (cca_crt, _) = make_cert(d / 'client-ca', 'Client Root', ca=True, valid_days=365)
    _, _, (dev_crt, dev_key) = make_cert(d / 'pki-device', 'pki-device', cca, cca_key)
    _, _, (rogue_crt, rogue_key) = make_cert(d / 'rogue', 'rogue')     # self-signed, untrusted
    return {'dir': d, 'ca': ca_crt, 'server_crt': srv_crt, 'server_key': srv_key,
            'other_ca': other_crt, 'client_ca': cca_crt, 'dev_crt': dev_crt, 'dev_key': dev_key,
            'rogue_crt': rogue_crt, 'rogue_key': rogue_key}


@pytest.fixture
def gw(certs):
    if not os.access(CMG, os.X_OK):
        pytest.fail(f'no cmg binary at {CMG} (set CMG_BIN)')
    server = MockGateway(certs)
    yield server
    server.close()


def pki_get(gw, certs, path, *args, **kw):
    """cmg client get for a PKI device (no registration)."""
    return run('client', 'get', path, '--gateway', gw.addr, '--ca', certs['ca'],
               '--cert', certs['dev_crt'], '--key', certs['dev_key'], *args, **kw)


def ipv6_loopback_problem():
    if not socket.has_ipv6:
        return 'Python was built without IPv6'
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(('::1', 0))
    except OSError as e:
        return f'::1 is not usable on this host: {e}'
    return None


# ---------------------------------------------------------------- help and usage errors

@pytest.mark.parametrize('args, words', [
    (['client', '--help'], ['register', 'get', 'renew', 'CMG_CLIENT_STATE', 'client-state',
                            '.config/opencmg/client']),
    (['client', 'register', '--help'], ['--gateway', '--ca', '--bulk-token', '--state',
                                        '--server-name', '--name', '--prefix', '@FILE']),
    (['client', 'get', '--help'], ['PATH', '--state', '-o', '--include', '-X', '-d', '-H',
                                   '--cert', '--key', '--gateway', '--server-name']),
    (['client', 'renew', '--help'], ['--state']),
])
def test_help(args, words):
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ''
    for w in words:
        assert w in r.stdout, f'{w!r} missing from {" ".join(args)}'


def test_top_level_help_lists_client():
    r = run('--help')
    assert r.returncode == 0 and 'client' in r.stdout


@pytest.mark.parametrize('args, message', [
    (['client'], 'usage: cmg client'),
    (['client', 'frobnicate'], "unknown command 'frobnicate'"),
    (['client', 'register'], 'missing --gateway'),
    (['client', 'register', '--gateway', 'x:1'], 'missing --ca'),
    (['client', 'register', '--gateway', 'x:1', '--ca', 'ca.crt'], 'missing --bulk-token'),
    (['client', 'register', '--gateway', 'no-port', '--ca', 'c', '--bulk-token', 't'], 'not HOST:PORT'),
    (['client', 'register', '--gateway', '::1:443', '--ca', 'c', '--bulk-token', 't'], 'not HOST:PORT'),
    (['client', 'register', '--gateway', 'h:99999', '--ca', 'c', '--bulk-token', 't'], 'not HOST:PORT'),
    (['client', 'register', '--gateway', 'h:1', '--ca', 'c', '--bulk-token', 't', '--timeout', 'x'], '--timeout'),
    (['client', 'register', '--gateway', 'h:1', '--ca', 'c', '--bulk-token'], 'needs a value'),
    (['client', 'register', '--bogus'], "unknown option '--bogus'"),
    (['client', 'register', '--gateway', 'h:1', '--ca', 'c', '--bulk-token', 'not a token'], 'not a token'),
    (['client', 'register', '--gateway', 'h:1', '--ca', 'c', '--bulk-token', 'abc.def'], 'not a JWT'),
    (['client', 'get'], 'missing PATH'),
    (['client', 'get', 'relative/path'], "must start with '/'"),
    (['client', 'get', '/a', '/b'], 'one PATH only'),
    (['client', 'get', '/a', '--frob'], "unknown option '--frob'"),
    (['client', 'get', '/a', '-o'], 'needs a value'),
    (['client', 'get', '/a', '--cert', 'c.crt'], 'needs --gateway'),
    (['client', 'get', '/a', '--key', 'c.key'], '--key goes with --cert'),
    (['client', 'get', '/a', '-H', 'no colon'], "not 'Name: value'"),
    (['client', 'get', '/a', '--gateway', '[::1]'], 'not HOST:PORT'),
    (['client', 'get', '/a', '--timeout', '-1'], '--timeout'),
    (['client', 'renew', 'extra'], "unexpected argument 'extra'"),
])
def test_usage_errors(args, message):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr
    assert r.stdout == ''


@pytest.mark.parametrize('payload, message', [
    ({'cmg_use': 'bulk'}, 'no cmg_reg claim; give --prefix'),
    ({'cmg_use': 'device', 'cmg_reg': PREFIX}, 'not a bulk registration token'),
])
def test_register_token_claims(tmp_path, payload, message):
    r = run('client', 'register', '--gateway', '127.0.0.1:1', '--ca', 'ca.crt',
            '--bulk-token', jwt(payload), '--state', tmp_path / 'st')
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / 'st').exists()


def test_get_unregistered(tmp_path):
    r = run('client', 'get', '/x', '--state', tmp_path / 'nothing')
    assert r.returncode == 1
    assert 'not registered' in r.stderr and "cmg client register" in r.stderr


# ---------------------------------------------------------------- the HTTP client (PKI device)

def test_get_content_length(gw, certs):
    r = pki_get(gw, certs, '/svc/hello')
    assert (r.returncode, r.stdout, r.stderr) == (0, 'hello\n', '')
    req = gw.requests[-1]
    assert req['method'] == 'GET' and req['path'] == '/svc/hello'
    assert req['headers']['Host'] == gw.addr
    assert req['headers']['Connection'] == 'close'
    assert 'Authorization' not in req['headers']
    pki_sha = hashlib.sha256(x509.load_pem_x509_certificate(certs['dev_crt'].read_bytes())
                             .public_bytes(serialization.Encoding.DER)).hexdigest()
    assert req['peer'] == pki_sha


def test_get_include(gw, certs):
    r = pki_get(gw, certs, '/svc/hello', '-i')
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition('\r\n\r\n')
    lines = head.split('\r\n')
    assert lines[0] == 'HTTP/1.1 200 OK'
    assert 'X-Test: yes' in lines and 'Content-Length: 6' in lines
    assert body == 'hello\n'


@pytest.mark.parametrize('path, n', [('/svc/chunked?n=100000', 100000), ('/svc/chunked?n=0', 0),
                                     ('/svc/big?n=3000000', 3000000)])
def test_get_streams_to_file(gw, certs, tmp_path, path, n):
    out = tmp_path / 'out.bin'
    r = pki_get(gw, certs, path, '-o', out)
    assert (r.returncode, r.stdout, r.stderr) == (0, '', '')
    assert out.read_bytes() == pattern(n)
    assert [p.name for p in tmp_path.iterdir()] == ['out.bin']    # no temporary file left


def test_get_close_delimited(gw, certs):
    r = pki_get(gw, certs, '/svc/close')
    assert r.returncode == 0, r.stderr
    assert r.stdout == 'until the end\n' * 1000


def test_get_truncated_body_is_an_error(gw, certs, tmp_path):
    out = tmp_path / 'out'
    r = pki_get(gw, certs, '/svc/short', '-o', out)
    assert r.returncode == 3
    assert 'closed before the end of the response' in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('query, reason', [
    ('/status/403?reason=CMGService_Device_Blocked', '403 CMGService_Device_Blocked'),        # text/plain
    ('/status/401?type=json&reason=CMGService_Invalid_Token', '401 CMGService_Invalid_Token'),  # JSON
    ('/status/503', '503 Service Unavailable'),                                                 # no body
    ('/nothing', '404 CMGService_No_Mapping'),
])
def test_get_error_status(gw, certs, tmp_path, query, reason):
    out = tmp_path / 'out'
    r = pki_get(gw, certs, query, '-o', out)
    assert r.returncode == 1
    assert r.stderr.strip() == f'cmg client: GET {query}: {reason}'
    assert r.stdout == ''
    assert not out.exists(), 'an error body must not replace the output file'


def test_get_error_status_include(gw, certs):
    r = pki_get(gw, certs, '/status/403?reason=CMGService_Device_Blocked', '-i')
    assert r.returncode == 1
    assert r.stdout.startswith('HTTP/1.1 403 ')
    assert r.stdout.endswith('\r\n\r\nCMGService_Device_Blocked\r\n')


def test_post_data_and_headers(gw, certs, tmp_path):
    r = pki_get(gw, certs, '/svc/echo?x=1', '-d', 'a=b&c', '-H', 'X-One: 1', '-H', 'Content-Type: text/x')
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo['method'] == 'POST' and echo['path'] == '/svc/echo?x=1' and echo['body'] == 'a=b&c'
    assert echo['headers']['Content-Length'] == '5'
    assert echo['headers']['X-One'] == '1' and echo['headers']['Content-Type'] == 'text/x'

    body = tmp_path / 'body'
    body.write_bytes(pattern(100000))
    r = pki_get(gw, certs, '/svc/echo', '-X', 'PUT', '-d', f'@{body}')
    echo = json.loads(r.stdout)
    assert echo['method'] == 'PUT' and echo['body'].encode('latin-1') == pattern(100000)

    r = pki_get(gw, certs, '/svc/echo', '-d', '@-', input='from stdin')
    assert json.loads(r.stdout)['body'] == 'from stdin'

    r = pki_get(gw, certs, '/svc/echo', '-X', 'DELETE')
    echo = json.loads(r.stdout)
    assert echo['method'] == 'DELETE' and 'Content-Length' not in echo['headers']

    r = pki_get(gw, certs, '/svc/hello', '-X', 'HEAD', '-i')
    assert r.returncode == 0 and r.stdout.startswith('HTTP/1.1 200 OK\r\n') and r.stdout.endswith('\r\n\r\n')


def test_headers_the_client_sets_are_refused(gw, certs):
    r = pki_get(gw, certs, '/svc/echo', '-H', 'Host: other')
    assert r.returncode == 2 and "'Host' is set by the client" in r.stderr
    r = pki_get(gw, certs, '/svc/echo', '-H', 'X-Bad: a\r\nInjected: b')
    assert r.returncode == 2


def test_wrong_ca(gw, certs):
    r = run('client', 'get', '/svc/hello', '--gateway', gw.addr, '--ca', certs['other_ca'],
            '--cert', certs['dev_crt'], '--key', certs['dev_key'])
    assert r.returncode == 3
    assert 'certificate verify failed' in r.stderr and 'unable to get local issuer certificate' in r.stderr


def test_server_name(gw, certs):
    r = pki_get(gw, certs, '/svc/echo', '--server-name', 'wrong.test')
    assert r.returncode == 3
    assert "certificate verify failed: hostname mismatch (expected 'wrong.test')" in r.stderr
    r = pki_get(gw, certs, '/svc/echo', '--server-name', SERVER_NAME)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['headers']['Host'] == f'{SERVER_NAME}:{gw.port}'
    r = run('client', 'get', '/svc/hello', '--gateway', f'localhost:{gw.port}', '--ca', certs['ca'],
            '--cert', certs['dev_crt'], '--key', certs['dev_key'])
    assert r.returncode == 0, r.stderr


def test_untrusted_client_certificate(gw, certs):
    r = run('client', 'get', '/svc/hello', '--gateway', gw.addr, '--ca', certs['ca'],
            '--cert', certs['rogue_crt'], '--key', certs['rogue_key'])
    assert r.returncode == 3
    # refused after the TLS 1.3 handshake: the alert shows whether reading or writing met it
    assert 'TLS: tlsv1 alert unknown ca' in r.stderr, r.stderr


def test_bad_client_key(gw, certs):
    r = run('client', 'get', '/svc/hello', '--gateway', gw.addr, '--ca', certs['ca'],
            '--cert', certs['dev_crt'], '--key', certs['rogue_key'])
    assert r.returncode == 1
    assert 'cannot load the private key' in r.stderr


def test_connection_refused(certs):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))           # bound, not listening: refused
        port = s.getsockname()[1]
        r = run('client', 'get', '/x', '--gateway', f'127.0.0.1:{port}', '--ca', certs['ca'],
                '--cert', certs['dev_crt'], '--key', certs['dev_key'])
    assert r.returncode == 3
    assert r.stderr.strip() == f'cmg client: connect 127.0.0.1:{port}: Connection refused'


def test_timeouts(gw, certs):
    with socket.socket() as s:                   # accepts (backlog), never speaks TLS
        s.bind(('127.0.0.1', 0))
        s.listen(4)
        start = time.monotonic()
        r = run('client', 'get', '/x', '--gateway', f'127.0.0.1:{s.getsockname()[1]}',
                '--ca', certs['ca'], '--cert', certs['dev_crt'], '--key', certs['dev_key'],
                '--timeout', '0.5')
        took = time.monotonic() - start
    assert r.returncode == 3
    assert 'TLS handshake with' in r.stderr and 'timed out after 0.5 s' in r.stderr
    assert took < 5 * SLOW
    start = time.monotonic()
    r = pki_get(gw, certs, '/svc/hang', '--timeout', '1')
    assert r.returncode == 3
    assert f'read from {gw.addr}: timed out after 1 s' in r.stderr
    assert time.monotonic() - start < 6 * SLOW


@pytest.mark.skipif(ipv6_loopback_problem() is not None, reason='no IPv6 loopback')
def test_ipv6(certs):
    server = MockGateway(certs, host='::1')
    try:
        r = run('client', 'get', '/svc/echo', '--gateway', server.addr, '--ca', certs['ca'],
                '--cert', certs['dev_crt'], '--key', certs['dev_key'])
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)['headers']['Host'] == server.addr
    finally:
        server.close()


# ---------------------------------------------------------------- register, get, renew

def register(gw, certs, state, *args, token=None, env=None, input=None):
    return run('client', 'register', '--gateway', gw.addr, '--ca', certs['ca'],
               '--bulk-token', gw.bulk if token is None else token, '--state', state,
               '--server-name', SERVER_NAME, *args, env=env, input=input)


def trust_device(gw, state):
    """Trust the device's self-signed certificate (Python's TLS server cannot take an unknown
    one). The server's context is made per connection, so this may come before
    `cmg client register` writes the certificate, as long as it is there when it connects."""
    gw.trusted.append(Path(state) / 'device.crt')
    gw.ask_cert = True


def test_register_creates_identity_then_registers(gw, certs, tmp_path):
    state = tmp_path / 'a' / 'state'
    gw.ask_cert = False
    gw.refuse = (401, 'CMGService_Invalid_Token', 'text')
    r = register(gw, certs, state, '--name', 'laptop-7')
    assert r.returncode == 1
    assert r.stderr.strip() == 'cmg client: registration refused: 401 CMGService_Invalid_Token'
    assert r.stdout == ''

    # the identity is there (made once), nothing else
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / 'device.key').stat().st_mode) == 0o600
    assert not (state / 'device.json').exists() and not (state / 'ca.crt').exists()
    cert = x509.load_pem_x509_certificate((state / 'device.crt').read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == 'laptop-7'
    assert cert.issuer == cert.subject
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    days = (cert.not_valid_after - cert.not_valid_before).days
    assert 3649 <= days <= 3651
    key_before = (state / 'device.key').read_bytes()
    crt_before = (state / 'device.crt').read_bytes()

    gw.refuse = (403, 'CMGService_Token_Revoked', 'json')
    r = register(gw, certs, state, '--name', 'laptop-7')
    assert r.stderr.strip() == 'cmg client: registration refused: 403 CMGService_Token_Revoked'

    # now the gateway knows the device's certificate: registered, with the same identity
    gw.refuse = None
    trust_device(gw, state)
    home = tmp_path / 'home'
    r = register(gw, certs, state, '--name', 'laptop-7', env={'HOME': str(home)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('registered as device dev-1; token expires 20')
    assert r.stdout.strip().endswith('Z')
    assert (state / 'device.key').read_bytes() == key_before
    assert (state / 'device.crt').read_bytes() == crt_before
    assert (state / 'ca.crt').read_bytes() == certs['ca'].read_bytes()
    assert stat.S_IMODE((state / 'device.json').stat().st_mode) == 0o600
    saved = json.loads((state / 'device.json').read_text())
    assert saved['gateway'] == gw.addr and saved['server_name'] == SERVER_NAME
    assert saved['prefix'] == PREFIX and saved['device_id'] == 'dev-1'
    assert saved['token'] in gw.tokens and saved['expires'] > time.time() + 3000
    assert saved['renew_after'] > time.time() + 1000
    assert (home / '.config/opencmg/client-state').read_text() == f'{state.resolve()}\n'

    req = [q for q in gw.requests if q['path'].endswith('/register')][-1]
    assert req['method'] == 'POST' and req['path'] == f'{PREFIX}/register'
    assert req['headers']['Authorization'] == f'Bearer {gw.bulk}'
    assert req['headers']['Content-Type'] == 'application/json'
    assert json.loads(req['body']) == {'name': 'laptop-7'}
    assert req['headers']['Host'] == f'{SERVER_NAME}:{gw.port}'
    assert req['peer'] == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    for out in (r.stdout, r.stderr):
        assert gw.bulk not in out and saved['token'] not in out


def test_register_token_sources_and_prefix(gw, certs, tmp_path):
    state = tmp_path / 'st'
    trust_device(gw, state)
    tok = tmp_path / 'bulk.jwt'
    tok.write_text(f'\n  {gw.bulk}\n')
    r = register(gw, certs, state, token=f'@{tok}')
    assert r.returncode == 0, r.stderr
    r = register(gw, certs, state, token='-', input=gw.bulk + '\n')
    assert r.returncode == 0, r.stderr
    assert gw.names[0] == socket.gethostname()[:64]     # the default device name

    # --prefix wins over the token's cmg_reg; a token without one is fine then
    gw.bulk = bulk_token(reg=None, use=None)
    r = register(gw, certs, state, '--prefix', PREFIX + '/')
    assert r.returncode == 0, r.stderr
    r = register(gw, certs, state, '--prefix', '/CCM_Proxy_ServerAuth/OTHER')
    assert r.returncode == 1 and '404 CMGService_No_Mapping' in r.stderr
    r = register(gw, certs, state, token=f'@{tmp_path}/missing')
    assert r.returncode == 2 and 'cannot open' in r.stderr


def registered(gw, certs, tmp_path, renew_in=1800):
    state = tmp_path / 'state'
    trust_device(gw, state)
    gw.renew_in = renew_in
    r = register(gw, certs, state, '--name', 'dev')
    assert r.returncode == 0, r.stderr
    return state


def saved(state):
    return json.loads((state / 'device.json').read_text())


def test_get_with_token(gw, certs, tmp_path):
    state = registered(gw, certs, tmp_path)
    token = saved(state)['token']
    r = run('client', 'get', f'{PREFIX}/sms_mp/echo', '--state', state)
    assert r.returncode == 0, r.stderr
    echo = json.loads(r.stdout)
    assert echo['headers']['Authorization'] == f'Bearer {token}'
    assert echo['headers']['Host'] == f'{SERVER_NAME}:{gw.port}'
    assert token not in r.stderr
    # an Authorization header of one's own replaces the token
    r = run('client', 'get', '/svc/echo', '--state', state, '-H', 'authorization: Bearer other')
    assert json.loads(r.stdout)['headers']['authorization'] == 'Bearer other'
    assert 'Authorization' not in json.loads(r.stdout)['headers']
    # another address for the same gateway: the registered server name still applies
    r = run('client', 'get', '/svc/echo', '--state', state, '--gateway', f'localhost:{gw.port}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['headers']['Host'] == f'{SERVER_NAME}:{gw.port}'
    r = run('client', 'get', '/svc/echo', '--state', state, '--ca', certs['other_ca'])
    assert r.returncode == 3 and 'certificate verify failed' in r.stderr
    # big bodies stream to a file
    out = tmp_path / 'big'
    r = run('client', 'get', '/svc/big?n=5000000', '--state', state, '-o', out)
    assert r.returncode == 0 and out.read_bytes() == pattern(5000000)


def test_state_dir_resolution(gw, certs, tmp_path):
    home = tmp_path / 'home'
    env = {'HOME': str(home), 'CMG_CLIENT_STATE': ''}
    state = tmp_path / 'state'
    trust_device(gw, state)
    r = register(gw, certs, state, env=env)
    assert r.returncode == 0, r.stderr
    # the recorded directory
    r = run('client', 'get', '/svc/hello', env=env)
    assert (r.returncode, r.stdout) == (0, 'hello\n'), r.stderr
    # $CMG_CLIENT_STATE wins over it
    r = run('client', 'get', '/svc/hello', env=dict(env, CMG_CLIENT_STATE=str(tmp_path / 'none')))
    assert r.returncode == 1 and str(tmp_path / 'none') in r.stderr
    # the default when nothing is recorded
    (home / '.config/opencmg/client-state').unlink()
    r = run('client', 'get', '/svc/hello', env=env)
    assert r.returncode == 1 and str(home / '.config/opencmg/client/device.json') in r.stderr


def test_get_renews_when_due(gw, certs, tmp_path):
    state = registered(gw, certs, tmp_path, renew_in=-10)
    old = saved(state)['token']
    r = run('client', 'get', '/svc/echo', '--state', state)
    assert r.returncode == 0, r.stderr
    new = saved(state)['token']
    assert new != old and gw.tokens[new] == 'dev-1'
    assert json.loads(r.stdout)['headers']['Authorization'] == f'Bearer {new}'
    renew = [q for q in gw.requests if q['path'].endswith('/renew')]
    assert len(renew) == 1
    assert renew[0]['headers']['Authorization'] == f'Bearer {old}'
    assert renew[0]['body'] == b'{}'
    assert stat.S_IMODE((state / 'device.json').stat().st_mode) == 0o600

    # renewal refused while the token is still valid: a warning, and the request goes on
    gw.refuse_renew = 503
    r = run('client', 'get', '/svc/echo', '--state', state)
    assert r.returncode == 0, r.stderr
    assert 'warning: renewal refused: 503 CMGService_Unavailable' in r.stderr
    assert json.loads(r.stdout)['headers']['Authorization'] == f'Bearer {new}'

    # ... but not once it has expired
    s = saved(state)
    s['expires'] = int(time.time()) - 5
    (state / 'device.json').write_text(json.dumps(s))
    r = run('client', 'get', '/svc/echo', '--state', state)
    assert r.returncode == 1 and 'expired' in r.stderr and r.stdout == ''


def test_renew_command(gw, certs, tmp_path):
    state = registered(gw, certs, tmp_path)
    old = saved(state)['token']
    r = run('client', 'renew', '--state', state)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith('renewed device dev-1; token expires ')
    assert saved(state)['token'] != old
    gw.refuse_renew = 401
    r = run('client', 'renew', '--state', state)
    assert r.returncode == 1
    assert r.stderr.strip() == 'cmg client: renewal refused: 401 CMGService_Unavailable'
    gw.close()
    r = run('client', 'renew', '--state', state)
    assert r.returncode == 3 and f'connect {gw.addr}: Connection refused' in r.stderr


# ---------------------------------------------------------------- memory

@pytest.mark.skipif(SANITIZED or not shutil.which('valgrind'), reason='needs valgrind and a plain build')
def test_no_leaks_under_valgrind(gw, certs, tmp_path):
    state = registered(gw, certs, tmp_path, renew_in=-10)
    for path, status in (('/svc/hello', 0), ('/nothing', 1)):
        r = subprocess.run(['valgrind', '-q', '--leak-check=full', '--errors-for-leak-kinds=definite,indirect',
                            '--error-exitcode=99', CMG, 'client', 'get', path, '--state', state],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == status, r.stderr
