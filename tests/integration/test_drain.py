"""Zero-downtime gateway (issue 12, items 1 and 2): SIGTERM drains an instance, and an
instance joins the shared device port only once it can serve.

Drain: the instance leaves the device port (what is queued is accepted, then the listeners
close; net.ipv4.tcp_migrate_req moves what arrives meanwhile to the other instances), HTTP/2
devices get a GOAWAY notice then the final GOAWAY naming the last stream taken, HTTP/1.1
devices `Connection: close` on their next answer (idle kept-alive ones are closed at once),
requests in flight have drain_timeout to finish, then are cut; the process exits 0 once
nothing is left. SIGQUIT (or a second SIGTERM) stops at once.

Ready: the device port opens once a policy is in force and a tunnel is ready, or after
ready_timeout; a rolling restart of two instances under the acceptance load (underload.Load)
fails no request, breaks no download and answers no 503."""
import os
import re
import shutil
import signal
import socket
import ssl
import tempfile
import time
from pathlib import Path

import pytest

import h2.config
import h2.connection
import h2.events

from cmgtest import (CMG, SLOW, CurlProcess, Site, bring_up, client_context, ini_set, poll, read_response,
                     request, start_connector, start_gateway, tls_connect)
from underload import MiB, Load

MIGRATE_SYSCTL = Path('/proc/sys/net/ipv4/tcp_migrate_req')


def joined(proc):
    return re.search(r'joining the device port.*', proc.log_text())


def drain_end(proc):
    return re.search(r'drain over in ([\d.]+) s: (\d+) request\(s\) finished, (\d+) cut', proc.log_text())


def access_lines(proc, status):
    return re.findall(rf'^.*\brequest peer=.*\bstatus={status}\b.*$', proc.log_text(), re.M)


def stop_and_wait(proc, sig, timeout):
    """Send sig; return (exit status, seconds until the exit)."""
    proc.expected_exit = True
    started = time.monotonic()
    proc.popen.send_signal(sig)
    rc = proc.popen.wait(timeout=timeout)
    return rc, time.monotonic() - started


def download_path(site, size, seed=7):
    return site.path(f'download?size={size}&seed={seed}')


# ---------------------------------------------------------------- the rolling restart

def test_rolling_restart_of_two_instances_under_load(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs, instances=2)
    ini_set(site.gateway_conf, 'gateway', 'drain_timeout', 60)     # longer than a download
    gws, connector = bring_up(procs, site, instances=2)
    for gw in gws:
        poll(lambda: joined(gw), 10 * SLOW, 'both instances to join the device port', check=procs.check)
    if MIGRATE_SYSCTL.exists():
        assert MIGRATE_SYSCTL.read_text().strip() == '1', 'the gateways (root) set tcp_migrate_req'

    for i in (0, 1):    # a load for each restart: downloads in flight on the instance that drains
        load = Load(site, download_size=16 * MiB, rate='2M')     # more than the socket buffers hold
        with load:
            time.sleep(1)
            rc, took = stop_and_wait(gws[i], signal.SIGTERM, 60 * SLOW)
            assert rc == 0, f'instance {i} exited with {rc} after its drain'
            end = drain_end(gws[i])
            assert end and end.group(3) == '0', f'instance {i}: {end and end.group(0)}'
            print(f'instance {i} drained in {took:.2f} s: {end.group(0)}')
            started = time.monotonic()
            gws[i] = start_gateway(procs, site, i)
            line = poll(lambda: joined(gws[i]), 10 * SLOW, f'instance {i} to join again',
                        check=procs.check).group(0)
            assert re.match(r'joining the device port: policy version \d+, 1 tunnel$', line), line
            print(f'instance {i} joined {time.monotonic() - started:.2f} s after its start')
            time.sleep(1.5)                # the load reaches the restarted instance
        print(load.summary())
        load.assert_clean()
    for gw in gws:                      # the restarted instances answered, and never 503
        assert access_lines(gw, 200), f'{gw.name} answered nothing after its restart'
        assert not access_lines(gw, 503), access_lines(gw, 503)[:3]
        print(f'{gw.name} (restarted): {len(access_lines(gw, 200))} answers, peak RSS {gw.peak_rss_kib()} KiB')
    assert connector.alive()


# ---------------------------------------------------------------- what devices see

