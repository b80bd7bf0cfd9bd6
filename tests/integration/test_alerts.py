"""Alerts (issue 13 item 3): `cmg site alert ...` sets the thresholds; a running `cmg site
serve` evaluates them over the report tables and the certificates, records each alert in
site.db's `alerts` table, logs it (log_format = json here, so the lines are read as
objects) and POSTs it to a webhook: a Python HTTP server on loopback in this test that
records every POST.

The reports themselves (gateway -> connector -> site) are another part of issue 13, built
alongside; these tests write what the site would have stored from them straight into
site.db with Python's sqlite3, in the tables and columns of the shared contract
(traffic_day, traffic_month, connector_reports, gateways: created here if the store does
not have them yet), and watch what the site makes of them. A new month cannot be waited
for: the test puts the open critical alert of last month in place before the site starts,
as a site that ran last month leaves it, and sees it resolved and this month's allowance
alerting anew from its own warning."""
import base64
import json
import socket
import sqlite3
import ssl
import threading
import time
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from cmgtest import SANITIZED, SLOW, ini_set, make_cert, poll, run_cmg
from sitetest import Deployment

MB = 1000 * 1000

# The report tables of the contract (the store makes them once the reports are merged).
REPORT_TABLES = """
CREATE TABLE IF NOT EXISTS gateways (instance TEXT PRIMARY KEY, boot TEXT NOT NULL,
  seq INTEGER NOT NULL, state TEXT NOT NULL, policy_version INTEGER NOT NULL,
  started INTEGER NOT NULL, report_time INTEGER NOT NULL, received INTEGER NOT NULL,
  interval INTEGER NOT NULL, devices_now INTEGER NOT NULL, via TEXT NOT NULL,
  tunnels TEXT NOT NULL, certificates TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS connector_reports (connector TEXT PRIMARY KEY,
  received INTEGER NOT NULL, report_time INTEGER NOT NULL, interval INTEGER NOT NULL,
  draining INTEGER NOT NULL, policy_version INTEGER NOT NULL, tunnels TEXT NOT NULL);
"""
TRAFFIC_COLUMNS = """(instance TEXT NOT NULL, role TEXT NOT NULL, {period} {ptype} NOT NULL,
  requests INTEGER NOT NULL DEFAULT 0, r1xx INTEGER NOT NULL DEFAULT 0,
  r2xx INTEGER NOT NULL DEFAULT 0, r3xx INTEGER NOT NULL DEFAULT 0,
  r4xx INTEGER NOT NULL DEFAULT 0, r5xx INTEGER NOT NULL DEFAULT 0,
  rother INTEGER NOT NULL DEFAULT 0, request_bytes INTEGER NOT NULL DEFAULT 0,
  response_bytes INTEGER NOT NULL DEFAULT 0, egress_bytes INTEGER NOT NULL DEFAULT 0,
  ingress_bytes INTEGER NOT NULL DEFAULT 0, device_connections INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (instance, role, {period}))"""


