"""Streams on one tunnel are independent, and a body never looks complete when it is not:
a device that reads slowly does not hold up others; a connector killed in the middle of a
download ends that download as an error (never a clean, complete-looking response), with a
502 in the gateway's log and 503 for new requests; a body over the mapping's max_body gets
413: with a Content-Length it reaches nobody; without one, its head may already be on its way,
but the internal service never gets more than max_body bytes nor a complete request."""
import hashlib
import json
import re
import signal
import threading
import time

import pytest

from cmgtest import (SLOW, CurlProcess, bring_up, curl, ini_set, poll, poll_request, raw_exchange, read_response,
                     request, tls_connect)
from internal_service import POLICY, blob, stream_sha256

MiB = 1 << 20


# ---------------------------------------------------------------- a slow device

class SlowReader:
    """An HTTP/1.1 device that reads its download a little at a time: 8 KiB every 50 ms."""

    def __init__(self, site, path):
        self.sock = tls_connect(site, timeout=30 * SLOW)
        self.sock.sendall(f'GET {path} HTTP/1.1\r\nHost: {site.name}\r\n\r\n'.encode())
        self.received, self.error = 0, None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            while not self.stop.is_set():
                data = self.sock.recv(8192)
                if not data:
                    self.error = 'closed by the gateway'
                    return
                self.received += len(data)
                time.sleep(0.05)
        except OSError as e:
            self.error = repr(e)

    def alive(self):
        return self.thread.is_alive()

    def close(self):
        self.stop.set()
        self.thread.join(10)
        self.sock.close()


class SlowCurl(CurlProcess):
    """An HTTP/2 device that reads slowly: curl --limit-rate (it reads in bursts, then pauses)."""

    def __init__(self, site, path):
        super().__init__(site, path, '--limit-rate', '200k', http='2', timeout=600)
        self.error = None

    def close(self):
        self.kill()


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_slow_device_does_not_stall_others(procs, site, gateway, connector, svc, http):
    size = 64 * MiB
    path = site.path(f'download?size={size}&seed=31')
    slow = SlowReader(site, path) if http == '1.1' else SlowCurl(site, path)
    try:
        poll(lambda: slow.received >= 64 * 1024, 10 * SLOW, 'the slow download to start', check=procs.check)
        # back-pressure: the service is soon blocked far ahead of what the slow device has read
        poll(lambda: svc.stats()['download_bytes'] > slow.received + MiB, 10 * SLOW,
             'the service to run ahead of the slow device', interval=0.1)

        started, slowest = time.monotonic(), 0.0
        for i in range(50):
            t0 = time.monotonic()
            if i % 10 == 9:             # now and then a download of several stream windows
                r = request(site, 'GET', site.path(f'download?size={4 * MiB}&seed={i}'), timeout=10 * SLOW)
                assert r.status == 200 and hashlib.sha256(r.body).hexdigest() == stream_sha256(4 * MiB, i), r
            else:
                r = request(site, 'GET', site.path(f'blob/slow-{i}'), timeout=10 * SLOW)
                assert (r.status, r.body) == (200, blob(f'slow-{i}')), r
            slowest = max(slowest, time.monotonic() - t0)
        elapsed = time.monotonic() - started
        print(f'50 requests beside a slow device in {elapsed:.2f} s (slowest {slowest:.2f} s); '
              f'the slow device has {slow.received / MiB:.2f} MiB')
        assert slowest < 2 * SLOW, f'a request took {slowest:.1f} s beside the slow device'
        assert elapsed < 8 * SLOW, f'50 requests took {elapsed:.1f} s beside the slow device'

        # the slow download is still there, and still moving
        assert slow.alive() and not slow.error, f'the slow download ended: {slow.error}'
        got = slow.received
        assert got < size
        poll(lambda: slow.received > got, 10 * SLOW, 'the slow download to keep going', interval=0.05)
    finally:
        slow.close()


# ---------------------------------------------------------------- connector killed mid-download

@pytest.mark.parametrize('http,chunked', [('1.1', False), ('1.1', True), ('2', False)],
                         ids=['http1.1-content-length', 'http1.1-chunked', 'http2'])
def test_connector_killed_mid_download_is_an_error_not_a_short_body(procs, site, gateway, connector, http,
                                                                       chunked):
    size = 256 * MiB
    path = site.path(f'download?size={size}&seed=32' + ('&chunked=1' if chunked else ''))
    dl = CurlProcess(site, path, '--limit-rate', '8M', http=http, timeout=120)
    try:
        poll(lambda: dl.received >= 2 * MiB, 20 * SLOW, 'the download to be under way', check=procs.check)
        connector.signal(signal.SIGKILL)
        killed = time.monotonic()
        r = dl.wait(timeout=10 * SLOW)
        ended = time.monotonic() - killed
    finally:
        dl.kill()
    print(f'curl ended {ended:.2f} s after the kill, {dl.received / MiB:.1f} MiB received: rc {r.rc}')
    assert dl.received < size
    assert r.rc not in (0, 28), f'the cut-short download looked complete (or hung): {r}'
    assert ended < 3 * SLOW, f'the device learnt of it only after {ended:.1f} s'
    poll(lambda: re.search(rf'request .*path={re.escape(path)} status=502\b', gateway.log_text()), 2 * SLOW,
         'the gateway to log a 502 for the download', check=procs.check)

    poll_request(procs, site, site.path('policy.xml'), lambda r: r.status == 503, 1.0 * SLOW,
                 '503 once the only connector is gone')


