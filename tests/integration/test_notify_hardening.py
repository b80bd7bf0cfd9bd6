"""Notifications under hostile or heavy input and after operator mistakes (issue 14
review): `device list` over 50,000 devices and hundreds of gateway boots in one
set-based query, with pages; what a forged notify report can add to site.db; a site
store restored from a backup (the feed holds a connector ahead of it, the connector
starts again from the site's last instead of polling in a loop, `cmg site notify
new-epoch`); `cmg client listen` after a stream cut mid-event, with a corrupt saved id, a
gateway that ends channels at once with `retry: 0`, and stale temporary files. The real
`cmg site serve` runs and the test plays the connector (see
test_site_notify.py), or the real connector runs against the stand-in site of
test_connector_notify.py, or the client against the SSE stand-in of
test_client_listen.py."""
import json
import sqlite3
import threading
import time

from cmgtest import SLOW, poll
from test_client_listen import (CMG, chunk, events, listen_argv, lines, make_state,  # noqa: F401
                                run_listen, server, start_stream)
from fakegateway import FakeGateway
from test_connector_notify import EPOCH, setup, start  # noqa: F401
from test_site_notify import (BOOT_A, Reporter, connector_context, db_rows, dep,  # noqa: F401
                              notify, notify_feed, notify_json, report, status)


def db_write(dep, sql, rows):
    with sqlite3.connect(str(dep.site.dir / 'site.db'), timeout=10) as c:
        c.executemany(sql, rows)


def device_page(dep, **args):
    return dep.api('POST', '/v1/ops/device.list', args)


def test_device_list_is_one_query_and_pages(dep):
    """50,000 devices seen on channels and 250 gateway boots: `device list` answers in
    one pass (the old per-device query took tens of seconds); pages with limit/after
    walk the whole list once, in order."""
    for part in range(2):
        Reporter(dep, instance=f'gw-{part}').send(
            opened=[f'dev-{part}-{i:05d}' for i in range(25000)])
    now = int(time.time())
    db_write(dep, 'INSERT INTO notify_boots (instance, boot, seq, received) VALUES (?, ?, 1, ?)',
             [(f'forged-{i}', f'{i:016x}', now) for i in range(250)])
    t0 = time.monotonic()
    r = dep.cmg_site('device', 'list', '--json')
    took = time.monotonic() - t0
    listed = json.loads(r.stdout)
    print(f'device list: {len(listed)} devices, 250 boots: {took * 1000:.0f} ms')
    assert len(listed) == 50000
    assert all(d['channel'] == 'open' for d in listed)
    assert took < 5 * SLOW

    seen, after, pages = [], None, 0
    while True:
        page = device_page(dep, limit=20000, **({'after': after} if after else {}))
        if not page:
            break
        pages += 1
        seen += [d['id'] for d in page]
        after = page[-1]['id']
    assert pages == 3 and seen == [d['id'] for d in listed]
    assert 'limit' in bad_op(dep, 'device.list', {'limit': 0})
    assert 'after' in bad_op(dep, 'device.list', {'after': 'a b'})


def bad_op(dep, op, args):
    import urllib.error
    try:
        dep.api('POST', f'/v1/ops/{op}', args)
    except urllib.error.HTTPError as e:
        assert e.code == 400
        return json.loads(e.read())['error']
    raise AssertionError(f'{op} {args} accepted')


def test_report_keeps_only_deliveries_to_targets(dep):
    """A delivery is kept for a target of the notification only (for --all: a device the
    site knows); made-up ids in a report are skipped, the report still 204."""
    one = notify_json(dep, '--device', 'target-1', '--type', 'policy')
    everyone = notify_json(dep, '--all', '--type', 'policy')
    forged = [f'forged-{i:05d}' for i in range(5000)]
    gw = Reporter(dep)
    gw.send(opened=['target-1'], delivered={one['id']: ['target-1'] + forged,
                                           everyone['id']: ['target-1'] + forged})
    assert db_rows(dep, 'SELECT seq, device FROM notify_delivered ORDER BY seq') == [
        (one['seq'], 'target-1'), (everyone['seq'], 'target-1')]
    assert status(dep, one['id'])['delivered'] == 1
    assert db_rows(dep, 'SELECT count(*) FROM device_seen') == [(1,)]


