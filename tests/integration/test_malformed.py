"""Malformed HTTP/1.1 from a device that has a valid certificate: 400 (431 for headers over
max_header_size), the connection closed where the framing is in doubt, nothing forwarded,
and the gateway goes on serving other connections and new ones.

{P} is the published prefix of the role (/CCM_Proxy_MutualAuth/<id>), {H} the service name."""
import pytest

from cmgtest import DeviceConnection, raw_exchange, request
from internal_service import POLICY

GET = b'GET {P}/policy.xml HTTP/1.1\r\nHost: {H}\r\n'
POST = b'POST {P}/upload HTTP/1.1\r\nHost: {H}\r\n'
CLOSE, ANY = True, None   # must the gateway close the connection afterwards?

CASES = [  # name, raw request, expected status, closed afterwards
    ('bad request line',        b'GARBAGE\r\n\r\n',                                                     400, CLOSE),
    ('no HTTP version',         b'GET {P}/policy.xml\r\nHost: {H}\r\n\r\n',                             400, CLOSE),
    ('bad HTTP version',        b'GET {P}/policy.xml HTTP/1.x\r\nHost: {H}\r\n\r\n',                    400, CLOSE),
    ('CL and TE together',      POST + b'Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n', 400, CLOSE),
    ('TE and CL together',      POST + b'Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n', 400, CLOSE),
    ('two Content-Lengths',     POST + b'Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!',         400, CLOSE),
    ('Content-Length list',     POST + b'Content-Length: 5, 6\r\n\r\nhello!',                           400, CLOSE),
    ('Content-Length not a number', POST + b'Content-Length: 5x\r\n\r\nhello',                          400, CLOSE),
    ('header over the limit',   GET + b'X-Big: ' + b'a' * 20000 + b'\r\n\r\n',                          431, CLOSE),
    ('headers over the limit',  GET + b''.join(b'X-H%04d: %s\r\n' % (i, b'v' * 20) for i in range(1000)) + b'\r\n', 431, CLOSE),
    ('.. in the path',          b'GET {P}/../{R}/policy.xml HTTP/1.1\r\nHost: {H}\r\n\r\n',             400, ANY),
    ('.. out of the role',      b'GET {P}/a/../../other/policy.xml HTTP/1.1\r\nHost: {H}\r\n\r\n',     400, ANY),
    ('%2e%2e in the path',      b'GET {P}/%2e%2e/{R}/policy.xml HTTP/1.1\r\nHost: {H}\r\n\r\n',         400, ANY),
    ('%2E%2E in the path',      b'GET {P}/a/%2E%2E/policy.xml HTTP/1.1\r\nHost: {H}\r\n\r\n',           400, ANY),
    ('.%2e in the path',        b'GET {P}/a/.%2e/policy.xml HTTP/1.1\r\nHost: {H}\r\n\r\n',             400, ANY),
    ('NUL in the path',         b'GET {P}/po\x00licy.xml HTTP/1.1\r\nHost: {H}\r\n\r\n',                400, CLOSE),
    ('NUL in a header value',   GET + b'X-A: a\x00b\r\n\r\n',                                           400, CLOSE),
    ('NUL in a header name',    GET + b'X-\x00A: b\r\n\r\n',                                            400, CLOSE),
    ('obs-fold header line',    GET + b'X-A: a\r\n  folded\r\n\r\n',                                    400, CLOSE),
    ('space before colon',      GET + b'X-A : b\r\n\r\n',                                               400, CLOSE),
    ('two Host headers',        GET + b'Host: other.test\r\n\r\n',                                      400, ANY),
]


@pytest.mark.parametrize('raw, status, closed', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_request(site, connector, svc, raw, status, closed):
    other = DeviceConnection(site)           # a device already connected, kept alive
    other.request('GET', site.path('policy.xml'))
    assert other.getresponse().read() == POLICY
    before = svc.count

    data = (raw.replace(b'{P}', site.prefix().encode()).replace(b'{R}', site.role_ids[0].encode())
            .replace(b'{H}', site.name.encode()))
    got, was_closed, response = raw_exchange(site, data, wait_close=bool(closed))
    assert got == status, f'answer: {response[:300]!r}'
    if closed:
        assert was_closed, 'the connection stayed open though the framing was in doubt'
    assert svc.count == before, 'the request was forwarded'

    other.request('GET', site.path('policy.xml'))
    r = other.getresponse()
    assert (r.status, r.read()) == (200, POLICY)
    other.close()
    r = request(site, 'GET', site.path('policy.xml'))
    assert (r.status, r.body) == (200, POLICY)
