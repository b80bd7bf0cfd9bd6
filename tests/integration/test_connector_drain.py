"""Connector drain (issue 12, items 1 and 4). SIGTERM on `cmg connector`: every gateway is
told (a control message and HTTP/2's graceful GOAWAY) and picks it for no new request; its
requests in flight finish; then it exits 0. A request the gateway had already sent it is
refused unstarted (REFUSED_STREAM) and the gateway sends it to another connector whatever
its method, its body replayed whole. What is left after drain_timeout is cut: an error for
the device, never a short clean body. SIGQUIT stops at once.

Two connectors serve one role: A (connector-a, svc-a) and B (connector-b, svc-b). The
gateway picks their tunnels in turn, so downloads started one at a time with nothing else
going on land on A and B alternately."""
import json
import os
import re
import signal
import subprocess
import threading
import time
from hashlib import sha256

import pytest

from cmgtest import (SLOW, CurlProcess, InternalService, bring_up, curl, ini_set, poll, request,
                     start_connector)
from underload import Load

MiB = 1 << 20


def serving(procs, site, names):
    """Wait until requests reach the services of every named connector."""
    seen = set()
    poll(lambda: seen.add(request(site, 'GET', site.path('whoami')).body.decode()) or seen >= names,
         10 * SLOW, f'{sorted(names)} to serve', interval=0.02, check=procs.check)


def two_connectors(procs, site, svc, **gateway_conf):
    ini_set(site.connector_conf, 'connector', 'name', 'connector-a')
    ini_set(site.connector_conf, 'connector', 'drain_timeout', 60)     # longer than a download
    for key, value in gateway_conf.items():
        ini_set(site.gateway_conf, 'gateway', key, value)
    (gateway,), connector_a = bring_up(procs, site)
    svc_b = InternalService(procs, 'svc-b')
    conf_b = site.connector_copy('connector-b', [svc_b.url])
    connector_b = start_connector(procs, conf_b, 'connector-b')
    serving(procs, site, {'svc-a', 'svc-b'})
    return gateway, {'a': (connector_a, site.connector_conf, svc), 'b': (connector_b, conf_b, svc_b)}


def seen_paths(svcs):
    return [p for s in svcs for p in s.stats()['paths']]


def place_downloads(procs, site, load, svcs, seeds, size, rate):
    """Start one download per seed, each once the previous one reached a service: nothing
    else is asked meanwhile, so the gateway gives them to the connectors in turn."""
    for k, seed in enumerate(seeds):
        path = site.path(f'download?size={size}&seed={seed}')
        load.downloads.append((CurlProcess(site, path, '--limit-rate', rate,
                                           http='2' if k % 2 else '1.1'), seed))
        poll(lambda: any(f'seed={seed}' in p for p in seen_paths(svcs)), 10 * SLOW,
             f'download seed={seed} to start', check=procs.check)


def exit_status(proc, timeout):
    try:
        return proc.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f'{proc.name} still running {timeout} s after the signal') from None


def drain_one(procs, site, gateway, name, connector, svc, other_svc):
    """SIGTERM `connector` under load, with two of four downloads on it."""
    size, rate, seeds = 24 * MiB, '4M', [10 * ord(name) + k for k in range(4)]
    load = Load(site, downloads=0, download_size=size, rate=rate)
    place_downloads(procs, site, load, [svc, other_svc], seeds, size, rate)
    mine = [s for s in seeds if any(f'seed={s}' in p for p in svc.stats()['paths'])]
    assert len(mine) == 2, f'downloads on {svc.name}: {mine}'
    with load:
        time.sleep(0.5)
        connector.signal(signal.SIGTERM, wait=False)
        draining = poll(lambda: re.search(rf'connector=connector-{name} draining: no new requests; '
                                          r'(\d+) in flight', gateway.log_text()),
                        5 * SLOW, 'the gateway to log the drain', check=procs.check)
        told = time.monotonic()
        rc = exit_status(connector, 30 * SLOW)
        exited = time.monotonic()
        time.sleep(0.5)
    load.assert_clean()
    assert rc == 0, f'connector-{name} exited with {rc}'
    log = connector.log_text()
    assert int(draining.group(1)) >= 2, draining.group(0)
    assert len(re.findall(rf'connector=connector-{name} draining', gateway.log_text())) == 1
    over = re.search(r'drain over after ([\d.]+) s: (\d+) request\(s\) finished, (\d+) cut', log)
    assert over and int(over.group(2)) >= 2 and over.group(3) == '0', log[-2000:]
    # from the moment the gateway said so, nothing went to the draining connector
    late = [r for r in load.results if r[0] > told and r[3] in (b'svc-a', b'svc-b')]
    assert late and {r[3] for r in late} == {other_svc.name.encode()}, {r[3] for r in late}
    print(f'connector-{name}: drained in {over.group(1)} s ({over.group(2)} finished, exit '
          f'{exited - told:.2f} s after the gateway logged it); {load.summary()}')