def test_unknown_devices_are_capped(dep):
    """Forged opened ids: at most 200,000 channel rows of devices the site does not know;
    the oldest go, a registered device's row stays."""
    now = int(time.time())
    db_write(dep, 'INSERT INTO devices (id, name, thumbprint, registered) VALUES (?, ?, ?, ?)',
             [('dev-known', 'known', 'cd' * 32, now)])
    gw = Reporter(dep)
    gw.send(opened=['dev-known'])
    t0 = time.monotonic()
    for part in range(4):
        gw.send(opened=[f'u{part}-{i:05d}' for i in range(60000)])
    took = time.monotonic() - t0
    rows = db_rows(dep, 'SELECT count(*) FROM device_seen')[0][0]
    print(f'4 reports of 60,000 unknown opened ids: {took * 1000:.0f} ms; '
          f'{rows} device_seen rows kept')
    assert rows == 200001
    assert db_rows(dep, "SELECT open FROM device_seen WHERE device = 'dev-known'") == [(1,)]
    assert db_rows(dep, "SELECT count(*) FROM device_seen WHERE device LIKE 'u3-%'") == [(60000,)]


def test_feed_holds_a_connector_ahead_of_a_restored_store(dep):
    """An `after` of the site's epoch beyond its last (the store went back): not answered
    from the oldest at once (the connector would poll in a loop) but held, and answered
    with nothing and the site's last as soon as a notification is made."""
    epoch = notify_feed(dep)['epoch']
    for _ in range(2):   # through the API: the service has seen them when it answers
        notify(dep, '--all', '--type', 'policy', api=True)
    answers = []
    poller = threading.Thread(target=lambda: answers.append(notify_feed(dep, f'{epoch}-9')))
    poller.start()
    time.sleep(1)
    assert not answers                       # held
    notify(dep, '--all', '--type', 'script')
    poller.join(5 * SLOW)
    assert answers and answers[0]['notifications'] == [] and answers[0]['last'] == 3


def test_new_epoch_command(dep):
    """`cmg site notify new-epoch`: a new epoch; a held poll of the old one answered at
    once with the new epoch from the oldest kept; ids print with it."""
    old = notify_feed(dep)['epoch']
    notify(dep, '--all', '--type', 'policy', api=True)
    answers = []
    poller = threading.Thread(target=lambda: answers.append(notify_feed(dep, f'{old}-1')))
    poller.start()
    time.sleep(0.5)
    r = notify(dep, 'new-epoch')
    poller.join(5 * SLOW)
    new = answers[0]['epoch']
    assert new != old and r.stdout.startswith(f'notification epoch {new} (was {old})')
    assert [n['id'] for n in answers[0]['notifications']] == [f'{new}-1']
    assert notify_json(dep, '--all', '--type', 'policy')['id'] == f'{new}-2'
    via_api = notify_json(dep, 'new-epoch', api=True)
    assert via_api['previous'] == new and notify_feed(dep)['epoch'] == via_api['epoch']


def test_connector_starts_again_when_the_store_went_back(setup, procs):
    """The site's last below what the connector had (a store restored from a backup),
    answered from the oldest as the first version of the feed did: the connector warns,
    sends notify-sync with the site's last and its documents again, and waits (a held
    poll) instead of asking again at once; what the site numbers next reaches the
    gateway."""
    site, ns, gateways = setup
    for i in range(5):
        ns.add('policy', {'n': i})
    plain = ns.answer

    def answer(after):   # beyond last: from the oldest, at once
        if after and after.startswith(EPOCH + '-') and int(after.split('-')[1]) > ns.last:
            after = None
        return plain(after)
    ns.answer = answer
    conn = start(procs, site, gateways)
    gw = gateways[0]
    gw.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 5, 'the backlog')
    poll(lambda: ns.afters[-1] == f'{EPOCH}-5', 5 * SLOW, 'the held poll')
    ns.down()                                # the site stops, its store is restored ...
    with ns.cond:                            # ... from a backup that had 2
        ns.last = 2
        ns.docs = {s: d for s, d in ns.docs.items() if s <= 2}
    ns.up()
    gw.wait_lines(lambda ls: [m for m in ls if m['type'] == 'notify-sync' and m['last'] == 2],
                  'notify-sync with the site\'s last', timeout=20)
    polls = len(ns.afters)
    time.sleep(2)
    print(f'polls in the 2 s after the restore: {len(ns.afters) - polls}')
    assert len(ns.afters) - polls <= 1 and ns.afters[-1] == f'{EPOCH}-2'
    assert 'its store went back' in conn.log_text()
    ns.add('script', {'after': 'restore'})   # seq 3 again, other contents
    gw.wait_lines(lambda ls: [m for m in ls if m.get('data') == {'after': 'restore'}],
                  'the new seq 3')
    assert [m['seq'] for m in gw.messages('notify')] == [1, 2, 3, 4, 5, 1, 2, 3]


