"""A stand-in for an internal management service (MP, SUP, ...), behind the connector.

Run as a script: `/usr/bin/python3 internal_service.py --name svc-a` binds 127.0.0.1 on a
free port, prints `PORT <n>` on stdout and serves until killed. Import it for the content
generators, so tests know what the bytes must be.

Endpoints (anything but /__stats counts as a request the service "saw"):
  GET  /policy.xml                   POLICY, fixed bytes
  GET  /download?size=N[&seed=S][&chunked=1]
                                     N deterministic bytes (stream()), streamed, never held whole
  POST|PUT /upload                   body (Content-Length or chunked) -> {"bytes", "sha256"}
  ANY  /echo-headers                 {"method", "path", "headers": [[name, value], ...], "client"}
  GET  /whoami                       the service's --name
  GET  /blob/<key>                   blob(key): a small body that depends on the key
  GET  /delay?ms=N                   answers "late" after N ms (for requests in flight)
  GET  /__stats                      {"requests": n, "paths": [...], "download_bytes": n,
                                      "body_bytes": n, "answered": n}, not counted
                                     (requests: heads seen; body_bytes: request body bytes
                                     read; answered: responses begun, all but /__stats)
"""
import argparse
import hashlib
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

POLICY = (b'<?xml version="1.0" encoding="utf-8"?>\r\n'
          b'<Policy id="{9a8c3e1f-OpenCMG-test}" version="42">\r\n'
          + b''.join(b'  <Rule n="%d" v="%s"/>\r\n' % (i, hashlib.sha256(b'%d' % i).hexdigest().encode())
                     for i in range(64))
          + b'  <Bytes>\x00\x01\xfe\xff\xc3\xa9</Bytes>\r\n</Policy>\r\n')

BLOCK = 1 << 20


def stream(size, seed=0):
    """Yield `size` deterministic bytes in blocks of about 1 MiB. Every block differs at every
    offset (index prefix + rotation of one random block), so lost, repeated or reordered
    pieces change the SHA-256; generating costs a memcpy per block."""
    base = random.Random(seed).randbytes(BLOCK)
    i = 0
    while size > 0:
        k = (i * 104729 + 7) % BLOCK
        block = i.to_bytes(8, 'big') + base[k:] + base[:k]
        yield block[:size]
        size -= len(block)
        i += 1


def stream_sha256(size, seed=0):
    h = hashlib.sha256()
    for block in stream(size, seed):
        h.update(block)
    return h.hexdigest()


def blob(key):
    """A body of 200..4295 bytes derived from `key`: a response swapped between two requests
    shows as a mismatch."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    n = 200 + int(digest[:4], 16) % 4096
    return (f'{key}\n' + digest * (n // 64 + 1)).encode()[:n]


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'internal-service/1'

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError):
            pass                        # the connector went away; nothing to tell

    def log_message(self, fmt, *args):
        sys.stderr.write('%s %s\n' % (self.server.name, fmt % args))

    # -- request body, whatever its framing
    def body_chunks(self):
        te = self.headers.get('Transfer-Encoding', '')
        if 'chunked' in te.lower():
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionError('body truncated')
                size = int(line.split(b';')[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass  # trailers
                    return
                while size > 0:
                    data = self.rfile.read(min(size, 1 << 16))
                    if not data:
                        raise ConnectionError('body truncated')
                    size -= len(data)
                    self.count_body(data)
                    yield data
                self.rfile.readline()
        else:
            left = int(self.headers.get('Content-Length', '0'))
            while left > 0:
                data = self.rfile.read(min(left, 1 << 16))
                if not data:
                    raise ConnectionError('body truncated')
                left -= len(data)
                self.count_body(data)
                yield data

    def count_body(self, data):
        with self.server.lock:
            self.server.body_bytes += len(data)

    def reply(self, status, body, ctype='application/octet-stream'):
        if self.path != '/__stats':
            with self.server.lock:
                self.server.answered += 1
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def reply_json(self, obj):
        self.reply(200, json.dumps(obj).encode(), 'application/json')

    def handle_one(self):
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == '/__stats':
            with self.server.lock:
                return self.reply_json({'requests': self.server.count, 'paths': self.server.paths,
                                        'download_bytes': self.server.download_bytes,
                                        'body_bytes': self.server.body_bytes,
                                        'answered': self.server.answered})
        with self.server.lock:
            self.server.count += 1
            self.server.paths = (self.server.paths + [self.path])[-200:]

        if url.path == '/upload' and self.command in ('POST', 'PUT'):
            h, n = hashlib.sha256(), 0
            for data in self.body_chunks():
                h.update(data)
                n += len(data)
            return self.reply_json({'bytes': n, 'sha256': h.hexdigest()})
        received = sum(len(d) for d in self.body_chunks())
        if url.path == '/echo-headers':
            return self.reply_json({'method': self.command, 'path': self.path,
                                    'headers': [[k, v] for k, v in self.headers.items()],
                                    'client': self.client_address[0], 'body_bytes': received})
        if url.path == '/policy.xml':
            return self.reply(200, POLICY, 'text/xml')
        if url.path == '/whoami':
            return self.reply(200, self.server.name.encode(), 'text/plain')
        if url.path.startswith('/blob/'):
            return self.reply(200, blob(url.path[len('/blob/'):]))
        if url.path == '/delay':
            time.sleep(int(query.get('ms', '1000')) / 1000)
            return self.reply(200, b'late', 'text/plain')
        if url.path == '/download':
            return self.download(int(query['size']), int(query.get('seed', '0')),
                                 query.get('chunked') == '1')
        self.reply(404, b'internal-service: no such path\n', 'text/plain')

    def download(self, size, seed, chunked):
        with self.server.lock:
            self.server.answered += 1
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if chunked:
            self.send_header('Transfer-Encoding', 'chunked')
        else:
            self.send_header('Content-Length', str(size))
        self.end_headers()
        for block in stream(size, seed):
            if chunked:
                self.wfile.write(b'%x\r\n' % len(block) + block + b'\r\n')
            else:
                self.wfile.write(block)
            with self.server.lock:
                self.server.download_bytes += len(block)
        if chunked:
            self.wfile.write(b'0\r\n\r\n')

    def do_any(self):
        try:
            self.handle_one()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = do_any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, name, port=0):
        super().__init__(('127.0.0.1', port), Handler)
        self.name, self.count, self.paths, self.lock = name, 0, [], threading.Lock()
        self.download_bytes = 0         # body bytes of /download written so far, all requests
        self.body_bytes = 0             # request body bytes read so far, all requests
        self.answered = 0               # responses begun


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--name', default='internal')
    ap.add_argument('--port', type=int, default=0)
    args = ap.parse_args()
    server = Server(args.name, args.port)
    print('PORT %d' % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == '__main__':
    main()
