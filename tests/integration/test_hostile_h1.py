"""Hostile HTTP/1.1 devices cost a bounded time each, and nothing they send is forwarded.

The gateway runs with header_timeout = 2 s and idle_timeout = 4 s. While each attack runs, a
legitimate device keeps getting 200s, and the internal service's request count shows that
nothing from the attacker reached it:
- connections that send only CR/LF, stay silent after the TLS handshake, or trickle a head a
  byte at a time are closed by header_timeout (not idle_timeout);
- 1,000 slowloris connections (TLS, partial heads) are all closed by the deadline, with the
  legitimate device's p99 <= 1 s, the gateway's CPU well under a core and its RSS under
  128 MiB (only reported under ASan);
- a Content-Length over INT64_MAX gets 400 and one over max_body 413, nothing forwarded;
- a body over max_body gets 413 every time, 200 times in a row: with Content-Length (at once,
  never 100 Continue) or chunked, with and without Expect: 100-continue, and the device's
  writes of the rest of its body do not fail (the gateway reads and discards them for a
  bounded time before it closes)."""
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from cmgtest import (SANITIZED, SLOW, bring_up, ini_set, poll, read_response, request, tls_connect)
from internal_service import POLICY

HEADER_TIMEOUT, IDLE_TIMEOUT = 2, 4
MAX_BODY = 1000
TOO_LARGE = b'CMGService_Request_Too_Large'


@pytest.fixture
def hostile(procs, site):
    """Gateway (short header and idle timeouts, max_body = 1000) and connector, serving."""
    g = site.gateway_conf
    ini_set(g, 'gateway', 'header_timeout', HEADER_TIMEOUT)
    ini_set(g, 'gateway', 'idle_timeout', IDLE_TIMEOUT)
    ini_set(g, f'mapping {site.role_ids[0]}', 'max_body', MAX_BODY)
    gateways, _ = bring_up(procs, site)
    site.gateway_proc = gateways[0]
    return site


def head(site, path='policy.xml', method='GET', extra=''):
    return f'{method} {site.path(path)} HTTP/1.1\r\nHost: {site.name}\r\n{extra}\r\n'.encode()


# ---------------------------------------------------------------- 413, 200 times

def upload_head(site, extra):
    return (f'POST {site.path("upload")} HTTP/1.1\r\nHost: {site.name}\r\n'
            f'Content-Type: application/octet-stream\r\n{extra}\r\n').encode()


def body_over_limit(size=256 * 1024):
    return bytes(i % 251 for i in range(size))


BODY = body_over_limit()
CHUNKED_BODY = b''.join(b'%x\r\n' % len(BODY[i:i + 16384]) + BODY[i:i + 16384] + b'\r\n'
                        for i in range(0, len(BODY), 16384)) + b'0\r\n\r\n'


def read_status_line(sock):
    """The first response (interim or final) as (status, head, rest), status None if closed."""
    buf = b''
    while b'\r\n\r\n' not in buf:
        data = sock.recv(65536)
        if not data:
            return None, buf, b''
        buf += data
    first, rest = buf.split(b'\r\n\r\n', 1)
    return int(first.split(b' ', 2)[1]), first, rest


def upload_over_limit(site, chunked, expect):
    """A device uploading 256 KiB where max_body is 1000, as curl does: with Expect it waits
    for 100 Continue (a final answer ends it); then it sends its whole body, and only then
    reads the answer. Returns (statuses seen, whether a write failed)."""
    extra = 'Transfer-Encoding: chunked\r\n' if chunked else f'Content-Length: {len(BODY)}\r\n'
    if expect:
        extra += 'Expect: 100-continue\r\n'
    seen, write_failed = [], False
    with tls_connect(site, timeout=10 * SLOW) as sock:
        sock.sendall(upload_head(site, extra))
        if expect:
            status, _, rest = read_status_line(sock)
            seen.append(status)
            if status != 100:
                return seen, write_failed
        try:
            sock.sendall(CHUNKED_BODY if chunked else BODY)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as e:
            write_failed = repr(e)
        try:
            status, _, _ = read_response(sock)
        except (ConnectionResetError, ssl.SSLError):
            status = None
        seen.append(status)
    return seen, write_failed


def test_body_over_max_body_is_413_every_time(hostile, svc):
    site = hostile
    before = svc.stats()
    failures = []
    for i in range(200):
        for chunked in (False, True):
            for expect in (False, True):
                seen, write_failed = upload_over_limit(site, chunked, expect)
                if chunked and expect:
                    want = [100, 413]
                else:
                    want = [413]
                if seen != want or write_failed:
                    failures.append(f'round {i} chunked={chunked} expect={expect}: statuses {seen}'
                                    + (f', a write failed {write_failed}' if write_failed else ''))
    assert not failures, f'{len(failures)} of 800 uploads went wrong, e.g.: {failures[:5]}'
    after = svc.stats()
    assert after['answered'] == before['answered'], 'the service answered an upload over the limit'
    assert after['body_bytes'] - before['body_bytes'] <= 400 * MAX_BODY, 'more than max_body reached the service'
    r = request(site, 'GET', site.path('policy.xml'))
    assert (r.status, r.body) == (200, POLICY)