# ---------------------------------------------------------------- cmg client listen

def test_listen_stream_cut_mid_event_resumes_from_the_last_dispatched(server):
    """The stream breaks after an event's id: line but before its blank line: the
    reconnection's Last-Event-ID is the last event printed, and the cut one comes again."""
    def cut(s, headers):
        start_stream(s, 'retry: 100\n\n')
        s.sendall(chunk(f'id: {EPOCH}-1\nevent: policy\ndata: {{}}\n\n'))
        s.sendall(chunk(f'id: {EPOCH}-2\nevent: script\ndata: {{"cut"'))
        time.sleep(0.2)
        s.close()                            # no last chunk: the stream broke
    server.scripts.put(cut)
    server.scripts.put(events((2, 'script', '{"whole":1}')))
    r = run_listen(listen_argv(server, '--max-events', '2'))
    assert r.returncode == 0, r.stderr
    assert lines(r.stdout) == [{'id': f'{EPOCH}-1', 'event': 'policy', 'data': {}},
                               {'id': f'{EPOCH}-2', 'event': 'script', 'data': {'whole': 1}}]
    assert server.requests[1]['last-event-id'] == f'{EPOCH}-1'


def test_listen_corrupt_saved_id_and_stale_temporary_files(server, tmp_path):
    """A notify.last-id that is not EPOCH-SEQ: a warning, the channel opened without
    Last-Event-ID (not refused for ever); a temporary file a killed run left is removed."""
    state = make_state(server, tmp_path)
    (state / 'notify.last-id').write_text('not-an-id\n')
    stale = state / 'notify.last-id.tmp-99999999-0'
    stale.write_text(f'{EPOCH}-9\n')
    server.scripts.put(events((1, 'policy', '{}')))
    r = run_listen([CMG, 'client', 'listen', '--state', str(state), '--max-events', '1'])
    assert r.returncode == 0, r.stderr
    assert 'not a notification id EPOCH-SEQ' in r.stderr
    assert 'last-event-id' not in server.requests[0]
    assert not stale.exists()
    assert (state / 'notify.last-id').read_text().strip() == f'{EPOCH}-1'


def test_listen_backs_off_a_channel_ended_at_once(server):
    """A gateway that answers each channel with retry: 0 and ends it at once: the client
    waits at least 1 s, and longer each time (a channel under 10 s counts as a failure)."""
    def short(s, headers):
        start_stream(s, 'retry: 0\n\n')
        s.sendall(b'0\r\n\r\n')
        s.close()
    for _ in range(2):
        server.scripts.put(short)
    server.scripts.put(events((1, 'policy', '{}')))
    r = run_listen(listen_argv(server, '--max-events', '1'), timeout=30)
    assert r.returncode == 0, r.stderr
    at = [req[':time'] for req in server.requests]
    gaps = [b - a for a, b in zip(at, at[1:])]
    print('gaps between connections: ' + ', '.join(f'{g:.2f} s' for g in gaps))
    assert len(gaps) == 2 and gaps[0] >= 0.95 and gaps[1] >= 1.9


