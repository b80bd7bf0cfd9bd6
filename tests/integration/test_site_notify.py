"""The site's side of client notifications (issue 14): `cmg site notify`, the connectors'
notify feed and the gateways' notify reports. The real `cmg site serve` runs; the test
plays the connector with Python's ssl and the connector certificate the site made: it
polls GET /v1/connector/notify on the feed listener and POSTs notify reports as a
connector relays a gateway's. What the site counts (`notify status`, `device list`) is
read through the commands, and what it kept (or refused to keep) from site.db."""
import http.client
import json
import sqlite3
import ssl
import threading
import time

import pytest

from cmgtest import SLOW, free_port_range, ini_set, poll, run_cmg
from sitetest import Deployment

INTERVAL = 3           # site.conf report_interval: a silent instance's channels close after 6 s
BOOT_A = '0123456789abcdef'
BOOT_B = 'fedcba9876543210'
CERT_ID = 'cert:' + 'ab' * 32


@pytest.fixture
def dep(procs, tmp_path, svc):
    d = Deployment(procs, tmp_path, svc, start=False)
    ini_set(d.site.dir / 'site.conf', 'site', 'report_interval', INTERVAL)
    d.start_site()
    return d


# ---------------------------------------------------------------- the test's connector

def connector_context(dep, name='connector'):
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    ctx.load_cert_chain(str(dep.site.dir / f'{name}.crt'), str(dep.site.dir / f'{name}.key'))
    return ctx


def feed_request(dep, method, path, body=None, timeout=40, ctx=None):
    conn = http.client.HTTPSConnection('127.0.0.1', dep.feed_port, timeout=timeout * SLOW,
                                       context=ctx or connector_context(dep))
    try:
        headers = {'Content-Type': 'application/json'} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.getheader('Content-Type'), r.read()
    finally:
        conn.close()


def notify_feed(dep, after=None, **kw):
    path = '/v1/connector/notify' + (f'?after={after}' if after is not None else '')
    status, ctype, body = feed_request(dep, 'GET', path, **kw)
    assert status == 200, (status, body)
    assert ctype == 'application/json'
    return json.loads(body)


def report(dep, delivered=None, opened=(), closed=(), instance='gw-1', boot=BOOT_A, seq=1,
           raw=None):
    doc = {'instance': instance, 'boot': boot, 'seq': seq, 'time': int(time.time()),
           'delivered': delivered or {}, 'opened': list(opened), 'closed': list(closed)}
    body = raw if raw is not None else json.dumps(doc).encode()
    status, _, text = feed_request(dep, 'POST', '/v1/connector/notify-report', body=body)
    return status, text


class Reporter:
    """One gateway boot's notify reports, numbered from 1."""

    def __init__(self, dep, instance='gw-1', boot=BOOT_A):
        self.dep, self.instance, self.boot, self.seq = dep, instance, boot, 0

    def send(self, **kw):
        self.seq += 1
        status, text = report(self.dep, instance=self.instance, boot=self.boot, seq=self.seq, **kw)
        assert status == 204, (status, text)


# ---------------------------------------------------------------- the commands

def notify(dep, *args, api=False, check=True):
    extra = ['--api', f'https://127.0.0.1:{dep.admin_port}'] if api else []
    r = run_cmg('site', 'notify', dep.site.dir, *args, *extra)
    if check:
        assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r


def notify_json(dep, *args, **kw):
    return json.loads(notify(dep, *args, '--json', **kw).stdout)


def status(dep, nid):
    return notify_json(dep, 'status', nid)


def db_rows(dep, sql, *args):
    with sqlite3.connect(f'file:{dep.site.dir / "site.db"}?mode=ro', uri=True, timeout=10) as c:
        return c.execute(sql, args).fetchall()


def devices(dep):
    r = dep.cmg_site('device', 'list', '--json')
    return {d['id']: d for d in json.loads(r.stdout)}


# ---------------------------------------------------------------- the feed

