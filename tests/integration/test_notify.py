"""Client notifications end to end (issue 14's acceptance), real processes only: `cmg site
serve`, 2 connectors, 2 gateway instances sharing the device port (each also on a port of its
own, so that a test places a channel on a known instance), devices of the three methods
(certificate, registered device with its site device token, OIDC token) over HTTP/1.1 and
HTTP/2, each reading its channel (`GET /CCM_Notify`, Server-Sent Events) in a thread (Python's
ssl and h2, and `curl -N`).

- a targeted notification and a broadcast reach every device once (ids, types, data);
- a connector killed (SIGKILL) while `cmg site notify --all` runs in a loop: every device
  still gets every notification once;
- `Last-Event-ID` replays exactly what was missed; beyond the window (16) one `reset`; a
  device that stops reading is closed at `notify_buffer` while the others get the broadcasts
  on time;
- `cmg site device block`: the channel closed within 5 s; a bulk token 403, no credential
  401, nothing forwarded, descriptors back to the baseline;
- `cmg site notify status` counts what the devices received (delivered, waiting, expired),
  `--resend ID --missed` reaches only the device that missed it, `cmg site device list`
  shows channels open/closed and last seen;
- `cmg client listen --state DIR` prints the events as JSON lines and resumes after its
  gateway instance restarts, without duplicates;
- a restarted instance: its devices come back with resumed TLS handshakes (the ticket keys
  are shared by the instances) and get what they missed."""
import json
import re
import signal
import subprocess
import threading
import time

from cmgtest import CMG, SLOW, poll, request
from notifytest import (ANY_ID, DELIVER, HEARTBEAT, INTERVAL, NOTIFY_ID, RETRY_MS, WINDOW,
                        fleet, seq_of)  # noqa: F401 (fleet: the fixture)

REPORTED = 6 * INTERVAL * SLOW + 4     # the site shows what the gateways reported within this
QUIET = 1.0                            # after the last expected event: nothing more comes


def expect_exactly(channels, want):
    """Every channel ch got exactly want[ch] (ids, in order), and nothing more comes."""
    for ch, ids in want.items():
        ch.wait_ids(ids)
    time.sleep(QUIET)
    got = [(ch.name, ch.ids(with_resets=True)) for ch in want]
    assert got == [(ch.name, ids) for ch, ids in want.items()]