def test_all_counts_only_devices_that_can_receive(dep):
    """--all targets: a registered device once (not again as its certificate), not a
    blocked one, device certificates neither revoked, replaced, expired nor a gateway's;
    a delivery to a registered device under its certificate's name counts for it."""
    now = int(time.time())
    t = {k: k * 32 for k in ('a1', 'b2', 'c3', 'd4', 'e5', 'f6', '07')}
    db_write(dep, 'INSERT INTO devices (id, name, thumbprint, registered, blocked) '
                  'VALUES (?, ?, ?, ?, ?)',
             [('dev-ok', 'ok', t['a1'], now - 10, 0), ('dev-blocked', 'no', t['b2'], now - 10, 1)])
    db_write(dep, 'INSERT INTO certs (serial, name, subject, issued, expires, revoked, '
                  'thumbprint, kind, replaced) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)',
             [('01', 'ok', '/CN=ok', now - 10, now + 999, None, t['a1'], None, None),
              ('02', 'good', '/CN=good', now - 10, now + 999, None, t['c3'], None, None),
              ('03', 'revoked', '/CN=r', now - 10, now + 999, now - 5, t['d4'], None, None),
              ('04', 'replaced', '/CN=p', now - 10, now + 999, None, t['e5'], 'device', now - 5),
              ('05', 'expired', '/CN=x', now - 99, now - 50, None, t['f6'], None, None),
              ('06', 'gw', '/CN=gw', now - 10, now + 999, None, t['07'], 'gateway', None)])
    gw = Reporter(dep)
    gw.send(opened=['cert:' + t['a1'], 'cert:' + t['d4'], 'oidc-1', 'dev-blocked'])
    sent = notify_json(dep, '--all', '--type', 'policy')
    st = status(dep, sent['id'])
    assert st['targets'] == 3, st            # dev-ok, cert:c3..., oidc-1
    gw.send(delivered={sent['id']: ['cert:' + t['a1']]})
    st = status(dep, sent['id'])
    assert (st['targets'], st['delivered'], st['waiting']) == (3, 1, 2)
    again = notify_json(dep, '--resend', sent['id'], '--missed')
    assert again['targets'] == 2
    assert sorted(db_rows(dep, 'SELECT device FROM notify_targets WHERE seq = ?',
                          again['seq'])) == [('cert:' + t['c3'],), ('oidc-1',)]


def test_resend_of_a_broadcast_missed_by_60000_certificates_is_split(dep):
    """60,000 certificate devices missed a broadcast: more than one 4-MiB document holds,
    so --resend --missed makes several notifications, each within the limit, and prints
    every id (--json lists them)."""
    gw = Reporter(dep)
    ids = [f'cert:{i:064x}' for i in range(60000)]
    for part in range(0, len(ids), 12000):
        gw.send(opened=ids[part:part + 12000])
    sent = notify_json(dep, '--all', '--type', 'policy', '--data', '{"k":"' + 'v' * 1000 + '"}')
    t0 = time.monotonic()
    r = notify_json(dep, '--resend', sent['id'], '--missed')
    took = time.monotonic() - t0
    parts = r['notifications']
    print(f'resend to 60,000 certificates: {len(parts)} notifications '
          f'({[p["targets"] for p in parts]}) in {took * 1000:.0f} ms')
    assert len(parts) == 2 and r['targets'] == 60000 and r['id'] == parts[0]['id']
    assert sum(p['targets'] for p in parts) == 60000
    assert r['resend_of'] == sent['id']
    targets = db_rows(dep, 'SELECT count(DISTINCT device) FROM notify_targets WHERE seq IN '
                           '(?, ?)', parts[0]['seq'], parts[1]['seq'])
    assert targets == [(60000,)]
    feed = notify_feed(dep, f'{sent["id"]}')
    for doc in feed['notifications']:
        assert len(json.dumps(doc, separators=(',', ':'))) <= 4 << 20
    text = notify(dep, '--resend', sent['id'], '--missed').stdout.splitlines()
    assert len(text) == 2 and all(f'(resend of {sent["id"]}, part' in t for t in text), text


