"""Issue 12's first acceptance point: a rolling restart of a whole deployment — two gateway
instances sharing the device port and two connectors, each restarted in turn with SIGTERM
(it drains) and started again — under a continuous loop of device requests, with long
downloads in flight through the part that restarts: no request fails, every download's
SHA-256 is intact. Each part is back (its tunnels all up) before the next goes, as an
operator does it."""
import re
import signal
import subprocess
import time

from cmgtest import SLOW, Site, bring_up, ini_set, poll, start_connector, start_gateway
from underload import MiB, Load

CONNECTORS = ('connector-a', 'connector-b')


def tunnels_up(gateway):
    return {m for m in re.findall(r'tunnel up: connector=(\S+)', gateway.log_text())}


def stop(proc):
    """SIGTERM: the part drains and exits 0."""
    proc.signal(signal.SIGTERM, wait=False)
    try:
        rc = proc.popen.wait(timeout=60 * SLOW)
    except subprocess.TimeoutExpired:
        raise AssertionError(f'{proc.name} still draining 60 s after SIGTERM') from None
    assert rc == 0, f'{proc.name} exited with {rc} after its drain'
    return re.search(r'drain over.*', proc.log_text()).group(0)


def test_rolling_restart_of_two_gateways_and_two_connectors(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs, instances=2)
    ini_set(site.gateway_conf, 'gateway', 'drain_timeout', 60)      # longer than a download
    ini_set(site.connector_conf, 'connector', 'drain_timeout', 60)
    ini_set(site.connector_conf, 'connector', 'name', CONNECTORS[0])
    conf_b = site.connector_copy(CONNECTORS[1], [svc.url])
    gateways, connector_a = bring_up(procs, site, instances=2)
    connectors = {CONNECTORS[0]: (connector_a, site.connector_conf),
                  CONNECTORS[1]: (start_connector(procs, conf_b, CONNECTORS[1]), conf_b)}

    def all_tunnels_up():
        poll(lambda: all(tunnels_up(g) >= set(CONNECTORS) for g in gateways), 15 * SLOW,
             'every instance to have a tunnel from each connector', check=procs.check)

    all_tunnels_up()
    requests = Load(site, downloads=0).start()           # one loop for the whole restart
    drained, downloads = [], []
    try:
        for part in ('gateway0', 'gateway1') + CONNECTORS:
            # downloads in flight through every part, the one that restarts too
            load = Load(site, clients=0, downloads=4, download_size=12 * MiB, rate='3M').start()
            downloads.append(load)
            time.sleep(1)
            if part.startswith('gateway'):
                i = int(part[-1])
                drained.append((part, stop(gateways[i])))
                gateways[i] = start_gateway(procs, site, i)
            else:
                proc, conf = connectors[part]
                drained.append((part, stop(proc)))
                connectors[part] = (start_connector(procs, conf, part), conf)
            all_tunnels_up()
            load.stop()
    finally:
        requests.stop()
        for load in downloads:
            load.stop()

    for part, line in drained:
        print(f'{part}: {line}')
    print(requests.summary())
    failed = requests.failed()
    assert requests.results and not failed, f'{len(failed)} of {len(requests.results)} requests failed: {failed[:5]}'
    broken = [p for load in downloads for p in load.download_problems()]
    assert not broken, broken
    print(f'{4 * len(downloads)} downloads of 12 MiB, all whole')
