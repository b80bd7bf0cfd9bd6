"""Two gateway instances on one host, from one gateway.conf: `--instance 0` and `--instance 1`
share the device port (SO_REUSEPORT) and take tunnels on tunnel_port + 0 and + 1; the
connector dials both. Kill -9 one: new device connections all go to the survivor. Start it
again: the connector is back on it within 5 s, without being restarted."""
import re
import signal
import time

from cmgtest import SLOW, Site, poll, request, start_connector, start_gateway
from internal_service import POLICY

NEW_CONNECTIONS = 40


def served(proc):
    """How many device requests this gateway process answered, by its log."""
    return len(re.findall(r'^.*\brequest peer=.*\bstatus=200\b', proc.log_text(), re.M))


def wait_served(procs, gws, total):
    """The gateways log a request once its answer is out, maybe just after the client has it:
    wait until they have logged `total` answers in all; return the count of each."""
    poll(lambda: sum(served(gw) for gw in gws) >= total, 2 * SLOW, f'{total} answers in the gateway logs',
         check=procs.check)
    return [served(gw) for gw in gws]


def tunnels_up(proc):
    return proc.log_text().count('tunnel up')


def requests_on_new_connections(site, n=NEW_CONNECTIONS):
    answers = [request(site, 'GET', site.path('policy.xml'), timeout=10 * SLOW) for _ in range(n)]
    return [(r.status, r.body == POLICY) for r in answers]


def test_two_instances_kill_9_one_then_restart_it(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs, instances=2)
    gws = [start_gateway(procs, site, 0), start_gateway(procs, site, 1)]
    connector = start_connector(procs, site.connector_conf)
    poll(lambda: all(tunnels_up(gw) == 1 for gw in gws) and tunnels_up(connector) == 2, 10 * SLOW,
         'the connector to bring a tunnel up to each instance', check=procs.check)
    for i, gw in enumerate(gws):
        assert f'tunnel up: gateway=127.0.0.1:{site.tunnel_port + i} ' in connector.log_text()

    # the kernel spreads new connections over both instances; every one is answered
    assert requests_on_new_connections(site) == [(200, True)] * NEW_CONNECTIONS
    counts = wait_served(procs, gws, NEW_CONNECTIONS)
    print(f'{NEW_CONNECTIONS} new connections: {counts[0]} to instance 0, {counts[1]} to instance 1')
    assert all(counts), f'one instance got no connection out of {NEW_CONNECTIONS}: {counts}'

    # kill -9 instance 0: its listening socket closes with the process, so from then on every
    # new connection goes to instance 1 (at most a short window for the kernel to catch up)
    gws[0].signal(signal.SIGKILL)
    poll(lambda: request(site, 'GET', site.path('policy.xml'), timeout=5 * SLOW).status == 200, 1.0 * SLOW,
         'a request after the kill to succeed', interval=0.05, check=procs.check)
    assert requests_on_new_connections(site) == [(200, True)] * NEW_CONNECTIONS
    survivor = counts[1] + 1 + NEW_CONNECTIONS      # all since the kill, with the first one above
    assert wait_served(procs, gws[1:], survivor) == [survivor], 'the survivor did not answer them all'
    assert gws[1].alive() and connector.alive()

    # start instance 0 again: the connector (not restarted) dials it again within 5 s
    started = time.monotonic()
    gw0 = start_gateway(procs, site, 0)
    poll(lambda: tunnels_up(gw0) == 1, max(0.1, started + 5.0 - time.monotonic()),
         'the restarted instance 0 to log "tunnel up"', interval=0.02, check=procs.check)
    print(f'tunnel up on the restarted instance {time.monotonic() - started:.2f} s after its start')
    poll(lambda: tunnels_up(connector) == 3, 2 * SLOW, 'the connector to log the tunnel up again',
         check=procs.check)
    assert tunnels_up(gws[1]) == 1, 'the tunnel to the survivor was dropped meanwhile'

    before = [served(gw0), served(gws[1])]
    assert requests_on_new_connections(site) == [(200, True)] * NEW_CONNECTIONS
    after = wait_served(procs, [gw0, gws[1]], sum(before) + NEW_CONNECTIONS)
    assert after[0] > before[0] and after[1] > before[1], \
        f'both instances should serve again: {before} -> {after}'
