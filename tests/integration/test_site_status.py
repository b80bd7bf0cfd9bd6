"""`cmg site status` (text and --json), the admin ops `status` and `traffic`, and the admin
API's GET /v1/status and GET /v1/traffic.

The document is made from the report tables of site.db (gateways, connector_reports,
traffic_5m/_day/_month, alert_settings, alerts). Most tests here write those rows with
Python's sqlite3, exactly as the reports' contract describes them, and check what the
command and the API make of them field by field: this tests the status document apart
from the reports' ingestion (and before it was merged). The last test brings up a real
deployment and checks that the command runs and says what it sees."""
import calendar
import json
import re
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from cmgtest import CMG, SLOW, Site, poll, run_cmg
from sitetest import Deployment

GIB = 1 << 30
ROLE_A = '72057594037927937'
ROLE_B = '72057594037927938'
INTERVAL = 60                       # every reporter's interval: stale after 120 s


def utc_day(t):
    return time.strftime('%Y-%m-%d', time.gmtime(t))


def utc_month(t):
    return time.strftime('%Y-%m', time.gmtime(t))


def away_from_midnight():
    """The time now, once at least a minute away from the next UTC midnight: today and
    this month stay what the rows were written for while a test reads them."""
    now = int(time.time())
    if 86400 - now % 86400 < 60:
        time.sleep(86400 - now % 86400 + 1)
        now = int(time.time())
    return now


def traffic_row(db, table, period, instance, role, when, **counts):
    cols = ['instance', 'role', period] + list(counts)
    db.execute(f'INSERT INTO {table} ({", ".join(cols)}) VALUES ({", ".join("?" * len(cols))})',
               [instance, role, when, *counts.values()])