def test_held_feed_answers_at_once_with_the_document(dep):
    first = notify_feed(dep)                      # the first call: the epoch, at once
    epoch = first['epoch']
    assert len(epoch) == 16 and int(epoch, 16) >= 0 and epoch == epoch.lower()
    assert first == {'epoch': epoch, 'last': 0, 'notifications': [], 'more': False}

    got = {}

    def hold(after=f'{epoch}-0'):
        t0 = time.monotonic()
        got['doc'] = notify_feed(dep, after)
        got['at'] = time.monotonic()
        got['held'] = got['at'] - t0

    waiter = threading.Thread(target=hold)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), 'a feed request at the newest seq is held'
    sent = notify_json(dep, '--device', 'dev-1', '--device', CERT_ID, '--type', 'policy',
                       '--data', '{"k": [1, "two"]}', api=True)
    done = time.monotonic()
    waiter.join(10 * SLOW)
    assert not waiter.is_alive()
    print(f'held feed answered {1000 * (got["at"] - done):.1f} ms after the API call returned '
          f'(held {got["held"]:.2f} s)')
    assert got['at'] - done < 1.0 * SLOW
    assert sent['id'] == f'{epoch}-1' and sent['seq'] == 1 and sent['targets'] == 2
    doc = got['doc']
    assert doc['epoch'] == epoch and doc['last'] == 1 and doc['more'] is False
    (n,) = doc['notifications']
    assert n == {'id': f'{epoch}-1', 'seq': 1, 'type': 'policy', 'data': {'k': [1, 'two']},
                 'created': n['created'], 'expires': n['created'] + 3600,
                 'devices': sorted(['dev-1', CERT_ID])}
    assert n['expires'] == sent['expires']

    # a notification made by the command on the site directory (not the API) wakes it too
    waiter = threading.Thread(target=hold, args=(f'{epoch}-1',))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    notify(dep, '--all', '--type', 'compliance')
    waiter.join(10 * SLOW)
    (n,) = got['doc']['notifications']
    assert n['seq'] == 2 and n['all'] is True and n['data'] is None and 'devices' not in n


def test_sequence_contiguous_tombstones_and_window_start(dep):
    epoch = notify_feed(dep)['epoch']
    notify(dep, '--device', 'a', '--type', 'script', '--ttl', '1s')
    notify(dep, '--device', 'b', '--type', 'script', '--data', '"x"', '--ttl', '90s')
    notify(dep, '--all', '--type', 'policy', '--ttl', '2h')
    time.sleep(2.1)                               # the first one expires
    doc = notify_feed(dep, f'{epoch}-0')
    seqs = [n['seq'] for n in doc['notifications']]
    assert seqs == [1, 2, 3] and doc['last'] == 3
    assert doc['notifications'][0] == {'id': f'{epoch}-1', 'seq': 1, 'expired': True}
    second = doc['notifications'][1]
    assert second['expires'] - second['created'] == 90 and second['data'] == 'x'
    assert doc['notifications'][2]['expires'] - doc['notifications'][2]['created'] == 7200
    assert [n['seq'] for n in notify_feed(dep, f'{epoch}-2')['notifications']] == [3]
    # absent, another epoch: from the oldest kept (beyond last is held: a store restored
    # from a backup, test_notify_hardening.py)
    for after in (None, '', '0000000000000000-2'):
        assert [n['seq'] for n in notify_feed(dep, after)['notifications']] == [1, 2, 3], after


def test_malformed_after_is_400(dep):
    epoch = notify_feed(dep)['epoch']
    for after in ('xyz', f'{epoch}-01', f'{epoch.upper()}-1', f'{epoch}-', f'{epoch}1',
                  f'{epoch[:15]}-1', f'{epoch}--1', f'{epoch}-1x', f'{epoch}-%20', '1'):
        status, _, body = feed_request(dep, 'GET', f'/v1/connector/notify?after={after}')
        assert status == 400, (after, status, body)
        assert 'EPOCH-SEQ' in json.loads(body)['error']


