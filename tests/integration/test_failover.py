"""Fast failover (issue 12, item 4). Two connectors serve one role; one is frozen with
SIGSTOP, so its tunnel stays open but says nothing. With requests outstanding and nothing
heard for stall_timeout, the gateway pings; no answer within ping_timeout and the tunnel is
dead. Its requests that are safe to send again (an idempotent method, no response yet, the
body still whole) are retried once on the other connector; the others get 502.
ping_interval is left long, so the stall ping is what finds the frozen connector.

The gateway holds a response's head back until its first body byte (or its end), so a
connector stopped between a response's headers and its body leaves a request that is still
retried. Until the freeze the load is slow requests, so that the freeze finds requests in
flight on the frozen tunnel."""
import os
import re
import signal
import threading
import time

from cmgtest import SLOW, InternalService, bring_up, ini_set, poll, request, start_connector

STALL, PING = 1, 2
CLIENTS = 4


def frozen_site(procs, site, svc):
    ini_set(site.gateway_conf, 'gateway', 'stall_timeout', STALL)
    ini_set(site.gateway_conf, 'gateway', 'ping_timeout', PING)
    ini_set(site.gateway_conf, 'gateway', 'ping_interval', 60)
    (gateway,), _ = bring_up(procs, site)
    svc_b = InternalService(procs, 'svc-b')
    connector_b = start_connector(procs, site.connector_copy('connector-b', [svc_b.url]), 'connector-b')
    seen = set()
    poll(lambda: seen.add(request(site, 'GET', site.path('whoami')).body) or len(seen) == 2, 10 * SLOW,
         'both connectors to serve', interval=0.05, check=procs.check)
    return gateway, connector_b


def down_line(gateway):
    return re.search(r'tunnel down: connector=connector-b .*', gateway.log_text())


def test_frozen_connector_no_request_fails(procs, site, svc):
    gateway, connector_b = frozen_site(procs, site, svc)
    results, stop, frozen_at = [], threading.Event(), []

    def client(i):
        n = 0
        while not stop.is_set():
            # slow requests are in flight when the freeze comes; then quick ones too
            quick = frozen_at and (i + n) % 2
            path = site.path('whoami' if quick else f'delay?ms={200 + 50 * i}')
            started = time.monotonic()
            try:
                r = request(site, 'GET', path, timeout=30)
                results.append((started, time.monotonic(), r.status, r.body))
            except Exception as e:   # noqa: BLE001 (a cut response is a failure too)
                results.append((started, time.monotonic(), None, repr(e).encode()))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        frozen = time.monotonic()
        os.kill(connector_b.pid, signal.SIGSTOP)
        frozen_at.append(frozen)
        down = poll(lambda: down_line(gateway), (STALL + PING + 2) * SLOW,
                    'the frozen tunnel to be declared dead', interval=0.02, check=procs.check)
        dead_after = time.monotonic() - frozen
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(40)
        os.kill(connector_b.pid, signal.SIGCONT)

    failed = [r for r in results if r[2] != 200]
    assert not failed, f'{len(failed)} of {len(results)} requests failed: {failed[:5]}'
    assert 'no answer to the health ping' in down.group(0), down.group(0)
    assert dead_after < STALL + PING + 1.5 * SLOW, f'declared dead {dead_after:.2f} s after the freeze'
    retried = re.findall(r'retried on connector=(\S+) after tunnel to connector-b failed', gateway.log_text())
    assert retried and set(retried) != {'connector-b'}, retried
    # after the death, everything went to the connector left (svc-a)
    late = [r for r in results if r[0] > frozen + dead_after + 0.1]
    assert late and all(r[3] in (b'svc-a', b'late') for r in late)
    slowest = max(r[1] - r[0] for r in results if r[0] < frozen + dead_after)
    print(f'{len(results)} requests, none failed; tunnel declared dead {dead_after:.2f} s after the '
          f'freeze (stall_timeout {STALL} s + ping_timeout {PING} s); {len(retried)} retried on the '
          f'other connector; slowest around the freeze {slowest:.2f} s; {len(late)} after it')


def test_post_is_not_retried(procs, site, svc):
    """A POST may have reached the upstream server: its tunnel's failure is a 502."""
    gateway, connector_b = frozen_site(procs, site, svc)
    os.kill(connector_b.pid, signal.SIGSTOP)
    try:
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            request(site, 'POST', site.path('echo-headers'), body=b'x' * 100).status)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        os.kill(connector_b.pid, signal.SIGCONT)
    assert sorted(answers) == [200, 502], answers   # round-robin: one POST on each tunnel
    assert down_line(gateway) and 'retried' not in gateway.log_text()