def write_reports(site_dir, now):
    """Two gateway instances x two connectors, and what they counted, as reports leave
    them: HOST/0 fresh, HOST/1 stale; c1 fresh, c2 stale; HOST/0 also lists c3, which never
    reported itself."""
    db = sqlite3.connect(site_dir / 'site.db')
    gw = 'INSERT INTO gateways VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)'
    db.execute(gw, ('HOST/0', 'b0' * 8, 7, 'serving', 12, now - 3600, now - 10, now - 10,
                    INTERVAL, 17, 'c1',
                    json.dumps([{'connector': 'c1', 'peer': '127.0.0.1:40000', 'state': 'up',
                                 'since': now - 200},
                                {'connector': 'c3', 'peer': '127.0.0.1:40002',
                                 'state': 'draining', 'since': now - 40}]),
                    json.dumps([{'name': 'gateway.crt', 'subject': 'CN=gw', 'serial': '0A1B2C',
                                 'not_after': now + 10 * 86400 + 3600},
                                {'name': 'far.crt', 'subject': 'CN=far', 'serial': 'FF',
                                 'not_after': now + 300 * 86400}])))
    db.execute(gw, ('HOST/1', 'b1' * 8, 3, 'serving', 11, now - 7200, now - 500, now - 500,
                    INTERVAL, 4, 'c2',
                    json.dumps([{'connector': 'c2', 'peer': '127.0.0.1:40001', 'state': 'up',
                                 'since': now - 900}]),
                    json.dumps([{'name': 'gateway.crt', 'subject': 'CN=gw', 'serial': '0a1b2c',
                                 'not_after': now + 10 * 86400 + 3600}])))
    cn = 'INSERT INTO connector_reports VALUES (?, ?, ?, ?, ?, ?, ?)'
    db.execute(cn, ('c1', now - 5, now - 5, INTERVAL, 0, 12, json.dumps([
        {'gateway': '127.0.0.1:10140', 'instance': 'HOST/0', 'state': 'up', 'since': now - 192,
         'rtt_ms': 0.42, 'reconnects': 0},
        {'gateway': '127.0.0.1:10141', 'instance': 'HOST/1', 'state': 'connecting',
         'since': now - 30, 'rtt_ms': None, 'reconnects': 3}])))
    db.execute(cn, ('c2', now - 1000, now - 1000, INTERVAL, 0, 11, json.dumps([
        {'gateway': '127.0.0.1:10140', 'instance': 'HOST/0', 'state': 'up', 'since': now - 5000,
         'rtt_ms': 1.5, 'reconnects': 1},
        {'gateway': '127.0.0.1:10141', 'instance': 'HOST/1', 'state': 'up', 'since': now - 5000,
         'rtt_ms': 2.5, 'reconnects': 1}])))
    today, month = utc_day(now), utc_month(now)
    for table, period, when, old in (('traffic_day', 'day', today, '2000-01-01'),
                                     ('traffic_month', 'month', month, '2000-01')):
        scale = 1 if table == 'traffic_day' else 10
        traffic_row(db, table, period, 'HOST/0', ROLE_A, when, requests=10 * scale,
                    r2xx=9 * scale, r4xx=1 * scale, request_bytes=100 * scale,
                    response_bytes=5000 * scale)
        traffic_row(db, table, period, 'HOST/1', ROLE_A, when, requests=5 * scale,
                    r2xx=5 * scale, request_bytes=50 * scale, response_bytes=2500 * scale)
        traffic_row(db, table, period, 'HOST/0', ROLE_B, when, requests=1 * scale,
                    r5xx=1 * scale, request_bytes=0, response_bytes=30 * scale)
        traffic_row(db, table, period, 'HOST/0', '', when, egress_bytes=3 * GIB * scale,
                    ingress_bytes=1000, device_connections=7)
        traffic_row(db, table, period, 'HOST/1', '', when, egress_bytes=2 * GIB * scale)
        # another day / month: never in today's or this month's figures
        traffic_row(db, table, period, 'HOST/0', ROLE_A, old, requests=999, request_bytes=999,
                    response_bytes=999)
        traffic_row(db, table, period, 'HOST/0', '', old, egress_bytes=999 * GIB)
    bucket = now - now % 300
    for instance, n, eg in (('HOST/0', 3, 3000), ('HOST/1', 2, 2000)):
        traffic_row(db, 'traffic_5m', 'bucket', instance, ROLE_A, bucket - 600, requests=n,
                    request_bytes=10 * n, response_bytes=100 * n)
        traffic_row(db, 'traffic_5m', 'bucket', instance, '', bucket - 600, egress_bytes=eg)
    # more than a day old: not in the day's series
    traffic_row(db, 'traffic_5m', 'bucket', 'HOST/0', ROLE_A, bucket - 2 * 86400, requests=50)
    db.executemany('INSERT INTO alert_settings VALUES (?, ?)',
                   [('egress_monthly', str(100 * GIB)), ('warning_pct', '40'),
                    ('critical_pct', '80')])
    cert = 'INSERT INTO certs (serial, name, subject, issued, expires, revoked, kind, replaced) ' \
           'VALUES (?, ?, ?, ?, ?, ?, ?, ?)'
    db.executemany(cert, [
        ('5001', 'soon-device', 'CN=soon-device', now - 86400, now + 5 * 86400 + 3600, None,
         None, None),
        ('5002', 'gone-device', 'CN=gone-device', now - 9 * 86400, now - 2 * 86400 + 3600,
         None, None, None),
        ('5003', 'revoked-device', 'CN=revoked-device', now - 86400, now + 86400, now - 60,
         None, None),
        ('5004', 'gateway', 'CN=old-gateway', now - 86400, now + 86400, None, 'gateway',
         now - 60)])
    alert = 'INSERT INTO alerts (kind, subject, level, message, value, threshold, opened, ' \
            'updated, resolved) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)'
    db.executemany(alert, [
        ('cert-expiry', 'soon-device', 'warning', 'certificate soon-device ends in 5 days',
         5, 30, now - 100, now - 100, None),
        ('egress-monthly', 'site', 'critical', 'egress this month is 50 GiB of 100 GiB',
         50, 80, now - 50, now - 20, None),
        ('connector-silent', 'c9', 'critical', 'connector c9 silent for 10m', 600, 120,
         now - 900, now - 800, now - 700)])
    db.commit()
    db.close()


@pytest.fixture
def site(tmp_path, procs):
    s = Site(tmp_path / 'site', ['http://127.0.0.1:9'], procs)
    r = run_cmg('site', 'connector', 'add', 'c1', '--site', s.dir)
    assert r.returncode == 0, r.stderr
    return s