# ---------------------------------------------------------------- max_body

MAX_BODY = 1000
TOO_LARGE = b'CMGService_Request_Too_Large'


@pytest.fixture
def limited(procs, site):
    """The site's role with max_body = 1000, gateway and connector serving."""
    ini_set(site.gateway_conf, f'mapping {site.role_ids[0]}', 'max_body', MAX_BODY)
    bring_up(procs, site)
    return site


def upload_body(n):
    return bytes(i % 251 for i in range(n))


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_body_at_max_body_passes(limited, svc, tmp_path, http):
    body = tmp_path / 'body'
    body.write_bytes(upload_body(MAX_BODY))
    for how in (['--data-binary', f'@{body}'], ['-T', '-']):     # Content-Length; chunked (HTTP/2: neither)
        r = curl(limited, limited.path('upload'), *how, http=http, input=body.read_bytes())
        assert (r.rc, r.status) == (0, 200), r
        assert json.loads(r.body) == {'bytes': MAX_BODY, 'sha256': hashlib.sha256(upload_body(MAX_BODY)).hexdigest()}


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_body_over_max_body_with_content_length_is_413_and_not_forwarded(limited, svc, tmp_path, http):
    body = tmp_path / 'body'
    before = svc.stats()
    for n in (MAX_BODY + 1, 64 * 1024):
        body.write_bytes(upload_body(n))
        r = curl(limited, limited.path('upload'), '--data-binary', f'@{body}', http=http)
        assert r.status == 413 and TOO_LARGE in r.body, r
    after = svc.stats()
    assert after['requests'] == before['requests'], f'the service saw: {after["paths"][-2:]}'
    r = request(limited, 'GET', limited.path('policy.xml'))
    assert (r.status, r.body) == (200, POLICY), 'the gateway stopped serving'


def chunked_head(site, path='upload'):
    return (f'POST {site.path(path)} HTTP/1.1\r\nHost: {site.name}\r\nTransfer-Encoding: chunked\r\n'
            'Content-Type: application/octet-stream\r\n\r\n').encode()


def chunk(data):
    return b'%x\r\n' % len(data) + data + b'\r\n'


def test_chunked_body_over_max_body_in_one_piece_is_413_and_not_forwarded(limited, svc):
    """Head and whole body in one write: the gateway sees the excess before anything leaves."""
    before = svc.count
    status, closed, response = raw_exchange(limited, chunked_head(limited) + chunk(upload_body(MAX_BODY + 1))
                                            + b'0\r\n\r\n')
    assert status == 413 and TOO_LARGE in response, response
    assert closed, 'the connection stayed open after a refused body'
    assert svc.count == before, 'the request was forwarded'


def send_streamed_chunked(site, total, pause=0.3):
    """A device streaming a chunked body: the head, a pause, then 100-byte chunks up to
    `total` bytes. Returns (status, response)."""
    with tls_connect(site) as sock:
        sock.sendall(chunked_head(site))
        time.sleep(pause)
        try:
            for _ in range(0, total, 100):
                sock.sendall(chunk(b'x' * 100))
                time.sleep(0.005)
            sock.sendall(b'0\r\n\r\n')
        except OSError:
            pass                        # the gateway may close as soon as it has answered
        status, _, response = read_response(sock)
        return status, response


@pytest.mark.parametrize('via', ['curl-http1.1', 'curl-http2', 'raw-http1.1'])
def test_body_without_length_over_max_body_is_413_and_never_completes(limited, svc, via):
    """A body without Content-Length (chunked; over HTTP/2, DATA frames without
    content-length) may have its head forwarded before the body arrives: the gateway answers
    413 once the total is over max_body; no more than max_body bytes reach the internal
    service, which never gets a complete request (it never answers one)."""
    before = svc.stats()
    if via.startswith('curl'):
        r = curl(limited, limited.path('upload'), '-T', '-', input=upload_body(64 * 1024), http=via.split('http')[1])
        status, response = r.status, r.body
    else:
        status, response = send_streamed_chunked(limited, MAX_BODY + 300)
    assert status == 413 and TOO_LARGE in response, response
    time.sleep(0.3)
    after = svc.stats()
    assert after['answered'] == before['answered'], 'the service got a complete request and answered it'
    assert after['body_bytes'] - before['body_bytes'] <= MAX_BODY, 'more than max_body reached the service'
    r = request(limited, 'GET', limited.path('policy.xml'))
    assert (r.status, r.body) == (200, POLICY), 'the gateway stopped serving'