def test_rolling_restart_of_connectors(procs, site, svc):
    gateway, connectors = two_connectors(procs, site, svc)
    for name, other in (('a', 'b'), ('b', 'a')):
        connector, conf, my_svc = connectors[name]
        drain_one(procs, site, gateway, name, connector, my_svc, connectors[other][2])
        connectors[name] = (start_connector(procs, conf, f'connector-{name}'), conf, my_svc)
        serving(procs, site, {'svc-a', 'svc-b'})


def unread_bytes(pid, remote_port):
    """Bytes waiting unread in pid's TCP sockets to 127.0.0.1:remote_port (/proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f'/proc/{pid}/fd'):
        try:
            link = os.readlink(f'/proc/{pid}/fd/{fd}')
        except OSError:
            continue
        if link.startswith('socket:['):
            inodes.add(link[8:-1])
    total = 0
    with open(f'/proc/{pid}/net/tcp') as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[9] in inodes and int(cols[2].split(':')[1], 16) == remote_port:
                total += int(cols[4].split(':')[1], 16)
    return total


@pytest.mark.parametrize('http', ['1.1', '2'])
def test_post_racing_the_drain_is_retried_once(procs, site, svc, http):
    """A POST the gateway sent to connector A just as A began to drain: A refuses it
    unstarted, the gateway sends it to B with its body whole, and only svc-b sees it.
    To make the race certain, A is frozen, told to drain (the signal waits), then sent
    the POST; it wakes to the signal first and the POST second."""
    gateway, connectors = two_connectors(procs, site, svc, ping_interval=60, stall_timeout=0)
    connector_a, _, _ = connectors['a']
    svc_b = connectors['b'][2]
    # the gateway alternates: after an answer from B, the next request goes to A
    poll(lambda: request(site, 'GET', site.path('whoami')).body == b'svc-b', 5 * SLOW, 'a turn of B')
    body = os.urandom(32 * 1024)   # within what the frozen connector's socket takes in
    answers = []
    os.kill(connector_a.pid, signal.SIGSTOP)
    try:
        connector_a.signal(signal.SIGTERM, wait=False)
        post = threading.Thread(target=lambda: answers.append(
            curl(site, site.path('upload'), '--data-binary', '@-', '-H', 'Expect:', http=http,
                 input=body)))
        post.start()
        poll(lambda: unread_bytes(connector_a.pid, site.tunnel_port) > len(body), 10 * SLOW,
             'the POST to reach the frozen connector A')
    finally:
        os.kill(connector_a.pid, signal.SIGCONT)
    post.join(30)
    assert answers and answers[0].rc == 0 and answers[0].status == 200, answers
    assert answers[0].version == http, answers
    assert json.loads(answers[0].body) == {'bytes': len(body), 'sha256': sha256(body).hexdigest()}
    assert exit_status(connector_a, 10 * SLOW) == 0
    assert not [p for p in svc.stats()['paths'] if 'upload' in p], svc.stats()['paths']
    assert [p for p in svc_b.stats()['paths'] if 'upload' in p] == ['/upload']
    assert re.search(r'POST \S+/upload retried on connector=connector-b: connector=connector-a '
                     r'refused it unstarted', gateway.log_text())
    assert re.search(r'drain over after [\d.]+ s: 0 request\(s\) finished, 0 cut, 1 refused',
                     connector_a.log_text()), connector_a.log_text()[-2000:]


def one_connector_downloading(procs, site, svc, drain_timeout=None):
    if drain_timeout is not None:
        ini_set(site.connector_conf, 'connector', 'drain_timeout', drain_timeout)
    (gateway,), connector = bring_up(procs, site)
    size = 16 * MiB
    downloads = [CurlProcess(site, site.path(f'download?size={size}&seed={k}'), '--limit-rate', '1M',
                             http=http) for k, http in enumerate(('1.1', '2'))]
    poll(lambda: all(d.received > 0 for d in downloads), 10 * SLOW, 'both downloads to begin',
         check=procs.check)
    return gateway, connector, downloads, size


def assert_cut(downloads, size):
    for d in downloads:
        r = d.wait(30)
        assert r.rc != 0 and d.received < size, f'a cut download ended cleanly: rc={r.rc}, {d.received} bytes'


def test_drain_timeout_cuts_what_is_left(procs, site, svc):
    gateway, connector, downloads, size = one_connector_downloading(procs, site, svc, drain_timeout=1)
    sent = time.monotonic()
    connector.signal(signal.SIGTERM, wait=False)
    assert exit_status(connector, 10 * SLOW) == 0
    took = time.monotonic() - sent
    assert_cut(downloads, size)
    log = connector.log_text()
    assert 'drain_timeout (1.0 s) reached with 2 request(s) in flight' in log, log[-2000:]
    assert len(re.findall(r'drain_timeout: cut GET \S+/download\?size=\d+&seed=\d \(gateway=\S+, '
                          r'response under way\)', log)) == 2, log[-2000:]
    assert re.search(r'drain over after [\d.]+ s: 0 request\(s\) finished, 2 cut', log)
    assert re.search(r'tunnel down: connector=connector-1 .*\(it was draining: requests still in '
                     r'flight are cut\)', gateway.log_text())
    assert took < 1 + 3 * SLOW, f'exited {took:.2f} s after SIGTERM with drain_timeout = 1'
    print(f'drain_timeout 1 s: exited {took:.2f} s after SIGTERM, both downloads cut')


def test_sigquit_stops_at_once(procs, site, svc):
    gateway, connector, downloads, size = one_connector_downloading(procs, site, svc)
    sent = time.monotonic()
    connector.signal(signal.SIGQUIT, wait=False)
    assert exit_status(connector, 5 * SLOW) == 0
    took = time.monotonic() - sent
    assert_cut(downloads, size)
    assert 'SIGQUIT received, stopping' in connector.log_text()
    assert 'draining' not in connector.log_text()
    assert took < 1 * SLOW, f'exited {took:.2f} s after SIGQUIT'


def test_sigint_drains_an_idle_connector_at_once(procs, site, gateway, connector):
    sent = time.monotonic()
    connector.signal(signal.SIGINT, wait=False)
    assert exit_status(connector, 5 * SLOW) == 0
    took = time.monotonic() - sent
    log = connector.log_text()
    assert 'SIGINT received: draining' in log
    assert re.search(r'draining: 1 of 1 tunnel\(s\) up, 0 request\(s\) in flight', log), log
    assert re.search(r'drain over after [\d.]+ s: 0 request\(s\) finished, 0 cut', log), log
    poll(lambda: re.search(r'tunnel down: connector=connector-1 .*\(it was draining: nothing cut\)',
                           gateway.log_text()), 5 * SLOW, 'the gateway to see the tunnel closed')
    assert 'connector=connector-1 draining: no new requests; 0 in flight' in gateway.log_text()
    assert took < 1 * SLOW, f'an idle connector took {took:.2f} s to drain'
    print(f'idle connector: SIGINT to exit {took:.3f} s')