def test_report_with_bad_entries_keeps_the_rest(dep):
    """Entries individually bad (a device id of 128 bytes, non-ASCII, a space, a control
    character, a key that is not EPOCH-SEQ) are skipped and counted in one log line; the
    report is taken (204: a refused one would block the gateway's next reports) and the
    good entries kept."""
    one = notify_json(dep, '--device', 'good-1', '--type', 'policy')
    bad = ['d' * 128, 'caf\u00e9', 'a b', 'a\n']
    doc = {'instance': 'gw-bad', 'boot': BOOT_A, 'seq': 1, 'time': int(time.time()),
           'opened': ['good-1'] + bad, 'closed': [[b, 1] for b in bad],
           'delivered': {one['id']: ['good-1'] + bad, 'nope': ['good-1']}}
    code, text = report(dep, raw=json.dumps(doc, ensure_ascii=False).encode())
    assert code == 204, (code, text)
    assert db_rows(dep, 'SELECT device FROM device_seen') == [('good-1',)]
    assert db_rows(dep, 'SELECT seq, device FROM notify_delivered') == [(one['seq'], 'good-1')]
    poll(lambda: 'notify report of gw-bad: 14 entry(ies) skipped' in dep.site_proc.log_text(),
         5 * SLOW, 'the log line')


def test_connector_backlog_sends_expired_documents_as_tombstones(setup, procs):
    """A document that expired while in the connector's backlog goes to a gateway that
    comes up later as a tombstone; a huge `created` is taken without harm."""
    site, ns, gateways = setup
    short = ns.add('script', {'short': True})
    short['expires'] = int(time.time()) + 2
    ns.add('policy', {'huge': True})['created'] = 1e300
    conn = start(procs, site, gateways)
    gateways[0].wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 2,
                           'the backlog on the first tunnel')
    assert gateways[0].messages('notify')[0]['data'] == {'short': True}
    time.sleep(2.5)
    gateways.append(FakeGateway(site, site.tunnel_port + 1))
    gw2 = gateways[1]
    gw2.wait_tunnel(timeout=15)
    gw2.wait_lines(lambda ls: len([m for m in ls if m['type'] == 'notify']) == 2,
                   'the backlog on the second tunnel')
    first, second = gw2.messages('notify')
    assert first == {'type': 'notify', 'id': f'{EPOCH}-1', 'seq': 1, 'expired': True}
    assert second['data'] == {'huge': True}
    assert conn.alive()


def test_per_device_rows_pruned_in_batches_counts_kept(dep):
    """notify_retention: a broadcast's delivery rows older than it go, in batches of
    10,000 per loop turn (the feed still answers meanwhile), and its counts stay in the
    notification (status and list unchanged); an expired notification is counted once."""
    import signal
    sent = notify_json(dep, '--all', '--type', 'policy')
    dep.site_proc.signal(signal.SIGTERM)
    from cmgtest import ini_set
    ini_set(dep.site.dir / 'site.conf', 'site', 'notify_retention', '1h')
    old = int(time.time()) - 7200
    db_write(dep, 'UPDATE notifications SET created = ?, expires = ? WHERE seq = ?',
             [(old, old + 60, sent['seq'])])
    devices_ = [(f'dev-{i:05d}', old, old + 1, old) for i in range(25000)]
    db_write(dep, 'INSERT INTO device_seen (device, instance, boot, open, since, last_seen, '
                  'first_seen) VALUES (?, \'gw\', \'b\', 0, ?, ?, ?)', devices_)
    db_write(dep, 'INSERT INTO notify_delivered (seq, device, at, instance) VALUES (?, ?, ?, ?)',
             [(sent['seq'], d[0], old + 1, 'gw') for d in devices_])
    dep.start_site()
    t0 = time.monotonic()
    notify_feed(dep)                         # answered while the prune goes on
    print(f'feed answered {1000 * (time.monotonic() - t0):.0f} ms after the start')
    poll(lambda: db_rows(dep, 'SELECT count(*) FROM notify_delivered') == [(0,)], 10 * SLOW,
         'the delivery rows to be pruned')
    st = status(dep, sent['id'])
    assert (st['targets'], st['delivered'], st['expired']) == (25000, 25000, 0), st
    assert db_rows(dep, 'SELECT final_targets, final_delivered FROM notifications WHERE seq = ?',
                   sent['seq']) == [(25000, 25000)]
    listed = notify_json(dep, 'list')
    assert listed[0]['delivered'] == 25000