def test_feed_splits_at_8_mib_with_more(dep, tmp_path):
    epoch = notify_feed(dep)['epoch']
    ids = [f'cert:{i:064x}' for i in range(48000)]       # 3.5 MB of ids: under 4 MiB
    listing = tmp_path / 'devices.txt'
    listing.write_text('# the fleet\n\n' + '\n'.join(ids) + '\n')
    for _ in range(3):
        assert 'device(s)' in notify(dep, '--devices', listing, '--type', 'policy').stdout
    doc = notify_feed(dep, f'{epoch}-0')
    assert [n['seq'] for n in doc['notifications']] == [1, 2] and doc['more'] is True
    assert doc['notifications'][0]['devices'] == sorted(ids)
    doc = notify_feed(dep, f'{epoch}-2')
    assert [n['seq'] for n in doc['notifications']] == [3] and doc['more'] is False
    print(f'3 notifications of 48,000 ids: answers of 2 and 1; site peak RSS '
          f'{dep.site_proc.peak_rss_kib() / 1024:.1f} MiB')

    too_many = tmp_path / 'more.txt'
    too_many.write_text('\n'.join(f'cert:{i:064x}' for i in range(60000)))
    r = notify(dep, '--devices', too_many, '--type', 'policy', check=False)
    assert r.returncode == 2
    assert 'too many devices for one notification' in r.stderr and 'use --all' in r.stderr
    assert notify_feed(dep)['last'] == 3


def test_revoked_connector_is_refused(dep):
    dep.cmg_site('connector', 'add', 'c2')
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    ctx.load_cert_chain(str(dep.site.dir / 'connectors/c2.crt'),
                        str(dep.site.dir / 'connectors/c2.key'))
    assert feed_request(dep, 'GET', '/v1/connector/notify', ctx=ctx)[0] == 200
    dep.cmg_site('connector', 'revoke', 'c2')
    assert feed_request(dep, 'GET', '/v1/connector/notify', ctx=ctx)[0] == 403
    assert feed_request(dep, 'POST', '/v1/connector/notify-report', body=b'{}', ctx=ctx)[0] == 403


# ---------------------------------------------------------------- reports and counts

def test_status_counts_resend_missed_and_replay(dep):
    gw = Reporter(dep)
    sent = notify_json(dep, '--device', 'd1', '--device', 'd2', '--device', 'd3', '--device',
                       'd4', '--type', 'script', '--data', '{"run": "inventory"}')
    nid = sent['id']
    gw.send(delivered={nid: ['d1', 'd2', 'd3', 'not-a-target']})
    st = status(dep, nid)
    assert (st['targets'], st['delivered'], st['waiting'], st['expired']) == (4, 3, 1, 0)
    assert st['type'] == 'script' and st['id'] == nid
    text = notify(dep, 'status', nid).stdout.strip()
    assert text == f'notification {nid} (script): 3 delivered, 1 waiting, 0 expired of 4 device(s)'

    # a replay of the same (instance, boot, seq) is answered 204 and ignored
    status_code, _ = report(dep, delivered={nid: ['d4']}, seq=gw.seq)
    assert status_code == 204
    assert status(dep, nid)['delivered'] == 3

    epoch = nid.split('-')[0]
    r = notify(dep, '--resend', nid, '--missed')
    assert r.stdout.strip() == f'notification {epoch}-2: 1 device(s) (resend of {nid})'
    doc = notify_feed(dep, f'{epoch}-1')
    (again,) = doc['notifications']
    assert again['devices'] == ['d4'] and again['type'] == 'script'
    assert again['data'] == {'run': 'inventory'}

    gw.send(delivered={nid: ['d4'], f'{epoch}-2': ['d4'], f'{epoch}-99': ['d9'],
                       f'{"0" * 16}-1': ['d5']})   # unknown seqs and epochs: ignored
    assert status(dep, nid)['delivered'] == 4
    r = notify(dep, '--resend', nid, '--missed')
    assert r.stdout.strip() == 'nothing to resend: every target has it'
    assert db_rows(dep, 'SELECT count(*) FROM notify_delivered WHERE seq > 2') == [(0,)]

    # expired: the targets without a delivery once the TTL is over
    short = notify_json(dep, '--device', 'x', '--device', 'y', '--type', 'policy',
                        '--ttl', '1')['id']
    gw.send(delivered={short: ['x']})
    time.sleep(1.2)
    st = status(dep, short)
    assert (st['delivered'], st['waiting'], st['expired']) == (1, 0, 1)
    listing = notify_json(dep, 'list')
    assert [n['id'] for n in listing][:2] == [short, f'{epoch}-2']