def test_every_method_both_protocols_exactly_once(fleet, svc):
    cert_a, cert_b, tok_a, tok_b, oidc_a, oidc_b = fleet.every_method()
    layout = [(cert_a, 0, 'h1'), (cert_b, 1, 'h2'), (tok_a, 1, 'h1'), (tok_b, 0, 'h2'),
              (oidc_a, 0, 'h1'), (oidc_b, 1, 'h2')]
    chans = {dev: fleet.open(dev, i, proto) for dev, i, proto in layout}
    cert_c, oidc_c = fleet.cert_device('dev-cert-c'), fleet.oidc_device('c')
    chans[cert_c] = fleet.curl(cert_c, http='2')             # curl -N, on the shared port
    chans[oidc_c] = fleet.curl(oidc_c, http='1.1')
    for dev, ch in chans.items():
        h = ch.headers
        assert h['content-type'].startswith('text/event-stream'), (dev, h)
        assert 'no-store' in h.get('cache-control', ''), (dev, h)
        if ch.proto in ('h1', 'curl-http1.1'):
            assert h.get('transfer-encoding', '').lower() == 'chunked', (dev, h)
        ch.wait(lambda c: c.retry is not None, DELIVER, 'the retry hint')
        assert RETRY_MS // 2 <= ch.retry <= RETRY_MS * 3 // 2, (dev, ch.retry)

    targeted = [cert_a, tok_b, oidc_b, cert_c]
    one = fleet.notify(*[a for d in targeted for a in ('--device', d.id)], '--type', 'script',
                       '--data', json.dumps({'script': 'inventory', 'args': [1, 'two']}))
    assert NOTIFY_ID.match(one['id']) and one['targets'] == 4, one
    assert seq_of(one['id']) == one['seq'] == 1, one
    assert one['expires'] - time.time() > 3500, one        # --ttl default 1 h
    everyone = fleet.broadcast('policy', {'fetch': 'now'})
    assert everyone['targets'] == 'all' and seq_of(everyone['id']) == 2, everyone
    assert everyone['id'].split('-')[0] == one['id'].split('-')[0]   # one epoch

    expect_exactly(chans.values(), {ch: ([one['id']] if dev in targeted else []) + [everyone['id']]
                                    for dev, ch in chans.items()})
    for dev, ch in chans.items():
        if dev in targeted:
            (e,) = ch.event(one['id'])
            assert (e.type, e.data) == ('script', {'script': 'inventory', 'args': [1, 'two']})
        (e,) = ch.event(everyone['id'])
        assert (e.type, e.data) == ('policy', {'fetch': 'now'})
    # one channel per device and instance: a newer one replaces the older, which ends
    newer = fleet.open(cert_a, 0, 'h1')
    assert chans[cert_a].wait_end(DELIVER) == 'last-chunk'
    again = fleet.broadcast()['id']
    expect_exactly([newer, chans[cert_b]], {newer: [one['id'], everyone['id'], again],
                                            chans[cert_b]: [everyone['id'], again]})
    # heartbeats (notify_heartbeat = 2 s) keep every channel alive
    for ch in [newer] + [ch for dev, ch in chans.items() if dev is not cert_a]:
        ch.wait(lambda c: c.comments >= 1, 3 * HEARTBEAT * SLOW, 'a heartbeat')
    # the gateway answered every channel itself; other methods 405, no event-stream 406
    seen = svc.count
    assert request(fleet.site, 'HEAD', '/CCM_Notify').status == 405
    assert request(fleet.site, 'POST', '/CCM_Notify', body=b'{}').status == 405
    assert request(fleet.site, 'GET', '/CCM_Notify', headers={'Accept': 'text/html'}).status == 406
    assert svc.count == seen
    assert not [p for p in svc.stats()['paths'] if 'Notify' in p]
    print('gateway peak RSS: ' + ', '.join(f'instance {i} {g.peak_rss_kib()} KiB'
                                           for i, g in enumerate(fleet.gateways)))


def test_connector_killed_while_broadcasting(fleet):
    devs = [fleet.cert_device('device1'), fleet.registered_device('dev-k'),
            fleet.oidc_device('k'), fleet.cert_device('dev-k2')]
    chans = [fleet.open(devs[0], 0, 'h1'), fleet.open(devs[1], 1, 'h2'),
             fleet.open(devs[2], 0, 'h2'), fleet.open(devs[3], 1, 'h1')]
    sent, errors = [], []
    five_sent = threading.Event()

    def loop():
        try:
            for n in range(16):
                sent.append(fleet.broadcast('policy', {'round': n})['id'])
                if n == 4:
                    five_sent.set()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            five_sent.set()
    t = threading.Thread(target=loop)
    t.start()
    assert five_sent.wait(30 * SLOW)
    fleet.dep.connectors[0].signal(signal.SIGKILL)
    t.join(60 * SLOW)
    assert not errors and len(sent) == 16, errors
    assert [seq_of(i) for i in sent] == list(range(1, 17))
    expect_exactly(chans, {ch: sent for ch in chans})
    assert [e.data['round'] for e in chans[0].events] == list(range(16))


def test_last_event_id_replay_window_and_reset(fleet):
    a, b = fleet.cert_device('device1'), fleet.registered_device('dev-away')
    watch = [fleet.open(fleet.oidc_device('w0'), 0, 'h1'),       # one on each instance
             fleet.open(fleet.cert_device('dev-w1'), 1, 'h2')]
    ch_a, ch_b = fleet.open(a, 0, 'h1'), fleet.open(b, 1, 'h2')
    first = fleet.broadcast()['id']
    for ch in (ch_a, ch_b, *watch):
        ch.wait_ids([first])
    ch_a.close()
    ch_b.close()

    missed = [fleet.broadcast()['id'] for _ in range(3)]
    for ch in watch:                                # both instances hold them
        ch.wait_ids(missed)
    back_a = fleet.open(a, 1, 'h1', last_id=first)  # on the other instance
    expect_exactly([back_a], {back_a: missed})

    away = [fleet.broadcast()['id'] for _ in range(WINDOW + 4)]
    for ch in watch + [back_a]:
        ch.wait_ids(away)
    last = away[-1]
    back_b = fleet.open(b, 0, 'h2', last_id=first)  # 20 missed: beyond the window of 16
    back_b.wait(lambda c: len(c.events) >= 1, DELIVER, 'the reset')
    live = fleet.broadcast()['id']
    back_b.wait_ids([live])
    time.sleep(QUIET)
    got = [(e.id, e.type) for e in back_b.events]
    assert got == [(last, 'reset'), (live, 'policy')], got
    assert isinstance(back_b.events[0].data, dict) and back_b.events[0].data.get('reason'), \
        back_b.events[0]
    # another epoch: a reset too
    other = fleet.open(fleet.registered_device('dev-other'), 1, 'h1',
                       last_id='0123456789abcdef-3' if not live.startswith('0123') else
                       'fedcba9876543210-3')
    other.wait(lambda c: len(c.events) >= 1, DELIVER, 'the reset')
    assert [(e.id, e.type) for e in other.events] == [(live, 'reset')], other.events