def status_json(site_dir, *extra):
    r = run_cmg('site', 'status', site_dir, '--json', *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def by(rows, **keys):
    found = [r for r in rows if all(r[k] == v for k, v in keys.items())]
    assert len(found) == 1, (keys, rows)
    return found[0]


def check_document(doc, now, site):
    assert now <= doc['time'] <= now + 30
    assert doc['report_interval'] == 300
    assert doc['service_name'] == site.name
    # the matrix: 2 instances x 2 connectors, and c3 that only HOST/0 lists
    t = doc['tunnels']
    assert [(r['gateway'], r['connector']) for r in t] == [
        ('HOST/0', 'c1'), ('HOST/0', 'c2'), ('HOST/0', 'c3'), ('HOST/1', 'c1'), ('HOST/1', 'c2')]
    r = by(t, gateway='HOST/0', connector='c1')
    assert (r['state'], r['since'], r['rtt_ms'], r['reconnects'], r['address']) == \
        ('up', now - 192, 0.42, 0, '127.0.0.1:10140')
    assert (r['gateway_view'], r['connector_view']) == ('up', 'up')
    r = by(t, gateway='HOST/1', connector='c1')       # the connector's view wins while fresh
    assert (r['state'], r['since'], r['rtt_ms'], r['reconnects']) == \
        ('connecting', now - 30, None, 3)
    assert (r['gateway_view'], r['connector_view']) == ('none', 'connecting')
    r = by(t, gateway='HOST/0', connector='c2')       # c2 stale: fresh HOST/0 does not list it
    assert (r['state'], r['gateway_view'], r['connector_view']) == ('down', 'none', 'stale')
    r = by(t, gateway='HOST/1', connector='c2')       # both stale: nobody knows
    assert (r['state'], r['gateway_view'], r['connector_view']) == ('unknown', 'up', 'stale')
    r = by(t, gateway='HOST/0', connector='c3')       # c3 never reported: HOST/0's view
    assert (r['state'], r['since'], r['gateway_view'], r['connector_view']) == \
        ('draining', now - 40, 'draining', 'none')
    # gateways and connectors, staleness by the age of their last report
    g0, g1 = doc['gateways']
    assert (g0['instance'], g0['state'], g0['policy_version'], g0['last_report'],
            g0['stale'], g0['devices_now'], g0['via']) == \
        ('HOST/0', 'serving', 12, now - 10, False, 17, 'c1')
    assert 10 <= g0['last_report_age'] <= 40
    assert (g1['instance'], g1['policy_version'], g1['stale']) == ('HOST/1', 11, True)
    assert 500 <= g1['last_report_age'] <= 530
    c = {x['name']: x for x in doc['connectors']}
    assert sorted(c) == ['c1', 'c2', 'c3', 'connector-1']
    assert (c['c1']['last_report'], c['c1']['stale'], c['c1']['policy_version'],
            c['c1']['revoked'], c['c1']['draining']) == (now - 5, False, 12, False, False)
    assert (c['c2']['stale'], c['c2']['policy_version']) == (True, 11)
    assert c['c3']['last_report'] is None and c['connector-1']['last_report'] is None
    # traffic: today's and this month's sums over both instances, per role
    today = doc['traffic']['today']
    assert (today['requests'], today['request_bytes'], today['response_bytes']) == \
        (16, 150, 7530)
    a = by(today['roles'], role=ROLE_A)
    assert (a['requests'], a['request_bytes'], a['response_bytes']) == (15, 150, 7500)
    assert a['status'] == {'1xx': 0, '2xx': 14, '3xx': 0, '4xx': 1, '5xx': 0, 'other': 0}
    assert by(today['roles'], role=ROLE_B)['status']['5xx'] == 1
    month = doc['traffic']['month']
    assert (month['requests'], month['request_bytes'], month['response_bytes']) == \
        (160, 1500, 75300)
    # egress against alert_settings
    e = doc['egress']
    assert (e['today'], e['month'], e['monthly_limit'], e['daily_limit']) == \
        (5 * GIB, 50 * GIB, 100 * GIB, None)
    assert (e['warning_pct'], e['critical_pct'], e['month_pct'], e['today_pct']) == \
        (40, 80, 50, None)
    assert e['by_gateway'] == [{'instance': 'HOST/0', 'today': 3 * GIB, 'month': 30 * GIB},
                               {'instance': 'HOST/1', 'today': 2 * GIB, 'month': 20 * GIB}]
    # certificates within 30 days, soonest first: the expired one too; not the revoked,
    # the replaced, the far one, nor the reported one twice
    assert [(x['kind'], x['name'], x['serial'], x['days_left']) for x in doc['certificates']] == [
        ('device', 'gone-device', '5002', -2), ('device', 'soon-device', '5001', 5),
        ('reported', 'gateway.crt', '0A1B2C', 10)]
    assert doc['certificates'][2]['instance'] == 'HOST/0'
    # open alerts only, the critical first
    assert [(x['kind'], x['level'], x['subject']) for x in doc['alerts']] == [
        ('egress-monthly', 'critical', 'site'), ('cert-expiry', 'warning', 'soon-device')]
    assert doc['alerts'][0]['message'] == 'egress this month is 50 GiB of 100 GiB'


def test_status_document_and_text(site):
    now = away_from_midnight()
    write_reports(site.dir, now)
    check_document(status_json(site.dir), now, site)

    r = run_cmg('site', 'status', site.dir)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert 'no report yet' not in out
    lines = out.splitlines()
    # the matrix comes first
    header = next(i for i, line in enumerate(lines) if line.startswith('GATEWAY'))
    assert 'CONNECTOR' in lines[header] and 'STATE' in lines[header]
    row = lines[header + 1].split()
    assert row[:3] == ['HOST/0', 'c1', 'up'] and re.fullmatch(r'3m1\ds', row[3]), row
    assert row[4:6] == ['0.42', 'ms'], row
    assert lines[header + 4].split()[:3] == ['HOST/1', 'c1', 'connecting']
    assert lines[header + 5].split()[:3] == ['HOST/1', 'c2', 'unknown']
    g1 = next(line for line in lines if line.startswith('HOST/1') and 'serving' in line)
    assert 'STALE' in g1.split() and re.search(r'\b8m\d+s ago', g1), g1
    g0 = next(line for line in lines if line.startswith('HOST/0') and 'serving' in line)
    assert 'STALE' not in g0 and ' 12 ' in g0, g0
    c2 = next(line for line in lines if line.startswith('c2 '))
    assert 'STALE' in c2, c2
    assert re.search(r'^c3 +never reported', out, re.M)
    assert re.search(r'^today +16 +150 B +7.4 KiB$', out, re.M), out
    assert '5 GiB today (no daily limit set)' in out
    assert '50 GiB of 100 GiB this month (50 %)' in out
    assert 'warning at 40 %, critical at 80 %' in out
    assert re.search(r'device +gone-device +serial 5002 .*\(EXPIRED 1d2[23]h ago\)', out), out
    assert re.search(r'device +soon-device +serial 5001 .*\(in 5 days\)', out), out
    assert re.search(r'reported +gateway.crt +serial 0A1B2C .*\(in 10 days\)', out), out
    assert 'revoked-device' not in out and 'old-gateway' not in out
    assert re.search(r'critical +egress-monthly +site: egress this month', out)
    assert re.search(r'warning +cert-expiry +soon-device:', out)
    assert 'c9' not in out                          # its alert was resolved

    # cert_expiry_days widens the list: the far certificate, and the device certificate
    # 'cert issue' makes (a year)
    r = run_cmg('site', 'cert', 'issue', '--device', 'labdevice', '--site', site.dir)
    assert r.returncode == 0, r.stderr
    db = sqlite3.connect(site.dir / 'site.db')
    db.execute("INSERT INTO alert_settings VALUES ('cert_expiry_days', '400')")
    db.commit()
    db.close()
    names = [c['name'] for c in status_json(site.dir)['certificates']]
    assert 'far.crt' in names and 'labdevice' in names and 'site CA' not in names
    assert names.index('far.crt') < names.index('labdevice')


def test_no_report_yet(site):
    r = run_cmg('site', 'status', site.dir)
    assert r.returncode == 0, r.stderr
    assert 'no report yet' in r.stdout
    assert 'report_interval' in r.stdout and 'connectors running' in r.stdout
    assert '0 B this month (no monthly limit set)' in r.stdout
    assert "'cmg site serve' is not running on this site" in r.stdout
    doc = status_json(site.dir)
    assert doc['gateways'] == [] and doc['tunnels'] == [] and doc['alerts'] == []
    assert doc['site_serving'] is False
    assert doc['egress']['monthly_limit'] is None and doc['egress']['month_pct'] is None
    assert all(c['last_report'] is None for c in doc['connectors'])


def test_odd_rows(site):
    """Rows the store holds but that do not parse as reported (a column that is not JSON,
    entries of the wrong type) make a document all the same: what is missing is left out."""
    now = int(time.time())
    db = sqlite3.connect(site.dir / 'site.db')
    db.execute('INSERT INTO gateways VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
               ('odd', 'b', 1, 'serving', 1, now, now - 1, now - 1, 0, 0, '', 'not json', '{}'))
    db.execute('INSERT INTO connector_reports VALUES (?, ?, ?, ?, ?, ?, ?)',
               ('c1', now, now, 0, 0, 1, json.dumps([1, 'a', None, {'state': 7},
                                                     {'instance': 'odd', 'state': 'up'}])))
    db.commit()
    db.close()
    doc = status_json(site.dir)   # the connector's report is the newer: its view tells
    assert [g['instance'] for g in doc['gateways']] == ['odd']
    assert [(t['gateway'], t['connector'], t['state']) for t in doc['tunnels']] == \
        [('odd', 'c1', 'up')]
    assert run_cmg('site', 'status', site.dir).returncode == 0


def test_errors_and_help(tmp_path):
    r = run_cmg('site', 'status', tmp_path / 'nowhere')
    assert r.returncode == 1 and 'nowhere' in r.stderr, r
    r = run_cmg('site', 'status', '--help')
    assert r.returncode == 0 and r.stdout.startswith('usage: cmg site status')
    assert '--json' in r.stdout and '--api' in r.stdout


def get(dep, path, token=True):
    req = urllib.request.Request(f'https://127.0.0.1:{dep.admin_port}{path}')
    if token:
        req.add_header('Authorization', f'Bearer {dep.admin_token}')
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b'{}')