class H2Device:
    """An HTTP/2 device over TLS. GOAWAY frames are taken out of what the h2 library reads
    (it closes its connection state at the first one and would then refuse the streams in
    flight, which a GOAWAY lets finish) and kept in `goaways` as last-stream ids."""

    def __init__(self, site):
        ctx = client_context(site, alpn=('h2',))
        self.sock = ctx.wrap_socket(socket.create_connection((site.addr, site.port), timeout=10 * SLOW),
                                    server_hostname=site.name)
        self.site = site
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.buf, self.goaways, self.pings = b'', [], 0
        self.status, self.body, self.ended, self.closed = {}, {}, set(), False

    def get(self, path):
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(':method', 'GET'), (':scheme', 'https'),
                                     (':authority', self.site.name), (':path', path)], end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        self.body[sid] = b''
        return sid

    def _frames(self, data):
        """What h2 may read of data: whole frames, GOAWAY taken out."""
        self.buf += data
        out = b''
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], 'big')
            if len(self.buf) < 9 + length:
                break
            frame, self.buf = self.buf[:9 + length], self.buf[9 + length:]
            if frame[3] == 7:           # GOAWAY: last-stream id, error code
                self.goaways.append((int.from_bytes(frame[9:13], 'big') & 0x7fffffff,
                                     int.from_bytes(frame[13:17], 'big')))
            else:
                out += frame
        return out

    def pump(self, until, timeout):
        """Read and handle frames until until() holds or the connection closes."""
        deadline = time.monotonic() + timeout
        while not until() and not self.closed:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (ConnectionError, ssl.SSLError):
                data = b''
            except socket.timeout:
                raise AssertionError(f'timed out: goaways={self.goaways} status={self.status}')
            if not data:
                self.closed = True
                break
            for ev in self.conn.receive_data(self._frames(data)):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[b':status'])
                elif isinstance(ev, h2.events.DataReceived):
                    self.body[ev.stream_id] += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.PingReceived):
                    self.pings += 1
                elif isinstance(ev, h2.events.StreamReset):
                    raise AssertionError(f'stream {ev.stream_id} reset ({ev.error_code})')
            out = self.conn.data_to_send()
            if out:
                self.sock.sendall(out)

    def close(self):
        self.sock.close()


def test_drain_goaway_connection_close_and_idle_close(procs, site, svc):
    ini_set(site.gateway_conf, 'gateway', 'drain_timeout', 20)
    (gw,), _ = bring_up(procs, site)
    seen = svc.count
    # HTTP/2: one stream in flight when the drain starts
    dev2 = H2Device(site)
    sid = dev2.get(site.path('delay?ms=3000'))
    # HTTP/1.1 kept alive: one answer (keep-alive), then a request in flight
    busy = tls_connect(site)
    one = f'GET {site.path("policy.xml")} HTTP/1.1\r\nHost: {site.name}\r\n\r\n'.encode()
    busy.sendall(one)
    status, head, _ = read_response(busy)
    assert status == 200 and b'Connection: keep-alive' in head, head
    # HTTP/1.1 kept alive and idle between requests
    idle = tls_connect(site)
    idle.sendall(one)
    status, head, _ = read_response(idle)
    assert status == 200 and b'Connection: keep-alive' in head, head
    busy.sendall(f'GET {site.path("delay?ms=3000")} HTTP/1.1\r\nHost: {site.name}\r\n\r\n'.encode())
    poll(lambda: svc.count >= seen + 4, 5 * SLOW, 'both delayed requests to reach the service')

    gw.expected_exit = True
    drain_started = time.monotonic()
    gw.popen.send_signal(signal.SIGTERM)
    poll(lambda: 'draining:' in gw.log_text(), 5 * SLOW, 'the drain to start')
    start_line = re.search(r'draining: .*', gw.log_text()).group(0)
    assert '3 device connection(s) and 2 request(s) in flight' in start_line, start_line

    # the idle connection is closed at once (TLS close_notify, then the end)
    idle.settimeout(5 * SLOW)
    assert idle.recv(65536) == b'', 'the idle kept-alive connection got data instead of its end'
    idle_closed = time.monotonic() - drain_started
    assert idle_closed < 1.0 * SLOW, f'idle connection closed {idle_closed:.2f} s into the drain'

    # SIGHUP during the drain is refused, and says so
    gw.popen.send_signal(signal.SIGHUP)
    poll(lambda: 'SIGHUP refused: the gateway is draining' in gw.log_text(), 5 * SLOW, 'the refusal')

    # HTTP/2: the notice (last stream 2^31-1), a PING, then the final GOAWAY naming our
    # stream; the stream still completes
    dev2.pump(lambda: sid in dev2.ended, 10 * SLOW)
    assert dev2.status.get(sid) == 200 and dev2.body[sid] == b'late', (dev2.status, dev2.body)
    assert dev2.goaways[:2] == [(2 ** 31 - 1, 0), (sid, 0)], dev2.goaways
    assert dev2.pings >= 1
    dev2.pump(lambda: False, 5 * SLOW)       # then the gateway ends its side ...
    assert dev2.closed
    dev2.close()                             # ... and waits for ours

    # HTTP/1.1: the answer in flight comes whole, with Connection: close, then the end
    status, head, body = read_response(busy)
    assert status == 200 and body == b'late' and b'Connection: close' in head, head
    busy.settimeout(5 * SLOW)
    assert busy.recv(65536) == b''

    rc = gw.popen.wait(10 * SLOW)
    assert rc == 0
    end = drain_end(gw)
    assert end and end.group(2, 3) == ('2', '0'), end and end.group(0)
    print(f'{start_line}\n{end.group(0)}')
    for s in (busy, idle):
        s.close()


