"""Connection limits at the gateway's ports: per source address and in total on the
device port, unauthenticated handshakes on the tunnel port, and a descriptor limit that
the limits are fitted into. While an attacker fills them, a device that is already
served keeps being served, the gateway's log stays readable and its CPU is not pegged."""
import os
import socket
import ssl
import threading
import time

import cmgtest
from cmgtest import SLOW, ini_set, poll


def request_from(site, src, path, timeout=10):
    """One GET on a new connection made from source address src; returns the status."""
    sock = socket.create_connection((site.addr, site.port), timeout=timeout, source_address=(src, 0))
    with cmgtest.client_context(site).wrap_socket(sock, server_hostname=site.name) as s:
        s.sendall(f'GET {path} HTTP/1.1\r\nHost: {site.name}\r\n\r\n'.encode())
        status, _, _ = cmgtest.read_response(s)
        return status


def handshake_from(site, src, timeout=5):
    sock = socket.create_connection((site.addr, site.port), timeout=timeout, source_address=(src, 0))
    return cmgtest.client_context(site).wrap_socket(sock, server_hostname=site.name)


def refused(site, src):
    try:
        handshake_from(site, src).close()
        return False
    except (ConnectionError, ssl.SSLError, socket.timeout, OSError):
        return True


def cpu_seconds(pid):
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def test_per_source_limit(site, procs, svc):
    ini_set(site.gateway_conf, 'gateway', 'max_connections_per_source', 4)
    (gw,), _ = cmgtest.bring_up(procs, site)
    held = [handshake_from(site, '127.0.0.1') for _ in range(4)]
    try:
        assert refused(site, '127.0.0.1'), 'a fifth connection from 127.0.0.1 was accepted'
        # Another source is not affected.
        assert request_from(site, '127.0.0.2', site.path('policy.xml')) == 200
        before = svc.count
        held.pop().close()
        poll(lambda: not refused(site, '127.0.0.1'), 5, 'a slot for 127.0.0.1 after one closed')
        assert svc.count == before
    finally:
        for s in held:
            s.close()
    assert 'max_connections_per_source' in gw.log_text()


def test_max_connections_waits_in_queue(site, procs):
    ini_set(site.gateway_conf, 'gateway', 'max_connections', 3)
    (gw,), _ = cmgtest.bring_up(procs, site)
    poll(lambda: cmgtest.request(site, 'GET', site.path('policy.xml')).status == 200, 5,
         'the devices counted by start-up to be gone')
    held = [cmgtest.tls_connect(site) for _ in range(3)]
    result = {}

    def fourth():
        try:
            conn = cmgtest.DeviceConnection(site, timeout=20)
            conn.request('GET', site.path('policy.xml'))
            result['status'] = conn.getresponse().status
            conn.close()
        except Exception as e:   # reported by the assertion below
            result['error'] = repr(e)

    t = threading.Thread(target=fourth)
    t.start()
    try:
        time.sleep(1)
        assert not result, f'a fourth device was served past max_connections = 3: {result}'
        held.pop().close()
        t.join(10 * SLOW)
        assert result.get('status') == 200, result
    finally:
        for s in held:
            s.close()
        t.join()
    assert 'max_connections (3) reached' in gw.log_text()


def test_tunnel_port_flood_under_low_descriptor_limit(site, procs, svc):
    ini_set(site.gateway_conf, 'gateway', 'handshake_timeout', 2)
    gw = procs.start('gateway', ['prlimit', '--nofile=128:128', cmgtest.CMG, 'gateway', '-c',
                                 site.gateway_conf])
    poll(lambda: 'listening for connectors on' in gw.log_text(), 10 * SLOW, 'the gateway to start',
         check=procs.check)
    connector = cmgtest.start_connector(procs, site.connector_conf)
    cmgtest.wait_ready(procs, site)
    assert 'does not fit the descriptor limit (128' in gw.log_text()
    lines_before = len(gw.log_text().splitlines())

    stop = threading.Event()
    attackers = []
    opened = [0]

    def flood(n):
        # Bare TCP connections that never speak, from many source addresses.
        end = time.monotonic() + 3
        while not stop.is_set() and time.monotonic() < end and opened[0] < 20000:
            src = f'127.0.0.{10 + opened[0] % 40}'
            try:
                s = socket.create_connection(('127.0.0.1', site.tunnel_port), timeout=2,
                                             source_address=(src, 0))
                attackers.append(s)
                opened[0] += 1
            except OSError:
                time.sleep(0.001)
            if len(attackers) > 800:   # keep our own descriptors bounded
                attackers.pop(0).close()

    cpu0, t0 = cpu_seconds(gw.pid), time.monotonic()
    th = threading.Thread(target=flood, args=(0,))
    th.start()
    latencies = []
    try:
        while th.is_alive():
            start = time.monotonic()
            r = cmgtest.request(site, 'GET', site.path('policy.xml'), timeout=5)
            latencies.append(time.monotonic() - start)
            assert r.status == 200, r
            time.sleep(0.02)
    finally:
        stop.set()
        th.join()
    cpu = (cpu_seconds(gw.pid) - cpu0) / (time.monotonic() - t0)
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if len(latencies) > 1 else latencies[0]
    print(f'flood: {opened[0]} connections, gateway CPU {cpu:.0%} of a core, '
          f'{len(latencies)} device requests, p99 {p99 * 1000:.0f} ms')
    assert opened[0] > 200
    assert p99 <= 1.0 * SLOW
    if not cmgtest.SANITIZED:
        assert cpu < 0.8, f'the gateway used {cpu:.0%} of a core during the flood'
    log = gw.log_text().splitlines()[lines_before:]
    print(f"{len(log)} log lines"); assert len(log) < 120, f'{len(log)} log lines in 3 s of flood'
    assert any('max_tunnel_handshakes' in line for line in log)

    # The connections that were let in are closed by handshake_timeout.
    kept = attackers[-50:]
    for s in attackers[:-50]:
        s.close()
    time.sleep(2.5 * SLOW)
    closed = sum(cmgtest.peer_closed(s, wait=0.5) for s in kept)
    for s in kept:
        s.close()
    assert closed == len(kept), f'{len(kept) - closed} of {len(kept)} idle tunnel connections still open'
    # Connectors can still come in: a fresh one takes over from a restarted connector.
    connector.signal(15)
    cmgtest.start_connector(procs, site.connector_conf, name='connector-again')
    cmgtest.wait_ready(procs, site)
    assert gw.alive()


def test_refusal_lines_are_rate_limited(site, procs, svc):
    (gw,), _ = cmgtest.bring_up(procs, site)
    before = svc.count
    cmgtest.pipelined_404s(site)
    # The count of what was held back is written once the second is over, without
    # waiting for another refusal (the next log flush: the loop wakes at least for pings).
    def counted():
        lines = gw.log_text().splitlines()
        refused = sum('refused peer=' in line and 'path=/not-published ' in line for line in lines)
        held = sum(int(line.split(' more refused requests')[0].split()[-1])
                   for line in lines if 'more refused requests not logged' in line)
        return (refused, held) if held and refused + held == 300 else None
    refused, held = poll(counted, 5 * SLOW, 'lines and counts for all 300 refusals')
    # 100 a second (start-up's 503s may have taken some of the first second's)
    assert 0 < refused <= 201, refused
    assert svc.count == before