def test_admin_api(procs, tmp_path, svc):
    dep = Deployment(procs, tmp_path, svc, start=False)
    run_cmg('site', 'connector', 'add', 'c1', '--site', dep.site.dir)
    now = away_from_midnight()
    write_reports(dep.site.dir, now)
    dep.start_site()

    status, doc = get(dep, '/v1/status')
    assert status == 200
    for key in ('policy_version', 'site_role', 'service_name', 'connectors_waiting',
                'oidc_refresh'):
        assert key in doc, key
    assert doc['site_role'] == dep.site_role and doc['connectors_waiting'] == 0
    assert isinstance(doc['oidc_refresh'], dict)
    check_document(doc, now, dep.site)
    assert dep.api('POST', '/v1/ops/status', {})['tunnels'] == doc['tunnels']
    # the command through the API says the same
    remote = status_json(dep.site.dir, '--api', f'https://127.0.0.1:{dep.admin_port}')
    check_document(remote, now, dep.site)

    bucket = now - now % 300
    status, day = get(dep, '/v1/traffic?range=day')
    assert status == 200
    assert (day['range'], day['step'], day['to']) == ('day', 300, day['to'])
    assert now <= day['to'] <= now + 30
    assert day['from'] == day['to'] - day['to'] % 300 - 287 * 300
    assert day['series'] == [{'role': ROLE_A, 'points': [[bucket - 600, 5, 50, 500]]}]
    assert day['egress'] == [[bucket - 600, 5000]]
    status, one = get(dep, '/v1/traffic?range=day&instance=HOST%2F1')
    assert status == 200 and one['instance'] == 'HOST/1'
    assert one['series'] == [{'role': ROLE_A, 'points': [[bucket - 600, 2, 20, 200]]}]
    assert one['egress'] == [[bucket - 600, 2000]]

    status, month = get(dep, '/v1/traffic?range=month')
    assert status == 200 and (month['range'], month['step']) == ('month', 86400)
    midnight = calendar.timegm(time.strptime(utc_day(now), '%Y-%m-%d'))
    first = calendar.timegm(time.strptime(utc_month(now) + '-01', '%Y-%m-%d'))
    assert month['from'] == first
    series = {s['role']: s['points'] for s in month['series']}
    assert series == {ROLE_A: [[midnight, 15, 150, 7500]], ROLE_B: [[midnight, 1, 0, 30]]}
    assert month['egress'] == [[midnight, 5 * GIB]]
    assert dep.api('POST', '/v1/ops/traffic', {'range': 'month'})['series'] == month['series']
    # what only reads is not logged at info, every poll; what changes is (the log is
    # written after the answer: once the change's line is there, so would be the others)
    dep.api('POST', '/v1/ops/mapping.list', {})
    dep.api('POST', '/v1/ops/bulk.create', {'lifetime': '1d'})
    poll(lambda: 'admin bulk.create from' in dep.site_proc.log_text(), 5 * SLOW,
         'the site to log the change', check=dep.procs.check)
    log = dep.site_proc.log_text()
    for op in ('status', 'traffic', 'mapping.list'):
        assert f'admin {op} from' not in log, log

    # no range: the day, as the op gives it without one
    status, plain = get(dep, '/v1/traffic')
    assert status == 200 and plain['range'] == 'day' and plain['series'] == day['series']
    assert dep.api('POST', '/v1/ops/traffic', {})['series'] == day['series']
    for bad in ('/v1/traffic?range=week', '/v1/traffic?range=',
                '/v1/traffic?range=day&instance=%zz'):
        status, err = get(dep, bad)
        assert status == 400, bad
        assert 'day' in err['error'] and 'month' in err['error'], err
    for path in ('/v1/status', '/v1/traffic?range=day'):
        status, _ = get(dep, path, token=False)
        assert status == 401, path


