"""What an operator sees, end to end (issue 13's acceptance): 2 gateway instances × 2
connectors and `cmg site serve`, report_interval = 1 s on every role; no row is written by
the test, everything comes from real reports.

- `cmg site status --json` after traffic shows the 4 tunnels up, and per-role requests and
  body bytes for today and this month exactly what the test sent (both connectors carried
  every report).
- A monthly egress allowance (`cmg site alert set egress-monthly`): downloads push the month
  over 50 % (one warning) and then over 90 % (raised to critical); the webhook gets both.
- A connector killed (SIGKILL): within 2 report intervals `cmg site status` shows its tunnels
  down and an alert (connector-silent) is open, logged and POSTed."""
import json
import signal
import time

import pytest

from cmgtest import SLOW, poll, request, run_cmg
from test_alerts import Receiver
from test_reports import INTERVAL, dep, settled, traffic  # noqa: F401 (dep: the fixture)


def status(dep):
    r = run_cmg('site', 'status', dep.site.dir, '--json')
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def role_counts(doc, period, role):
    rows = [r for r in doc['traffic'][period]['roles'] if r['role'] == role]
    r = rows[0] if rows else {'requests': 0, 'request_bytes': 0, 'response_bytes': 0}
    return r['requests'], r['request_bytes'], r['response_bytes']


def connector_names(doc):
    return sorted(c['name'] for c in doc['connectors'])


def up_pairs(doc):
    return sorted((t['gateway'], t['connector']) for t in doc['tunnels'] if t['state'] == 'up')


@pytest.fixture
def hook():
    r = Receiver()
    yield r
    r.close()


def test_status_counts_exactly_what_was_sent(dep, procs):
    settled(dep, procs)
    role = dep.site.role_ids[0]
    before = status(dep)
    assert len(before['gateways']) == 2 and len(before['connectors']) == 2, before
    instances = sorted(g['instance'] for g in before['gateways'])
    pairs = sorted((g, c) for g in instances for c in connector_names(before))
    assert up_pairs(before) == pairs, before['tunnels']
    assert all(t['rtt_ms'] is not None for t in before['tunnels']), before['tunnels']

    sent = traffic(dep, 3)
    want = {p: tuple(a + b for a, b in zip(role_counts(before, p, role), sent))
            for p in ('today', 'month')}
    poll(lambda: {p: role_counts(status(dep), p, role) for p in want} == want,
         8 * INTERVAL * SLOW, f'status to count {want}', check=procs.check)
    time.sleep(2 * INTERVAL)   # later reports (up both connectors) add nothing
    doc = status(dep)
    assert {p: role_counts(doc, p, role) for p in want} == want
    assert doc['egress']['month'] >= sent[2] + before['egress']['month'], doc['egress']
    text = run_cmg('site', 'status', dep.site.dir)
    assert text.returncode == 0 and all(i in text.stdout for i in instances), text.stdout


def test_egress_warning_then_critical_reach_the_webhook(dep, procs, hook):
    settled(dep, procs)
    used = status(dep)['egress']['month']
    limit = used * 4 + (4 << 20)          # the month so far is under 25 % of it
    step = limit // 4                     # each download adds a quarter and a little more
    dep.cmg_site('alert', 'webhook', hook.url)
    dep.cmg_site('alert', 'set', 'egress-monthly', str(limit))

    def alert_levels():
        return [a['level'] for a in status(dep)['alerts'] if a['kind'] == 'egress-monthly']

    time.sleep(2 * INTERVAL)
    assert alert_levels() == [] and hook.docs('egress-monthly') == []
    for _ in range(2):                    # > 50 %
        r = request(dep.site, 'GET', dep.site.path(f'download?size={step}'))
        assert r.status == 200 and len(r.body) == step
    poll(lambda: alert_levels() == ['warning'], 8 * INTERVAL * SLOW, 'the egress warning',
         check=procs.check)
    for _ in range(2):                    # > 90 %
        r = request(dep.site, 'GET', dep.site.path(f'download?size={step}'))
        assert r.status == 200 and len(r.body) == step
    poll(lambda: alert_levels() == ['critical'], 8 * INTERVAL * SLOW, 'the egress critical',
         check=procs.check)
    poll(lambda: [d['alert']['level'] for d in hook.docs('egress-monthly')] == ['warning', 'critical'],
         10 * SLOW, 'both egress alerts at the webhook', check=procs.check)
    assert 'egress-monthly' in dep.site_proc.log_text()


def test_a_killed_connector_shows_within_two_intervals(dep, procs, hook):
    settled(dep, procs)
    dep.cmg_site('alert', 'webhook', hook.url)
    doc = status(dep)
    victim = [c['name'] for c in doc['connectors'] if c['name'] != 'c2'][0]
    victim_proc = dep.connectors[0]
    victim_proc.signal(signal.SIGKILL)
    killed = time.monotonic()

    def seen():
        doc = status(dep)
        down = all(t['state'] != 'up' for t in doc['tunnels'] if t['connector'] == victim)
        alert = any(a['kind'] == 'connector-silent' and a['subject'] == victim
                    for a in doc['alerts'])
        return down and alert
    poll(seen, 2 * INTERVAL + 1, 'the status and an alert to show the connector gone',
         check=lambda: None)
    took = time.monotonic() - killed
    print(f'connector {victim} killed: status and alert say so after {took:.2f} s')
    poll(lambda: any(d['alert']['subject'] == victim for d in hook.docs('connector-silent')),
         10 * SLOW, 'the connector-silent alert at the webhook')
    # the other connector's tunnels are up and carry the traffic
    assert all(t['state'] == 'up' for t in status(dep)['tunnels'] if t['connector'] == 'c2')
    r = request(dep.site, 'GET', dep.site.path('download?size=10'))
    assert r.status == 200
