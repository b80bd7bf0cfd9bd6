"""What a device cannot make the internal service believe: identity and routing headers
in any spelling (case, '_' for '-', repeated) never reach it over HTTP/1.1 or HTTP/2, and
it sees exactly one value of each header the gateway vouches for; a device's Authorization
reaches it only where the mapping says so; paths that backends resolve elsewhere are
refused (400) or passed on in one canonical form. The internal service's request log
proves what was forwarded and what was not."""
import json
import socket

import h2.config
import h2.connection
import h2.events

from cmgtest import client_context, curl, poll, raw_exchange, SLOW
from sitetest import Deployment, Device

# Each forged name is sent as written, in upper and lower case, with '_' for '-' (and
# '-' for '_'), and twice: no spelling may reach the service.
FORGED = ['CMG_Client_Device_Id', 'cmg-client-auth', 'Cmg_Client_Subject', 'CMG-Client-User',
          'cmg-client-cert-thumbprint', 'CMG-Anything', 'X-Forwarded-Proto', 'X-Forwarded-For',
          'X-Forwarded-Host', 'Forwarded', 'X-Real-IP', 'X-Original-URL', 'X-Rewrite-URL',
          'X-Client-IP', 'X-Client-Cert']
# What the gateway sets itself for a certificate device: one value each.
VOUCHED = {'cmg-client-auth', 'cmg-client-device-id', 'cmg-client-cert-thumbprint',
           'cmg-client-subject', 'x-forwarded-for', 'x-forwarded-proto'}


def spellings(name):
    swapped = name.replace('-', '_') if '-' in name else name.replace('_', '-')
    return sorted({name, name.upper(), name.lower(), swapped, swapped.lower()})


def forged_headers():
    """Every spelling once, the name as written twice (the gateway takes 100 fields)."""
    return [(spelt, f'forged-{i}') for i, name in enumerate(FORGED)
            for spelt in spellings(name) + [name]]


def normal(name):
    return name.lower().replace('_', '-')


def gateway_only(name):
    n = normal(name)
    return (n.startswith(('cmg-', 'x-forwarded-', 'x-client-')) or
            n in ('forwarded', 'x-real-ip', 'x-original-url', 'x-rewrite-url'))


def h2_request(site, path, headers=(), cert=True):
    """One HTTP/2 GET with the path and header names exactly as given (the h2 library's
    own checks and normalisation off). Returns (status, body)."""
    ctx = client_context(site, alpn=('h2',)) if cert else client_context(site, cert=False, alpn=('h2',))
    sock = ctx.wrap_socket(socket.create_connection((site.addr, site.port), timeout=10 * SLOW),
                           server_hostname=site.name)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(':method', 'GET'), (':scheme', 'https'), (':authority', site.name),
                            (':path', path)] + [(k.lower(), v) for k, v in headers],
                      end_stream=True)
    sock.sendall(conn.data_to_send())
    status, body = None, b''
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b':status'])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(len(ev.data), sid)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return status, body
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return status, body


def h1_request(site, target, headers=()):
    """One HTTP/1.1 GET with the request target and header lines exactly as given."""
    head = f'GET {target} HTTP/1.1\r\nHost: {site.name}\r\n'
    head += ''.join(f'{k}: {v}\r\n' for k, v in headers)
    status, _, response = raw_exchange(site, (head + 'Connection: close\r\n\r\n').encode('latin-1'),
                                       wait_close=False)
    return status, response.split(b'\r\n\r\n', 1)[1]


def send(site, http, target, headers=()):
    return (h1_request if http == '1.1' else h2_request)(site, target, headers)


def seen_headers(body):
    seen = {}
    for k, v in json.loads(body)['headers']:
        seen.setdefault(normal(k), []).append(v)
    return seen