class Receiver:
    """A webhook receiver on loopback: records each POST's JSON body; `hang` keeps every
    request open without an answer (a receiver that accepts and never answers)."""

    def __init__(self, hang=False, tls=None):
        self.posts, self.lock, self.hang = [], threading.Lock(), hang
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                with outer.lock:
                    outer.posts.append({'path': self.path, 'headers': dict(self.headers),
                                        'doc': json.loads(body)})
                if outer.hang:
                    outer.release.wait(30)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server(('127.0.0.1', 0), Handler)
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        scheme = 'https' if tls else 'http'
        self.url = f'{scheme}://127.0.0.1:{self.server.server_address[1]}/hooks/alerts'
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def docs(self, kind=None):
        with self.lock:
            return [p['doc'] for p in self.posts if kind is None or p['doc']['alert']['kind'] == kind]

    def headers(self):
        with self.lock:
            return [p['headers'] for p in self.posts]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class AlertSite:
    """A site directory with `cmg site serve` (json logs), site.db written as reports
    would, and the alerts read back from the store, the log and the webhook."""

    def __init__(self, procs, tmp, svc, report_tables=True):
        self.dep = Deployment(procs, tmp, svc, start=False)
        self.dir = self.dep.site.dir
        ini_set(self.dir / 'site.conf', 'site', 'log_format', 'json')
        self.db_path = self.dir / 'site.db'
        if not report_tables:
            return
        with self.db() as db:
            db.executescript(REPORT_TABLES)
            db.execute('CREATE TABLE IF NOT EXISTS traffic_day ' +
                       TRAFFIC_COLUMNS.format(period='day', ptype='TEXT'))
            db.execute('CREATE TABLE IF NOT EXISTS traffic_month ' +
                       TRAFFIC_COLUMNS.format(period='month', ptype='TEXT'))

    def start(self):
        self.dep.start_site()

    def db(self):
        db = sqlite3.connect(self.db_path, timeout=10, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def cli(self, *args):
        return run_cmg('site', 'alert', *args, '--site', self.dir)

    def egress(self, *rows):
        """Rows (instance, 'month' or 'day', period, egress bytes), in one transaction as
        the site's ingestion writes a report's roll-ups."""
        db = self.db()
        db.execute('BEGIN IMMEDIATE')
        for instance, table, period, egress in rows:
            db.execute(f'INSERT OR REPLACE INTO traffic_{table} (instance, role, {table}, '
                       "egress_bytes) VALUES (?, '', ?, ?)", (instance, period, egress))
        db.execute('COMMIT')
        db.close()

    def connector_report(self, name, received, interval, tunnels, draining=0):
        with self.db() as db:
            db.execute('INSERT OR REPLACE INTO connector_reports VALUES (?, ?, ?, ?, ?, 1, ?)',
                       (name, received, received, interval, draining, json.dumps(tunnels)))

    def gateway_report(self, instance, received, interval, tunnels, certificates=(),
                       state='serving'):
        with self.db() as db:
            db.execute('INSERT OR REPLACE INTO gateways VALUES (?, ?, 1, ?, 1, ?, ?, ?, ?, 0, '
                       "'c1', ?, ?)", (instance, 'b' * 16, state, received - 10, received,
                                       received, interval, json.dumps(tunnels),
                                       json.dumps(list(certificates))))

    def alerts(self, kind=None, open_only=True):
        with self.db() as db:
            rows = [dict(r) for r in db.execute('SELECT * FROM alerts ORDER BY id')]
        return [r for r in rows if (kind is None or r['kind'] == kind) and
                (not open_only or r['resolved'] is None)]

    def log_events(self, msg=None, kind=None):
        found = []
        for line in self.dep.site_proc.log_text().splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if (msg is None or doc.get('msg') == msg) and (kind is None or doc.get('kind') == kind):
                # the line's own level comes first; the alert's level field, later, wins in doc
                doc['log_level'] = json.loads(line[:line.index(',"role"')] + '}')['level']
                found.append(doc)
        return found

    def wait(self, fn, what, timeout=10):
        return poll(fn, timeout * SLOW, what, interval=0.05, check=self.dep.procs.check)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def asite(procs, tmp_path, svc):
    return AlertSite(procs, tmp_path, svc)


def this_month():
    return time.strftime('%Y-%m', time.gmtime())


def last_month():
    t = time.gmtime()
    return f'{t.tm_year - 1}-12' if t.tm_mon == 1 else f'{t.tm_year}-{t.tm_mon - 1:02d}'


def today():
    return time.strftime('%Y-%m-%d', time.gmtime())


def test_egress_warning_then_critical_and_a_new_month(asite, receiver):
    month, day = this_month(), today()
    # Last month's allowance was overrun: its alert is still open when this month begins.
    assert asite.cli('set', 'egress-monthly', '1MB').returncode == 0
    assert asite.cli('set', 'egress-daily', '500000', '--warning', '50',
                     '--critical', '90').returncode == 0
    assert asite.cli('webhook', receiver.url).returncode == 0
    asite.egress(('gw/0', 'month', last_month(), 2 * MB))
    now = int(time.time())
    with asite.db() as db:
        db.execute("INSERT INTO alerts (kind, subject, level, message, value, threshold, opened,"
                   " updated) VALUES ('egress-monthly', ?, 'critical', 'last month', 2000000, "
                   '900000, ?, ?)', (last_month(), now - 86400, now - 86400))
    asite.start()

    # A new month: last month's alert is resolved (and said so), nothing open for this one.
    asite.wait(lambda: not asite.alerts('egress-monthly'), "last month's alert resolved")
    resolved = asite.wait(lambda: receiver.docs('egress-monthly'), 'the resolution POSTed')
    assert resolved[0]['event'] == 'resolved' and resolved[0]['alert']['subject'] == last_month()
    assert resolved[0]['alert']['resolved'] is not None
    assert resolved[0]['site'] == asite.dep.site.name

    # 40 % of the month and 80 % of the day: the day warns, in the same evaluation that
    # finds the month under its warning level.
    asite.egress(('gw/0', 'month', month, 250_000), ('gw/0', 'day', day, 400_000),
                 ('gw/1', 'month', month, 150_000))
    asite.wait(lambda: receiver.docs('egress-daily'), 'the daily warning POSTed')
    assert not asite.alerts('egress-monthly')
    assert [d['event'] for d in receiver.docs('egress-monthly')] == ['resolved']

    # Over 50 % of the month, summed over the instances: one warning.
    asite.egress(('gw/1', 'month', month, 350_000))
    docs = asite.wait(lambda: receiver.docs('egress-monthly')[1:], 'the monthly warning POSTed')
    warning = docs[0]
    assert warning['event'] == 'opened'
    a = warning['alert']
    assert (a['kind'], a['subject'], a['level'], a['value']) == ('egress-monthly', month,
                                                                 'warning', 600_000)
    assert a['threshold'] == 500_000 and a['resolved'] is None
    assert '60 %' in a['message'], a['message']
    [row] = asite.alerts('egress-monthly')
    assert (row['id'], row['level'], row['subject']) == (a['id'], 'warning', month)
    [line] = asite.log_events('alert opened', 'egress-monthly')
    assert (line['log_level'], line['level'], line['subject'], line['value'],
            line['threshold']) == ('warn', 'warning', month, 600_000, 500_000)

    # Over 90 %: the same alert raised to critical, POSTed again.
    asite.egress(('gw/0', 'month', month, 600_000))
    docs = asite.wait(lambda: receiver.docs('egress-monthly')[2:], 'the critical POSTed')
    assert docs[0]['event'] == 'raised'
    assert (docs[0]['alert']['id'], docs[0]['alert']['level']) == (a['id'], 'critical')
    [row] = asite.alerts('egress-monthly')
    assert (row['id'], row['level'], row['value']) == (a['id'], 'critical', 950_000)
    [line] = asite.log_events('alert raised', 'egress-monthly')
    assert (line['log_level'], line['level']) == ('error', 'critical')

    # Open alerts are listed, locally and through the admin API.
    listed = json.loads(asite.cli('list', '--json').stdout)
    assert {(x['kind'], x['level']) for x in listed['alerts']} == {
        ('egress-monthly', 'critical'), ('egress-daily', 'warning')}
    assert listed['settings']['egress_monthly'] == MB
    api = asite.dep.api('POST', '/v1/ops/alert.list', {})
    assert [x['id'] for x in api['alerts']] == [x['id'] for x in listed['alerts']]
    r = asite.cli('list', '--api', f'https://127.0.0.1:{asite.dep.admin_port}')
    assert r.returncode == 0 and 'egress-monthly' in r.stdout and 'critical' in r.stdout, r
    time.sleep(1)   # two more evaluations at least: nothing more to say
    assert len(receiver.docs('egress-monthly')) == 3
    assert len(asite.log_events('alert opened', 'egress-monthly')) == 1


def test_silent_connector_and_gateway_and_no_tunnel(asite, receiver):
    assert asite.cli('set', 'no-tunnel', '2s').returncode == 0
    assert asite.cli('webhook', receiver.url).returncode == 0
    asite.start()
    now = int(time.time())
    up = [{'gateway': '127.0.0.1:10140', 'instance': 'gw/0', 'state': 'up', 'since': now,
           'rtt_ms': 0.4, 'reconnects': 0}]
    asite.connector_report('c1', now, 1, up)       # reports every second
    asite.gateway_report('gw/0', now, 1, [{'connector': 'c1', 'peer': '127.0.0.1:4',
                                           'state': 'up', 'since': now}])
    # c2 reports rarely but has had no tunnel up since it started
    asite.connector_report('c2', now, 300, [dict(up[0], state='connecting', since=now)])

    # Past 2 x its interval without a report: connector-silent, critical; the same for
    # the gateway instance.
    silent = asite.wait(lambda: receiver.docs('connector-silent'), 'connector-silent POSTed')
    assert silent[0]['alert']['subject'] == 'c1' and silent[0]['alert']['level'] == 'critical'
    assert silent[0]['alert']['threshold'] == 2
    elapsed = time.time() - now
    print(f'connector-silent POSTed {elapsed:.2f} s after its last report (interval 1 s)')
    assert elapsed < 2 + 5, f'connector-silent after {elapsed:.1f} s'
    asite.wait(lambda: receiver.docs('gateway-silent'), 'gateway-silent POSTed')
    assert [r['subject'] for r in asite.alerts('connector-silent')] == ['c1']
    assert [line['log_level'] for line in asite.log_events('alert opened', 'connector-silent')] == [
        'error']

    # c2 has been without a tunnel for longer than no-tunnel (2 s).
    nt = asite.wait(lambda: receiver.docs('no-tunnel'), 'no-tunnel POSTed')
    assert nt[0]['alert']['subject'] == 'c2'

    # c1 reports again: resolved, and said so.
    asite.connector_report('c1', int(time.time()), 300, up)
    asite.wait(lambda: [d for d in receiver.docs('connector-silent') if d['event'] == 'resolved'],
               'connector-silent resolved')
    assert not asite.alerts('connector-silent')
    # info lines are written once per loop round: maybe after the POST
    resolved = asite.wait(lambda: asite.log_events('alert resolved', 'connector-silent'),
                          'the resolution logged')
    assert resolved[0]['log_level'] == 'info'
    assert asite.alerts('gateway-silent'), 'the gateway instance is still silent'


def test_cert_expiry(asite, receiver):
    assert asite.cli('webhook', receiver.url).returncode == 0
    asite.start()
    now = int(time.time())
    asite.gateway_report('gw/0', now, 300, [{'connector': 'c1', 'peer': 'x', 'state': 'up',
                                             'since': now}], certificates=[
        {'name': 'gateway.crt', 'subject': 'CN=gw', 'serial': 'AA01', 'not_after': now + 20 * 86400 - 3600},
        {'name': 'short.crt', 'subject': 'CN=short', 'serial': 'BB02', 'not_after': now + 3 * 86400 - 3600},
        {'name': 'long.crt', 'subject': 'CN=long', 'serial': 'CC03', 'not_after': now + 400 * 86400}])
    docs = asite.wait(lambda: len(receiver.docs('cert-expiry')) >= 2 and receiver.docs('cert-expiry'),
                      'two cert-expiry alerts')
    levels = {d['alert']['subject']: (d['alert']['level'], d['alert']['value']) for d in docs}
    assert levels == {'gateway gw/0\'s gateway.crt serial AA01': ('warning', 19),
                      'gateway gw/0\'s short.crt serial BB02': ('critical', 2)}, levels

    # The certificate renewed (the report carries the new one): resolved.
    asite.gateway_report('gw/0', now, 300, [{'connector': 'c1', 'peer': 'x', 'state': 'up',
                                             'since': now}], certificates=[
        {'name': 'short.crt', 'subject': 'CN=short', 'serial': 'BB03', 'not_after': now + 300 * 86400}])
    asite.wait(lambda: not asite.alerts('cert-expiry'), 'cert-expiry resolved')
    # the POSTs follow the store, from another process
    asite.wait(lambda: len(receiver.docs('cert-expiry')) == 4, 'both resolutions POSTed')
    assert sorted(d['event'] for d in receiver.docs('cert-expiry')) == [
        'opened', 'opened', 'resolved', 'resolved']


def test_cert_expiry_of_the_store_without_reports(procs, tmp_path, svc):
    # A store without the report tables: the certificates the site issued are watched all
    # the same (connector certificates live 730 days, the site's devices 365).
    asite = AlertSite(procs, tmp_path, svc, report_tables=False)
    assert asite.cli('set', 'cert-expiry', '800d').returncode == 0
    asite.start()
    subjects = asite.wait(lambda: [a['subject'] for a in asite.alerts('cert-expiry')],
                          'store certificates alerting')
    assert any(s.startswith('connector ') for s in subjects), subjects
    assert all(a['level'] == 'warning' for a in asite.alerts('cert-expiry'))
    assert asite.cli('set', 'cert-expiry', '30').returncode == 0
    asite.wait(lambda: not asite.alerts('cert-expiry'), 'resolved under a 30-day threshold')
    assert not asite.log_events('alerts: cannot read the open alerts')


def closed_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_webhook_down_and_hanging(asite):
    url = f'http://hookuser:s3cr3t@127.0.0.1:{closed_port()}/secret-path?token=t0ps3cr3t'
    assert asite.cli('webhook', url).returncode == 0
    assert asite.cli('set', 'egress-daily', '1000').returncode == 0
    asite.start()
    asite.egress(('gw/0', 'day', today(), 2000))
    failed = asite.wait(lambda: asite.log_events('alert webhook failed after 2 tries: the alert '
                                                 'stays recorded and logged; this notification '
                                                 'is dropped'), 'the failure logged')
    assert failed[0]['kind'] == 'egress-daily' and 'refused' in failed[0]['error'], failed[0]
    log = asite.dep.site_proc.log_text()
    assert 's3cr3t' not in log and 'secret-path' not in log and 'hookuser' not in log
    assert asite.alerts('egress-daily'), 'the alert is recorded all the same'
    assert asite.dep.api('GET', '/v1/status')['service_name'] == asite.dep.site.name

    # A receiver that accepts and never answers: the site goes on serving meanwhile, and
    # past 100 waiting notifications the oldest are dropped, each said.
    hang = Receiver(hang=True)
    try:
        assert asite.cli('webhook', hang.url).returncode == 0
        now = int(time.time())
        certs = [{'name': f'c{i}.crt', 'subject': 'CN=x', 'serial': f'{i:04X}',
                  'not_after': now + 86400} for i in range(130)]
        asite.gateway_report('gw/0', now, 300, [{'connector': 'c1', 'peer': 'x', 'state': 'up',
                                                 'since': now}], certificates=certs)
        asite.wait(lambda: hang.docs('cert-expiry'), 'the hanging receiver reached')
        t0 = time.monotonic()
        for _ in range(5):
            assert asite.dep.api('GET', '/v1/status')['service_name'] == asite.dep.site.name
        took = time.monotonic() - t0
        print(f'5 admin API requests while the webhook hangs: {took:.3f} s')
        assert took < 2 * SLOW
        def drops():
            return asite.log_events('alert webhook queue full: the oldest waiting notification '
                                    'is dropped (the alert stays recorded)')
        asite.wait(lambda: len(drops()) >= 130 - 100, 'drops logged')
        assert len(drops()) == 130 - 100 and drops()[0]['queue'] == 100
        assert len(asite.alerts('cert-expiry')) == 130
        rss = asite.dep.site_proc.peak_rss_kib()
        print(f'site peak RSS with 100 notifications waiting: {rss} KiB')
        assert SANITIZED or rss < 64 * 1024, f'site peak RSS {rss} KiB'
    finally:
        hang.close()


def test_webhook_https_checked_against_its_ca(asite, tmp_path):
    ca_cert, ca_key, (ca, _) = make_cert(tmp_path / 'hook-ca', 'Webhook CA', ca=True)
    _, _, (crt, key) = make_cert(tmp_path / 'hook', '127.0.0.1', ca_cert, ca_key,
                                 eku=(ExtendedKeyUsageOID.SERVER_AUTH,), san=('127.0.0.1',))
    receiver = Receiver(tls=(crt, key))
    try:
        url = receiver.url.replace('https://', 'https://ops:pa55word@')
        assert asite.cli('webhook', url).returncode == 0
        assert asite.cli('set', 'egress-daily', '1000').returncode == 0
        asite.start()
        # Not a root of the system: refused, logged, nothing POSTed.
        asite.egress(('gw/0', 'day', today(), 600))
        failed = asite.wait(lambda: asite.log_events('alert webhook failed after 2 tries: the '
                                                     'alert stays recorded and logged; this '
                                                     'notification is dropped'), 'the failure')
        assert 'certificate' in failed[0]['error'], failed[0]
        assert not receiver.docs() and 'pa55word' not in asite.dep.site_proc.log_text()

        # With --ca FILE (through the admin API this time, as the PEM text): delivered, with
        # the URL's user information as Basic authentication.
        asite.dep.api('POST', '/v1/ops/alert.webhook', {'url': url, 'ca': ca.read_text()})
        asite.egress(('gw/0', 'day', today(), 2000))
        [doc] = asite.wait(receiver.docs, 'the critical alert POSTed over https')
        assert (doc['event'], doc['alert']['level']) == ('raised', 'critical')
        assert receiver.headers()[0]['Authorization'] == 'Basic ' + base64.b64encode(
            b'ops:pa55word').decode()
        assert receiver.headers()[0]['Content-Type'] == 'application/json'
    finally:
        receiver.close()


def test_admin_api_errors(asite):
    asite.start()
    for op, body, expected in (
            ('alert.set', {'name': 'egress-monthly', 'value': 'lots'}, 'expected a size'),
            ('alert.set', {'name': 'egress-monthly', 'value': '1GB', 'warning': 95},
             'found warning 95 % and critical 90 %'),
            ('alert.unset', {'name': 'nope'}, "unknown threshold 'nope'"),
            ('alert.webhook', {'url': 'https://x.test/', 'ca': 'not PEM'}, 'expected PEM')):
        with pytest.raises(urllib.error.HTTPError) as e:
            asite.dep.api('POST', f'/v1/ops/{op}', body)
        assert e.value.code == 400 and expected in json.loads(e.value.read())['error'], op
    ok = asite.dep.api('POST', '/v1/ops/alert.set', {'name': 'egress-monthly', 'value': 5000,
                                                     'warning': 60, 'critical': 80})
    assert (ok['settings']['egress_monthly'], ok['settings']['warning_pct']) == (5000, 60)


@pytest.mark.parametrize('args,expected', [
    (('set', 'egress-monthly', '10XB'), "expected a size such as 100GiB"),
    (('set', 'egress-monthly', '5 parsecs'), "found '5 parsecs'"),
    (('set', 'egress-daily', '5GiB', '--warning', '90', '--critical', '80'),
     'expected 0 < warning < critical <= 100, found warning 90 % and critical 80 %'),
    (('set', 'egress-daily', '5GiB', '--warning', '50', '--critical', '50'),
     'found warning 50 % and critical 50 %'),
    (('set', 'egress-daily', '5GiB', '--critical', '101'), 'expected a whole percentage 1..100'),
    (('set', 'bandwidth', '5GiB'), "unknown threshold 'bandwidth': expected egress-monthly"),
    (('unset', 'bandwidth'), "unknown threshold 'bandwidth'"),
    (('set', 'no-tunnel', '10 minutes'), 'expected a duration such as 30s, 10m or 1h'),
    (('set', 'cert-expiry', 'soon'), 'expected a number of days'),
    (('webhook', 'ftp://example.test/x'), 'expected an http:// or https:// URL'),
    (('webhook',), 'expected a URL or --off'),
])
def test_cli_errors(asite, args, expected):
    r = asite.cli(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert expected in r.stderr, r.stderr
    listed = json.loads(asite.cli('list', '--json').stdout)['settings']
    assert listed == {'egress_monthly': None, 'egress_daily': None, 'warning_pct': 50,
                      'critical_pct': 90, 'cert_expiry_days': 30, 'no_tunnel': 600,
                      'webhook': None, 'webhook_ca': False}


def test_cli_sizes_and_help(asite):
    for given, stored in (('100GiB', 100 << 30), ('5GB', 5 * 10**9), ('1024', 1024),
                          ('3KiB', 3072), ('7MB', 7 * MB), ('2TiB', 2 << 40), ('9B', 9)):
        r = asite.cli('set', 'egress-monthly', given, '--json')
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)['settings']['egress_monthly'] == stored, given
    for given, stored in (('30s', 30), ('10m', 600), ('1h', 3600), ('15', 900)):
        r = asite.cli('set', 'no-tunnel', given, '--json')
        assert json.loads(r.stdout)['settings']['no_tunnel'] == stored, given
    r = asite.cli('unset', 'egress-monthly', '--json')
    assert json.loads(r.stdout)['settings']['egress_monthly'] is None
    for args in (('--help',), ('set', '--help')):
        r = asite.cli(*args)
        assert r.returncode == 0 and 'alert set egress-monthly SIZE' in r.stdout