def test_a_device_that_stops_reading_is_closed_the_others_served(fleet):
    slow_dev = fleet.cert_device('device1')
    slow = fleet.open(slow_dev, 0, 'h1', hold=True, rcvbuf=4096)
    readers = [fleet.open(fleet.registered_device('dev-r1'), 0, 'h2'),
               fleet.open(fleet.oidc_device('r2'), 0, 'h1'),
               fleet.open(fleet.cert_device('dev-r3'), 1, 'h2')]
    blob = 'x' * 15000
    late, ids = [], []
    for n in range(12):             # 180 KB: more than the slow device's buffers hold
        doc = fleet.notify_api(all=True, type='bulk', data={'n': n, 'blob': blob})
        at = time.monotonic()
        ids.append(doc['id'])
        for ch in readers:
            ch.wait_ids([doc['id']])
            late.append(ch.event(doc['id'])[0].at - at)
    print(f'12 broadcasts of 15 KB: the readers got each within {max(late) * 1000:.0f} ms')
    assert max(late) < 2 * SLOW, late
    for ch in readers:
        assert ch.ids() == ids
    log = fleet.gateways[0]
    poll(lambda: any(slow_dev.id in line and ('buffer' in line or 'overflow' in line)
                     for line in log.log_text().splitlines()),
         DELIVER, 'the gateway to log the channel closed at its buffer', check=fleet.procs.check)
    slow.resume()
    end = slow.wait_end(DELIVER)
    assert end in ('eof', 'last-chunk') or end.startswith('error'), end
    assert len(slow.ids()) < len(ids), slow.ids()
    print(f'the device that did not read got {len(slow.ids())} of {len(ids)} before its '
          f'channel was closed')
    # it recovers by replay (all 12 are in the window): back with its last id, it gets the
    # rest, in order
    last = slow.ids()[-1] if slow.ids() else None
    back = fleet.open(slow_dev, 1, 'h1', last_id=last)
    expect_exactly([back], {back: ids[ids.index(last) + 1:] if last else ids})


def test_blocked_device_closed_bulk_and_anonymous_refused(fleet, svc):
    tok, cert = fleet.registered_device('dev-blk'), fleet.cert_device('dev-blk-cert')
    ctl = fleet.oidc_device('ctl')
    ch_tok, ch_cert = fleet.open(tok, 0, 'h1'), fleet.open(cert, 1, 'h2')
    ch_ctl = fleet.open(ctl, 1, 'h1')
    for dev, ch in ((tok, ch_tok), (cert, ch_cert)):
        t0 = time.monotonic()
        fleet.dep.cmg_site('device', 'block', dev.name if dev.kind == 'cert' else dev.id)
        ch.wait_end(5 * SLOW)
        print(f'{dev.kind} device blocked: its channel ended after {time.monotonic() - t0:.2f} s')
        again = fleet.channel(dev, 0, ch.proto)
        assert again.wait_open() == 403 and b'CMGService_Device_Blocked' in again.body, \
            (again.status, again.body)
    assert ch_ctl.end is None

    seen = svc.count
    base = [fleet.fds(0), fleet.fds(1)]
    bulk_dev = fleet.registered_device('dev-bulk')      # its certificate, a bulk token
    bulk_dev.token = fleet.bulk()
    anonymous = fleet.cert_device('device1')
    anonymous.cert = None
    for n in range(20):
        proto = ('h1', 'h2')[n % 2]
        refused = fleet.channel(bulk_dev, n % 2, proto)
        assert refused.wait_open() == 403, (refused.status, refused.body)
        assert b'CMGService_Bulk_Token_Registration_Only' in refused.body, refused.body
        refused.close()
        refused = fleet.channel(anonymous, n % 2, proto)
        assert refused.wait_open() == 401, (refused.status, refused.body)
        refused.close()
    assert svc.count == seen
    poll(lambda: fleet.fds(0) <= base[0] and fleet.fds(1) <= base[1], 5 * SLOW,
         f'the gateways back to their descriptors {base}', check=fleet.procs.check)
    live = fleet.broadcast()['id']
    expect_exactly([ch_ctl], {ch_ctl: [live]})