def test_forged_headers_never_reach_the_service(site, connector, svc):
    for http in ('1.1', '2'):
        before = svc.count
        status, body = send(site, http, site.path('echo-headers'),
                            forged_headers() + [('X-Device-Header', 'kept')])
        assert status == 200, (http, status, body)
        assert svc.count == before + 1
        seen = seen_headers(body)
        assert seen.get('x-device-header') == ['kept'], (http, seen)
        reaching = {k: v for k, v in seen.items() if gateway_only(k)}
        assert set(reaching) == VOUCHED, (http, reaching)
        assert all(len(v) == 1 and not v[0].startswith('forged') for v in reaching.values()), \
            (http, reaching)
        assert reaching['x-forwarded-for'] == ['127.0.0.1']
        assert reaching['x-forwarded-proto'] == ['https']
        assert reaching['cmg-client-auth'] == ['cert']
        assert reaching['cmg-client-device-id'] == ['cert:' + site.device_thumbprint()]


def test_paths_refused_or_made_canonical(site, connector, svc):
    prefix = site.prefix()
    refused = ['a/..;/echo-headers', 'a/..;x=1/echo-headers', 'a/.;/echo-headers',
               'a/%252e%252e/echo-headers', 'a/%25%32%65/echo-headers', '%c0%ae%c0%ae/echo-headers',
               'a/%e0%80%ae/echo-headers', 'a/%2e%2e/echo-headers', 'a/%2E/echo-headers',
               'echo-headers#x', 'a/..%5cecho-headers', 'a%5C..%5Cecho-headers',
               'a\\..\\echo-headers', 'a/./echo-headers', 'a/../echo-headers', 'a/..']
    canonical = {'//echo-headers': '/echo-headers',
                 'a//b///echo-headers?x=//y': '/a/b/echo-headers?x=//y',
                 '%65cho-headers?q=%2f': '/echo-headers?q=%2f',
                 'x/%c3%a9%e2%82%ac%3b': '/x/%C3%A9%E2%82%AC%3B',
                 'a;b=1/..c/...': '/a;b=1/..c/...'}
    for http in ('1.1', '2'):
        for rest in refused:
            before = svc.count
            status, body = send(site, http, f'{prefix}/{rest}')
            assert status == 400, (http, rest, status, body)
            if status == 400 and http == '1.1' and b'CMGService' in body:
                assert b'CMGService_Bad_Request_Path' in body, (rest, body)
            assert svc.count == before, (http, rest, 'was forwarded', svc.stats()['paths'][-1])
        for rest, want in canonical.items():
            before = svc.count
            status, body = send(site, http, f'{prefix}/{rest}')
            assert status in (200, 404), (http, rest, status, body)
            assert svc.count == before + 1
            assert svc.stats()['paths'][-1] == want, (http, rest)


def test_authorization_reaches_only_mappings_that_ask_for_it(procs, tmp_path, svc):
    dep = Deployment(procs, tmp_path, svc)
    device = Device(tmp_path, 'dev-auth')
    _, bulk = dep.bulk_token()
    dep.register(device, bulk)      # the registration service was given the bulk token
    listed = {m['role']: m for m in json.loads(dep.cmg_site('mapping', 'list', '--json').stdout)}
    assert listed[dep.site_role]['forward_authorization'] is True
    assert listed[dep.site.role_ids[0]]['forward_authorization'] is False

    for http in ('1.1', '2'):
        r = curl(dep.site, dep.token_path('echo-headers'), '-H',
                 f'Authorization: Bearer {device.token}', cert=device.cert, http=http)
        assert r.status == 200, r
        seen = seen_headers(r.body)
        assert 'authorization' not in seen, (http, seen)
        assert seen['cmg-client-device-id'] == [device.device_id]

    v = dep.policy_version()
    out = dep.cmg_site('mapping', 'add', '--type', 'mp', '--url', svc.url, '--role', 'withauth',
                       '--auth', 'token', '--forward-authorization').stdout
    assert 'Authorization forwarded' in out, out
    dep.wait_policy(after=v)
    path = '/CCM_Proxy_ServerAuth/withauth/echo-headers'
    r = poll(lambda: (lambda r: r if r.status == 200 else None)(
        curl(dep.site, path, '-H', f'Authorization: Bearer {device.token}', cert=device.cert)),
        5 * SLOW, 'the new mapping to serve')
    assert seen_headers(r.body)['authorization'] == [f'Bearer {device.token}']