def test_real_deployment(procs, tmp_path, svc):
    """A running deployment: the command answers, and says "no report yet" exactly when no
    report is in the store (reports only ever add rows, so a text made between two
    documents without reports had none either)."""
    dep = Deployment(procs, tmp_path, svc)

    def reported(doc):
        return bool(doc['gateways']) or any(c['last_report'] for c in doc['connectors'])

    before = status_json(dep.site.dir)
    r = run_cmg('site', 'status', dep.site.dir)
    after = status_json(dep.site.dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f'site {dep.site.name} (role {dep.site_role})')
    assert re.search(r'^connector-1 ', r.stdout, re.M)
    if not reported(after):
        assert 'no report yet' in r.stdout and 'report_interval' in r.stdout
    assert "'cmg site serve' is not running" not in r.stdout
    assert before['site_serving'] and after['site_serving']
    if reported(before):
        assert 'no report yet' not in r.stdout
        assert re.search(r'^GATEWAY +CONNECTOR +STATE', r.stdout, re.M)
    # the running site's API gives the same document with its live keys
    assert dep.api('GET', '/v1/status')['connectors_waiting'] >= 0
    for p in (dep.gateway[0], dep.connector):
        assert p.alive()


HOSTILE = {
    'instance': 'evil\x1b]0;owned\x07/0',
    'via': 'c\x1b[2J',
    'state': 'serving\u009b31m',
    'connector': 'c\x1b[31mred',
    'tunnel_state': 'up\r\nHOST/9                   c9               up',
    'cert_name': '\x1b[8mhidden',
    'serial': 'AB\x7f\x08',
    'subject': 'c\x1bP+q\x1b\\',
}