def test_status_resend_missed_and_device_list(fleet, tmp_path):
    a, b = fleet.cert_device('device1'), fleet.registered_device('dev-b')
    c, d = fleet.oidc_device('c'), fleet.registered_device('dev-offline')
    ch_a, ch_b, ch_c = fleet.open(a, 0, 'h1'), fleet.open(b, 1, 'h2'), fleet.open(c, 1, 'h1')
    listed = tmp_path / 'targets.txt'
    listed.write_text(f'# the devices of this test\n{a.id}\n\n{b.id}\n{d.id}\n')
    n = fleet.notify('--devices', listed, '--type', 'compliance', '--data', '{"baseline":7}')
    assert n['targets'] == 3, n
    for ch in (ch_a, ch_b):
        ch.wait_ids([n['id']])
    want = {'targets': 3, 'delivered': 2, 'waiting': 1, 'expired': 0}
    poll(lambda: fleet.counts(n['id']) == want, REPORTED, f'notify status to say {want}',
         check=fleet.procs.check)
    text = fleet.dep.cmg_site('notify', 'status', n['id']).stdout
    assert f"notification {n['id']} (compliance): 2 delivered, 1 waiting, 0 expired of 3 " \
           "device(s)" in text, text

    # for the offline device only (a device online might not get it within 1 s here)
    short = fleet.notify('--device', d.id, '--type', 'script', '--ttl', '1s')
    want_short = {'targets': 1, 'delivered': 0, 'waiting': 0, 'expired': 1}
    poll(lambda: fleet.counts(short['id']) == want_short, REPORTED,
         f'the 1 s notification to show {want_short}', check=fleet.procs.check)

    # the device list: channels open, the offline device never seen on one
    rows = poll(lambda: (lambda r: r if all(r.get(x.id, {}).get('channel') == 'open'
                                            for x in (a, b, c)) else None)(fleet.device_rows()),
                REPORTED, 'the device list to show 3 channels open', check=fleet.procs.check)
    assert rows[d.id]['channel'] == '-' and rows[d.id]['last_seen'] is None, rows[d.id]
    assert all(isinstance(rows[x.id]['last_seen'], int) for x in (a, b, c)), rows

    r = fleet.dep.cmg_site('notify', '--resend', n['id'], '--missed')
    resent = [i for i in ANY_ID.findall(r.stdout) if i != n['id']]
    assert len(resent) == 1 and re.search(r'\b1 device', r.stdout), r.stdout
    resent = resent[0]
    assert seq_of(resent) == seq_of(short['id']) + 1, (resent, short)
    ch_d = fleet.open(d, 0, 'h2')                  # comes online: what is unexpired for it
    marker = fleet.broadcast()['id']
    expect_exactly([ch_a, ch_b, ch_c, ch_d], {
        ch_a: [n['id'], marker], ch_b: [n['id'], marker], ch_c: [marker],
        ch_d: [n['id'], resent, marker]})
    poll(lambda: fleet.counts(resent) == {'targets': 1, 'delivered': 1, 'waiting': 0, 'expired': 0},
         REPORTED, 'the resend delivered', check=fleet.procs.check)
    poll(lambda: fleet.counts(n['id'])['delivered'] == 3, REPORTED, 'the original delivered to 3',
         check=fleet.procs.check)
    r = fleet.dep.cmg_site('notify', '--resend', n['id'], '--missed')
    assert 'nothing to resend: every target has it' in r.stdout + r.stderr, r
    listed = json.loads(fleet.dep.cmg_site('notify', 'list', '--json').stdout)   # newest first
    assert [x['id'] for x in listed] == [marker, resent, short['id'], n['id']], listed
    assert {k: listed[-1][k] for k in ('targets', 'delivered', 'waiting', 'expired')} == \
        {'targets': 3, 'delivered': 3, 'waiting': 0, 'expired': 0}, listed[-1]

    ch_a.close()
    row = poll(lambda: (lambda r: r if r['channel'] == 'closed' else None)(fleet.device_rows()[a.id]),
               REPORTED, 'the device list to show the closed channel', check=fleet.procs.check)
    assert row['last_seen'] >= int(time.time()) - 30, row