def test_drain_timeout_cuts_what_is_left(procs, site, svc):
    ini_set(site.gateway_conf, 'gateway', 'drain_timeout', 1)
    (gw,), _ = bring_up(procs, site)
    size = 16 * MiB
    dl = CurlProcess(site, download_path(site, size), '--limit-rate', '1M')
    try:
        poll(lambda: dl.received > 0, 10 * SLOW, 'the download to start')
        rc, took = stop_and_wait(gw, signal.SIGTERM, 10 * SLOW)
        r = dl.wait(10 * SLOW)
    finally:
        dl.kill()
    assert rc == 0
    assert r.rc != 0 and dl.received < size, (r, dl.received)
    log = gw.log_text()
    assert re.search(r'drain_timeout \(1 s\) reached: 1 request\(s\) still in flight are cut, '
                     r'1 device connection\(s\) closed', log), log[-2000:]
    end = drain_end(gw)
    assert end and end.group(2, 3) == ('0', '1'), end and end.group(0)
    assert 0.9 < took < 3 * SLOW, f'exited {took:.2f} s after SIGTERM'
    print(f'cut after {took:.2f} s: curl rc={r.rc}, {dl.received} of {size} bytes; {end.group(0)}')


def test_sigquit_and_a_second_sigterm_stop_at_once(procs, site, svc):
    ini_set(site.gateway_conf, 'gateway', 'drain_timeout', 60)
    (gw,), connector = bring_up(procs, site)
    for how in ('SIGQUIT', 'second SIGTERM'):
        dl = CurlProcess(site, download_path(site, 16 * MiB), '--limit-rate', '1M')
        try:
            poll(lambda: dl.received > 0, 10 * SLOW, 'the download to start')
            if how == 'SIGQUIT':
                rc, took = stop_and_wait(gw, signal.SIGQUIT, 5 * SLOW)
            else:
                gw.expected_exit = True
                gw.popen.send_signal(signal.SIGTERM)
                poll(lambda: 'draining:' in gw.log_text(), 5 * SLOW, 'the drain to start')
                rc, took = stop_and_wait(gw, signal.SIGTERM, 5 * SLOW)
            r = dl.wait(10 * SLOW)
        finally:
            dl.kill()
        assert rc == 0 and took < 1.0 * SLOW, (how, rc, took)
        assert r.rc != 0, (how, r)
        assert not drain_end(gw), how
        word = 'SIGQUIT' if how == 'SIGQUIT' else 'SIGTERM'
        assert f'{word} received, stopping' in gw.log_text(), how
        print(f'{how}: exited {took:.3f} s after the signal; the download cut (curl rc={r.rc})')
        if how == 'SIGQUIT':
            gw = start_gateway(procs, site)
            poll(lambda: joined(gw), 10 * SLOW, 'the gateway to join again', check=procs.check)


# ---------------------------------------------------------------- joining the device port

def refused(site):
    try:
        socket.create_connection((site.addr, site.port), timeout=2).close()
        return False
    except ConnectionRefusedError:
        return True