def test_resend_missed_refused_once_the_rows_are_past_retention(dep):
    gw = Reporter(dep)
    nid = notify_json(dep, '--device', 'r1', '--device', 'r2', '--type', 'script')['id']
    gw.send(delivered={nid: ['r1']})
    # eight days old: past notify_retention (7d), its per-device rows may be pruned
    with sqlite3.connect(str(dep.site.dir / 'site.db'), timeout=10) as c:
        c.execute('UPDATE notifications SET created = created - 8 * 86400 WHERE seq = ?',
                  (int(nid.split('-')[1]),))
    last = notify_json(dep, 'list')[0]['id']
    r = notify(dep, '--resend', nid, '--missed', check=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert 'notify_retention' in r.stderr and nid in r.stderr
    assert notify_json(dep, 'list')[0]['id'] == last          # nothing was sent


def test_late_delivery_adds_to_the_final_counts(dep):
    gw = Reporter(dep)
    nid = notify_json(dep, '--device', 'l1', '--device', 'l2', '--type', 'script')['id']
    gw.send(delivered={nid: ['l1']})
    # over for more than a minute: the next status makes its counts final
    with sqlite3.connect(str(dep.site.dir / 'site.db'), timeout=10) as c:
        c.execute('UPDATE notifications SET created = created - 7200, expires = expires - 7200'
                  ' WHERE seq = ?', (int(nid.split('-')[1]),))
    st = status(dep, nid)
    assert (st['delivered'], st['expired']) == (1, 1)
    assert db_rows(dep, 'SELECT final_delivered FROM notifications WHERE seq = ?',
                   int(nid.split('-')[1])) == [(1,)]
    gw.send(delivered={nid: ['l2']})          # a gateway's report that came late
    st = status(dep, nid)
    assert (st['delivered'], st['expired']) == (2, 0)
    r = notify(dep, '--resend', nid, '--missed')
    assert r.stdout.strip() == 'nothing to resend: every target has it'


def test_all_is_a_snapshot_of_the_devices_known(dep):
    gw = Reporter(dep)
    before = status(dep, notify_json(dep, '--all', '--type', 'policy')['id'])['targets']
    gw.send(opened=['p1', 'p2'])
    time.sleep(1.1)                               # first seen before the next one is made
    sent = notify_json(dep, '--all', '--type', 'policy')
    assert sent['targets'] == 'all'
    assert notify(dep, '--all', '--type', 'x').stdout.startswith('notification ')
    assert ': all devices' in notify(dep, '--all', '--type', 'x').stdout
    time.sleep(1.1)
    gw.send(opened=['p3'], delivered={sent['id']: ['p1', 'p3']})   # p3 came after: not a target
    st = status(dep, sent['id'])
    assert st['targets'] == before + 2 and st['delivered'] == 1
    r = notify_json(dep, '--resend', sent['id'], '--missed')
    assert r['targets'] == before + 1
    epoch = sent['id'].split('-')[0]
    doc = notify_feed(dep, f'{epoch}-{r["seq"] - 1}')
    (again,) = doc['notifications']
    assert 'p2' in again['devices'] and 'p1' not in again['devices']
    assert 'p3' not in again['devices']


def test_channels_in_device_list(dep):
    gw = Reporter(dep)
    gw.send(opened=['oidc-dev', CERT_ID])
    listed = devices(dep)
    assert listed['oidc-dev']['channel'] == 'open' and listed[CERT_ID]['channel'] == 'open'
    assert abs(listed['oidc-dev']['last_seen'] - time.time()) < 5
    closed_at = int(time.time()) - 30
    gw.send(closed=[['oidc-dev', closed_at]])
    listed = devices(dep)
    assert listed['oidc-dev']['channel'] == 'closed'
    assert listed['oidc-dev']['last_seen'] >= closed_at
    text = dep.cmg_site('device', 'list').stdout
    assert 'last_seen' in text.splitlines()[0] and 'channel' in text.splitlines()[0]

    # a new boot of the instance: its older boots' channels are gone
    Reporter(dep, boot=BOOT_B).send()
    assert devices(dep)[CERT_ID]['channel'] == 'closed'

    # an instance that stops reporting: its channels are no longer open
    gw2 = Reporter(dep, instance='gw-2')
    gw2.send(opened=['moving'])
    assert devices(dep)['moving']['channel'] == 'open'
    # a close from another instance does not close the channel held here
    Reporter(dep, instance='gw-3').send(closed=[['moving', int(time.time())]])
    assert devices(dep)['moving']['channel'] == 'open'
    poll(lambda: devices(dep)['moving']['channel'] == 'closed', 2 * INTERVAL + 5 * SLOW,
         'a silent instance\'s channel to count as closed')


# ---------------------------------------------------------------- hostile input

# (entries individually bad, such as a device id of 128 bytes, are skipped and the rest
# kept: test_notify_hardening.py)
HOSTILE = {
    'not JSON': b'{"instance":',
    'not an object': b'[1, 2]',
    'trailing garbage': json.dumps({'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1}).encode()
    + b' x',
    'seq a string': {'instance': 'g', 'boot': BOOT_A, 'seq': '1', 'time': 1},
    'seq zero': {'instance': 'g', 'boot': BOOT_A, 'seq': 0, 'time': 1},
    'seq fraction': {'instance': 'g', 'boot': BOOT_A, 'seq': 1.5, 'time': 1},
    'instance a number': {'instance': 5, 'boot': BOOT_A, 'seq': 1, 'time': 1},
    'instance empty': {'instance': '', 'boot': BOOT_A, 'seq': 1, 'time': 1},
    'instance too long': {'instance': 'g' * 300, 'boot': BOOT_A, 'seq': 1, 'time': 1},
    'boot upper case': {'instance': 'g', 'boot': BOOT_A.upper(), 'seq': 1, 'time': 1},
    'no time': {'instance': 'g', 'boot': BOOT_A, 'seq': 1},
    'delivered a list': {'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1, 'delivered': []},
    'delivered numbers': {'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1,
                          'delivered': {'0123456789abcdef-1': [1, 2]}},
    'closed flat': {'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1, 'closed': ['d', 1]},
    'closed no time': {'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1,
                       'closed': [['d', 'now']]},
    '200k ids': {'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1,
                 'opened': [chr(0x41 + i % 26) for i in range(200000)]},
}


def test_hostile_reports_are_refused_and_nothing_is_kept(dep):
    for name, doc in HOSTILE.items():
        body = doc if isinstance(doc, bytes) else json.dumps(doc, ensure_ascii=False).encode()
        status_code, text = report(dep, raw=body)
        assert status_code == 400, (name, status_code, text)
        assert json.loads(text)['error'], name
    # more than the 1 MiB a report may have: refused before it is parsed
    big = json.dumps({'instance': 'g', 'boot': BOOT_A, 'seq': 1, 'time': 1,
                      'opened': ['d' * 100] * 11000}).encode()
    assert len(big) > 1 << 20
    try:
        status_code, _ = report(dep, raw=big)
    except (ConnectionError, ssl.SSLError):   # 413 and closed while the body was being sent
        status_code = None
    assert status_code in (413, None)
    for table in ('notify_boots', 'device_seen', 'notify_delivered'):
        assert db_rows(dep, f'SELECT count(*) FROM {table}') == [(0,)], table
    # the site is whole and still takes a good report
    Reporter(dep).send(opened=['fine'])
    assert devices(dep)['fine']['channel'] == 'open'


# ---------------------------------------------------------------- the command line

def test_command_line_errors(dep):
    epoch = notify_feed(dep)['epoch']
    usage = [
        ((), 'one of devices'),
        (('--type', 'policy'), 'one of devices'),
        (('--all', '--device', 'a', '--type', 'policy'), 'one of devices'),
        (('--all',), 'type:'),
        (('--all', '--type', 'reset'), 'type:'),
        (('--all', '--type', 'bad type'), 'type:'),
        (('--all', '--type', 't' * 65), 'type:'),
        (('--all', '--type', 'policy', '--data', '{nope'), '--data'),
        (('--all', '--type', 'policy', '--data', '"' + 'x' * 17000 + '"'), 'data:'),
        (('--all', '--type', 'policy', '--ttl', '0'), 'ttl:'),
        (('--all', '--type', 'policy', '--ttl', '25h'), 'ttl:'),
        (('--all', '--type', 'policy', '--ttl', '1d'), 'ttl:'),
        (('--device', 'a b', '--type', 'policy'), 'devices[0]'),
        (('--device', 'd' * 128, '--type', 'policy'), 'devices[0]'),
        (('status',), 'ID is needed'),
        (('status', 'nope'), 'EPOCH-SEQ'),
        (('--resend', f'{epoch}-1'), '--missed'),
        (('--resend', f'{epoch}-1', '--missed', '--all'), 'takes its targets'),
        (('bogus',), 'unexpected argument'),
    ]
    for args, words in usage:
        r = notify(dep, *args, check=False)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert words in r.stderr, (args, r.stderr)
    refused = [
        (('status', f'{epoch}-7'), f'no notification {epoch}-7'),
        (('status', '0123456789abcdef-1'), 'epoch'),
        (('--resend', f'{epoch}-7', '--missed'), 'no notification'),
    ]
    if epoch == '0123456789abcdef':
        refused.pop(1)
    for args, words in refused:
        r = notify(dep, *args, check=False)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert words in r.stderr, (args, r.stderr)
    # through the API: the same answers
    r = notify(dep, '--all', '--type', 'reset', api=True, check=False)
    assert r.returncode == 2 and 'type:' in r.stderr
    r = notify(dep, 'status', f'{epoch}-7', api=True, check=False)
    assert r.returncode == 1 and 'no notification' in r.stderr
    # --devices from standard input, with comments and blank lines
    import subprocess
    from cmgtest import CMG
    p = subprocess.run([CMG, 'site', 'notify', str(dep.site.dir), '--devices', '-', '--type',
                        'policy'], input='# two\n\nd1\r\n  d2  \nd1\n', capture_output=True,
                       text=True, timeout=30 * SLOW)
    assert p.returncode == 0 and p.stdout.strip() == f'notification {epoch}-1: 2 device(s)'
    h = run_cmg('site', 'notify', '--help')
    assert h.returncode == 0 and '--resend ID --missed' in h.stdout and '--ttl' in h.stdout


# ---------------------------------------------------------------- scale

def test_all_with_100k_known_devices(dep):
    """notify --all returns at once however many devices the site knows; notify status
    counts them when asked."""
    for part in range(2):
        Reporter(dep, instance=f'gw-{part}').send(
            opened=[f'dev-{part}-{i:05d}' for i in range(50000)])
    t0 = time.monotonic()
    sent = notify_json(dep, '--all', '--type', 'policy')
    t_send = time.monotonic() - t0
    t0 = time.monotonic()
    st = status(dep, sent['id'])
    t_status = time.monotonic() - t0
    print(f'notify --all with {st["targets"]} devices known: {t_send * 1000:.0f} ms; '
          f'notify status: {t_status * 1000:.0f} ms; site peak RSS '
          f'{dep.site_proc.peak_rss_kib() / 1024:.1f} MiB')
    assert st['targets'] >= 100000 and st['waiting'] == st['targets']
    assert t_send < 5 * SLOW and t_status < 10 * SLOW