def test_client_listen_resumes_after_its_instance_restarts(fleet, tmp_path):
    state = tmp_path / 'listen-state'
    r = subprocess.run([CMG, 'client', 'register', '--gateway', f'127.0.0.1:{fleet.ports[0]}',
                        '--server-name', fleet.site.name, '--ca', fleet.site.ca,
                        '--bulk-token', fleet.bulk(), '--state', state, '--name', 'listener'],
                       capture_output=True, timeout=60 * SLOW, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    device_id = json.loads((state / 'device.json').read_text())['device_id']
    ran = tmp_path / 'exec.txt'
    listen = fleet.procs.start('listen', [
        CMG, 'client', 'listen', '--state', state, '--exec',
        f'printf "%s %s %s\\n" "$CMG_EVENT_ID" "$CMG_EVENT_TYPE" "$CMG_EVENT_DATA" >>{ran}'],
        stdout_pipe=True)
    lines = []

    def read():
        for line in listen.popen.stdout:
            lines.append(json.loads(line))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def sent_to_it(n):
        return fleet.notify('--device', device_id, '--type', 'script', '--data',
                            json.dumps({'n': n}))['id']

    def printed(ids):
        poll(lambda: [x['id'] for x in lines] == ids, 30 * SLOW, f'listen to print {ids}',
             check=fleet.procs.check)
    ids = [sent_to_it(1)]
    printed(ids)
    assert lines[0] == {'id': ids[0], 'event': 'script', 'data': {'n': 1}}, lines

    fleet.gateways[0].signal(signal.SIGTERM)          # its instance drains and exits
    ids += [sent_to_it(2), sent_to_it(3)]             # while it is away
    fleet.start_instance(0)
    back = time.monotonic()
    ids.append(sent_to_it(4))
    printed(ids)
    print(f'cmg client listen: 2 missed and 1 live notification printed '
          f'{time.monotonic() - back:.2f} s after its instance was back')
    time.sleep(QUIET)
    assert [x['id'] for x in lines] == ids, lines
    assert [x['data'] for x in lines] == [{'n': n} for n in range(1, 5)]
    assert (state / 'notify.last-id').read_text().strip() == ids[-1]
    poll(lambda: ran.exists() and len(ran.read_text().splitlines()) == 4, 5 * SLOW,
         'four --exec runs')
    assert ran.read_text().splitlines() == [f'{i} script {{"n":{n}}}' for n, i in
                                            enumerate(ids, 1)], ran.read_text()
    assert listen.signal(signal.SIGTERM) == 0


def test_restarted_instance_devices_resume_their_sessions(fleet):
    cert, tok = fleet.cert_device('device1'), fleet.registered_device('dev-resume')
    chans = [fleet.open(cert, 0, 'h1'), fleet.open(tok, 0, 'h2')]
    first = fleet.broadcast()['id']
    for ch in chans:
        ch.wait_ids([first])
        assert ch.session is not None, ch.name
    fleet.gateways[0].signal(signal.SIGTERM)          # drain: channels end at its start
    assert chans[0].wait_end(DELIVER) == 'last-chunk'
    assert chans[1].wait_end(DELIVER) == 'end-stream', chans[1].end
    missed = fleet.broadcast()['id']
    fleet.start_instance(0)
    back = [fleet.open(cert, 0, 'h1', last_id=first, session=chans[0].session),  # restarted
            fleet.open(tok, 1, 'h2', last_id=first, session=chans[1].session)]   # the other
    assert [ch.session_reused for ch in back] == [True, True], [ch.name for ch in back]
    live = fleet.broadcast()['id']
    expect_exactly(back, {ch: [missed, live] for ch in back})