def status_text_bytes(site_dir):
    """`cmg site status` as the terminal would receive it: bytes, undecoded."""
    r = subprocess.run([CMG, 'site', 'status', str(site_dir)], capture_output=True,
                       timeout=60 * SLOW, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_hostile_strings_escaped(site):
    """Names and messages from reports reach the terminal as text, never as control
    sequences: C0, DEL and C1 (U+0080..U+009F) are written as \\xNN, bytes that are not
    UTF-8 as U+FFFD (the document's strings are valid UTF-8); non-ASCII text stays as it
    is. --json gives the strings back as they were stored."""
    now = int(time.time())
    h = HOSTILE
    db = sqlite3.connect(site.dir / 'site.db')
    db.execute('INSERT INTO gateways VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
               (h['instance'], 'b' * 16, 1, h['state'], 3, now - 60, now - 5, now - 5, INTERVAL,
                1, h['via'],
                json.dumps([{'connector': h['connector'], 'state': h['tunnel_state'],
                             'since': now - 50}]),
                json.dumps([{'name': h['cert_name'], 'serial': h['serial'],
                             'not_after': now + 86400 * 3}])))
    db.execute('INSERT INTO gateways VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
               ('Zürich-ā/0', 'b' * 16, 1, 'serving', 3, now - 60, now - 5, now - 5, INTERVAL,
                1, 'c1', '[]', '[]'))
    # raw bytes in a text column: a lone 0x9b (8-bit CSI) and a truncated UTF-8 sequence
    db.execute('INSERT INTO alerts (kind, subject, level, message, opened, updated) '
               'VALUES (?, ?, ?, CAST(? AS TEXT), ?, ?)',
               ('no-tunnel', h['subject'], 'warning', b'gone \x9b2J and \xe2\x82', now - 9,
                now - 9))
    db.commit()
    db.close()

    out = status_text_bytes(site.dir)
    text = out.decode('utf-8')                      # strict: every byte is UTF-8
    controls = [c for c in text if c != '\n' and (ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f)]
    assert controls == [], controls
    for shown in (r'evil\x1b]0;owned\x07/0', r'c\x1b[2J', r'serving\xc2\x9b31m',
                  r'c\x1b[31mred', r'up\x0d\x0aHOST/9', r'\x1b[8mhidden', r'AB\x7f\x08',
                  r'c\x1bP+q\x1b\: ',
                  'gone \ufffd2J and \ufffd\ufffd'):
        assert shown in text, (shown, text)
    assert 'Zürich-ā/0' in text                     # text is not mangled
    assert 'HOST/9' not in [line.split()[0] for line in text.splitlines() if line.split()]

    doc = status_json(site.dir)                    # strict UTF-8 too: bad bytes as U+FFFD
    assert h['instance'] in [g['instance'] for g in doc['gateways']]
    assert doc['alerts'][0]['message'] == 'gone \ufffd2J and \ufffd\ufffd'
    assert by(doc['gateways'], instance='Zürich-ā/0')['via'] == 'c1'
    row = by(doc['tunnels'], gateway=h['instance'])
    assert (row['connector'], row['gateway_view']) == (h['connector'], h['tunnel_state'])
    assert by(doc['certificates'], kind='reported')['name'] == h['cert_name']


def test_unknown_since(site):
    """A tunnel whose since is 0 or missing has no age: null in the document, '-' in the
    text (not 20000 days)."""
    now = int(time.time())
    db = sqlite3.connect(site.dir / 'site.db')
    db.execute('INSERT INTO gateways VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
               ('HOST/0', 'b' * 16, 1, 'serving', 3, now - 60, now - 5, now - 5, INTERVAL, 1,
                'c1', json.dumps([{'connector': 'c2', 'state': 'up', 'since': 0},
                                  {'connector': 'c3', 'state': 'up'}]), '[]'))
    db.execute('INSERT INTO connector_reports VALUES (?, ?, ?, ?, ?, ?, ?)',
               ('c1', now, now, INTERVAL, 0, 3, json.dumps([
                   {'gateway': '127.0.0.1:1', 'instance': 'HOST/0', 'state': 'up', 'since': 0,
                    'rtt_ms': 0.5, 'reconnects': 0}])))
    db.commit()
    db.close()
    doc = status_json(site.dir)
    assert [(t['connector'], t['since']) for t in doc['tunnels']] == \
        [('c1', None), ('c2', None), ('c3', None)]
    lines = status_text_bytes(site.dir).decode().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith('GATEWAY'))
    for line in lines[header + 1:header + 4]:
        assert line.split()[3] == '-', line