def test_device_port_opens_once_a_tunnel_is_up(procs, site, svc):
    gw = start_gateway(procs, site)
    time.sleep(0.5)
    assert refused(site), 'the device port listened before a connector was up'
    assert not joined(gw)
    started = time.monotonic()
    start_connector(procs, site.connector_conf)
    line = poll(lambda: joined(gw), 10 * SLOW, 'the gateway to join', check=procs.check).group(0)
    assert re.fullmatch(r'joining the device port: policy version \d+, 1 tunnel', line), line
    # the first answer is the service's, never 503 for want of a tunnel
    r = request(site, 'GET', site.path('policy.xml'))     # listening before the line above
    assert r.status == 200, r
    print(f'joined {time.monotonic() - started:.2f} s after the connector started: {line}')
    log = gw.log_text()
    assert log.index('tunnel up') < log.index(f'listening for devices on 127.0.0.1:{site.port}') < \
        log.index('joining the device port')
    assert 'tcp_migrate_req' in log


def test_device_port_opens_after_ready_timeout_without_a_connector(procs, site, svc):
    ini_set(site.gateway_conf, 'gateway', 'ready_timeout', 1)
    gw = start_gateway(procs, site)
    assert refused(site)
    line = poll(lambda: joined(gw), 5 * SLOW, 'the gateway to join after ready_timeout',
                check=procs.check).group(0)
    assert line == ('joining the device port without a tunnel after ready_timeout 1 s: devices get '
                    '503 CMGService_No_Connector until one is up'), line
    r = request(site, 'GET', site.path('policy.xml'))
    assert r.status == 503 and b'CMGService_No_Connector' in r.body, r


def test_a_tunnel_without_a_policy_is_not_enough(procs, site, svc):
    """A gateway with no mapping of its own (a new pod, its cache empty) and a connector that
    has no signed policy yet: the tunnel alone does not make it join (it would answer every
    device 404); ready_timeout does, and says why."""
    text = site.gateway_conf.read_text()
    site.gateway_conf.write_text(text[:text.index('[mapping ')])
    ini_set(site.gateway_conf, 'gateway', 'ready_timeout', 2)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    poll(lambda: 'tunnel up' in gw.log_text(), 10 * SLOW, 'the tunnel', check=procs.check)
    time.sleep(0.5)
    assert refused(site) and not joined(gw), 'joined with a tunnel but no policy'
    line = poll(lambda: joined(gw), 5 * SLOW, 'the gateway to join after ready_timeout',
                check=procs.check).group(0)
    assert line.startswith('joining the device port after ready_timeout 2 s with no policy yet'), line


# ---------------------------------------------------------------- net.ipv4.tcp_migrate_req

@pytest.mark.parametrize('who', ['root', 'nobody'])
def test_tcp_migrate_req_set_by_root_else_a_warning(procs, site, who):
    """In a network namespace of its own (where the sysctl starts at 0): a gateway run as root
    sets it and says so; one run as nobody cannot, and warns once, naming the cost."""
    if os.geteuid() != 0:
        pytest.skip('needs root (a network namespace, another user)')
    work = Path(tempfile.mkdtemp(prefix='cmg-netns-'))
    try:
        shutil.copytree(site.dir, work / 'site')      # readable by nobody too
        for root, dirs, files in os.walk(work):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        argv = ['unshare', '--net', 'sh', '-c', 'ip link set lo up && exec "$@"', 'sh']
        if who == 'nobody':
            argv += ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups']
        gw = procs.start(f'gateway-{who}', argv + [CMG, 'gateway', '-c', work / 'site/gateway.conf'])
        poll(lambda: 'listening for connectors on' in gw.log_text(), 10 * SLOW, 'the gateway to start',
             check=procs.check)
        log = gw.log_text()
        if who == 'root':
            assert 'set net.ipv4.tcp_migrate_req = 1 (it was 0): connections queued at this instance ' \
                   'when it drains move to the other instances on the device port' in log, log
        else:
            assert log.count('tcp_migrate_req') == 1, log
            assert re.search(r'warn: cannot set net\.ipv4\.tcp_migrate_req = 1 \(Permission denied; .*\): '
                             r'connections queued at this instance when it drains may be reset', log), log
        rc, took = stop_and_wait(gw, signal.SIGTERM, 10 * SLOW)     # nothing to drain: at once
        assert rc == 0 and took < 1.0 * SLOW, (rc, took)
        assert drain_end(gw).group(2, 3) == ('0', '0')
    finally:
        shutil.rmtree(work)
