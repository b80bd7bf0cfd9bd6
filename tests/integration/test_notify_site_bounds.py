"""The site's notify side under hostile or heavy input (issue 14 review): `device list`
over 50,000 devices and hundreds of gateway boots in one set-based query, with pages;
what a forged notify report can add to site.db. The real `cmg site serve` runs; the test
plays the connector (see test_site_notify.py)."""
import json
import sqlite3
import time

from cmgtest import SLOW
from test_site_notify import (BOOT_A, Reporter, connector_context, db_rows, dep,  # noqa: F401
                              notify_feed, notify_json, report, status)


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