def test_huge_counts(procs, tmp_path, svc):
    """Counters whose sum passes 2^63 (SUM() fails there with "integer overflow"): the
    document, the text and the traffic series are made all the same, the bytes shown in
    EiB."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    now = away_from_midnight()
    big = (1 << 63) - 1
    db = sqlite3.connect(dep.site.dir / 'site.db')
    bucket = now - now % 300
    for instance in ('HOST/0', 'HOST/1'):
        for table, period, when in (('traffic_day', 'day', utc_day(now)),
                                    ('traffic_month', 'month', utc_month(now)),
                                    ('traffic_5m', 'bucket', bucket)):
            traffic_row(db, table, period, instance, ROLE_A, when, requests=big, r2xx=big,
                        request_bytes=big, response_bytes=big)
            traffic_row(db, table, period, instance, '', when, egress_bytes=big)
    db.commit()
    db.close()
    dep.start_site()

    doc = status_json(dep.site.dir)
    assert doc['traffic']['today']['response_bytes'] == pytest.approx(2.0 * big)
    assert doc['egress']['month'] == pytest.approx(2.0 * big)
    assert by(doc['traffic']['month']['roles'], role=ROLE_A)['status']['2xx'] == \
        pytest.approx(2.0 * big)
    text = status_text_bytes(dep.site.dir).decode()
    assert re.search(r'^today +1\d{19} +16 EiB +16 EiB$', text, re.M), text
    assert '16 EiB today (no daily limit set)' in text
    status, api_doc = get(dep, '/v1/status')
    assert status == 200 and api_doc['egress']['today'] == pytest.approx(2.0 * big)
    for range_ in ('day', 'month'):
        status, series = get(dep, f'/v1/traffic?range={range_}')
        assert status == 200, series
        assert series['series'][0]['points'][0][1] == pytest.approx(2.0 * big)
        assert series['egress'][0][1] == pytest.approx(2.0 * big)


def fill_large_site(site_dir, now, instances, connectors, certs, soon):
    """instances gateway instances, each with a tunnel from every one of connectors
    connectors (both sides report it), and certs device certificates of which soon end
    within 30 days; one more of those is revoked, one replaced."""
    db = sqlite3.connect(site_dir / 'site.db')
    db.executemany('INSERT INTO gateways VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)', [
        (f'gw{i:04d}/0', 'b' * 16, 2, 'serving', 1, now - 100, now - i, now - i, 600, 3, 'c00',
         json.dumps([{'connector': f'c{k:02d}', 'peer': f'127.0.0.1:{40000 + k}', 'state': 'up',
                      'since': now - 100} for k in range(connectors)]),
         json.dumps([{'name': 'gateway.crt', 'subject': 'CN=gw', 'serial': 'AA0001',
                      'not_after': now + 86400 * 40}]))
        for i in range(instances)])
    db.executemany('INSERT INTO connector_reports VALUES (?, ?, ?, ?, ?, ?, ?)', [
        (f'c{k:02d}', now, now, 600, 0, 1, json.dumps([
            {'gateway': f'10.0.{i // 250}.{i % 250}:443', 'instance': f'gw{i:04d}/0',
             'state': 'up', 'since': now - 90, 'rtt_ms': 0.5, 'reconnects': 0}
            for i in range(instances)]))
        for k in range(connectors)])
    db.executemany('INSERT INTO certs (serial, name, subject, issued, expires) '
                   'VALUES (?, ?, ?, ?, ?)',
                   [(f'{0x100000 + j:X}', f'd{j}', f'CN=d{j}', now - 86400,
                     now + 3600 + (j * 7 % 29) * 86400 if j < soon else now + 86400 * 365)
                    for j in range(certs)])
    db.executemany('INSERT INTO certs (serial, name, subject, issued, expires, revoked, kind, '
                   'replaced) VALUES (?, ?, ?, ?, ?, ?, ?, ?)',
                   [('EE01', 'revoked', 'CN=r', now, now + 60, now, None, None),
                    ('EE02', 'replaced', 'CN=r', now, now + 60, None, 'gateway', now)])
    db.commit()
    db.close()


def test_large_site(procs, tmp_path, svc):
    """1030 gateway instances x 64 connectors and 100k device certificates (10k ending
    within 30 days): the document is made in linear time (a quadratic one took seconds at
    200 instances), holds the 1024 instances that reported last and the 200 certificates
    that end first, and says how many more there are."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    now = int(time.time())
    fill_large_site(dep.site.dir, now, instances=1030, connectors=64, certs=100_000,
                    soon=10_000)
    dep.start_site()

    started = time.monotonic()
    status, doc = get(dep, '/v1/status')
    took = time.monotonic() - started
    assert status == 200
    print(f'GET /v1/status: {took * 1000:.0f} ms, {len(doc["tunnels"])} tunnel rows, '
          f'site peak RSS {dep.site_proc.peak_rss_kib()} KiB')
    assert took < 10 * SLOW, took
    names = [g['instance'] for g in doc['gateways']]
    assert names == [f'gw{i:04d}/0' for i in range(1024)] and doc['gateways_more'] == 6
    assert len(doc['tunnels']) == 1030 * 64
    row = by(doc['tunnels'], gateway='gw1029/0', connector='c63')
    assert (row['state'], row['gateway_view'], row['connector_view']) == ('up', 'none', 'up')
    certs = doc['certificates']
    assert len(certs) == 200 and doc['certificates_more'] == 10_000 - 200
    assert [c['not_after'] for c in certs] == sorted(c['not_after'] for c in certs)
    assert all(c['kind'] == 'device' and c['days_left'] == 0 for c in certs)
    assert not {'revoked', 'replaced'} & {c['name'] for c in certs}

    started = time.monotonic()
    text = run_cmg('site', 'status', dep.site.dir)
    print(f'cmg site status: {(time.monotonic() - started) * 1000:.0f} ms')
    assert text.returncode == 0, text.stderr
    assert '... and 9990 more (--json lists the soonest of them)' in text.stdout
    assert '... and 6 more instances that reported longer ago' in text.stdout
