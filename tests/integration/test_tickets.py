"""TLS session tickets shared by the gateway instances (ticket_key_file, ticket_key_rotate)
and bounded handshake admission (handshake_rate), seen from real clients: `openssl
s_client -sess_out/-sess_in` (TLS 1.3 and 1.2) and Python's ssl `session=`.

- Two instances share the device port and the key file: sessions made at instance 0 resume
  at instance 1 once instance 0 has drained away, and again after both were restarted; the
  file is created with mode 0600 and the tickets carry the name of its newest key.
- Rotation (`ticket_key_rotate = 2s`): a new key appears, a ticket of the previous key still
  resumes (and is renewed with the new one), a ticket whose key was dropped gets a full
  handshake; the file corrupted while running: one warning, the keys in force kept.
- A corrupt file at start: exit 1, the error names the file and what was expected.
- `ticket_key_file = off`: sessions resume within the process only.
- `handshake_rate = 5`: 30 connections at once are all served, never more full handshakes
  by any time than rate x elapsed + burst; 30 resumed at once are not held back; the pause
  logged once per episode and counted in /metrics (`cmg_handshakes_total{resumed=...}`);
  a connect/close flood takes no token; a resumed device does not wait behind full ones.
- The file as a device credential: modes and owners other users could use are refused; an
  empty file (a copy in place) is never written; a key dated ahead does not freeze
  rotation; the lock is never waited for; a chain too long for the ticket never resumes.
"""
import fcntl
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cmgtest import (CMG, SLOW, Site, alone_gateway, client_context, free_port, ini_set, make_cert,
                     poll, read_response, start_connector, start_gateway, wait_ready)

KEY_LINE = re.compile(r'^(\d+) ([0-9a-f]{160})$', re.M)


def file_keys(path):
    """The key names (hex) in the file, newest first."""
    return [m.group(2)[:32] for m in KEY_LINE.finditer(path.read_text())]


def get_request(site):
    return f'GET {site.path("policy.xml")} HTTP/1.1\r\nHost: {site.name}\r\nConnection: close\r\n\r\n'


def s_client_msg(site, tls, sess_out=None, sess_in=None):
    """One request by openssl s_client; returns (reused?, status, a NewSessionTicket came?).
    The gateway answers and closes, so the TLS 1.3 tickets have arrived by then."""
    argv = ['openssl', 's_client', '-connect', f'{site.addr}:{site.port}', '-servername', site.name,
            '-CAfile', site.ca, '-cert', site.device_cert, '-key', site.device_key, '-ign_eof',
            '-msg', '-tls1_3' if tls == '1.3' else '-tls1_2']
    if sess_out:
        argv += ['-sess_out', sess_out]
    if sess_in:
        argv += ['-sess_in', sess_in]
    r = subprocess.run([str(a) for a in argv], input=get_request(site).encode(), capture_output=True,
                       timeout=20 * SLOW)
    out = r.stdout.decode(errors='replace')
    m = re.search(r'^(New|Reused), TLSv1\.([23])', out, re.M)
    assert m, f's_client TLS {tls}: no handshake:\n{out}\n{r.stderr.decode(errors="replace")}'
    assert m.group(2) == tls[-1], f'asked for TLS {tls}, got {m.group(0)}'
    status = re.search(r'HTTP/1\.1 (\d{3}) ', out)
    return m.group(1) == 'Reused', int(status.group(1)) if status else None, 'NewSessionTicket' in out


def s_client(site, tls, sess_out=None, sess_in=None):
    """(reused?, status) of one request by openssl s_client."""
    return s_client_msg(site, tls, sess_out, sess_in)[:2]


def ticket_key_name(sess_file):
    """The first 16 bytes of the session's ticket: the name of the key that encrypted it."""
    text = subprocess.run(['openssl', 'sess_id', '-in', str(sess_file), '-noout', '-text'],
                          capture_output=True, text=True, check=True).stdout
    block = text.split('TLS session ticket:', 1)[1]
    rows = re.findall(r'^\s+00[01]0 - ((?:[0-9a-f]{2}[ -]){15}[0-9a-f]{2})', block, re.M)
    return ''.join(re.sub(r'[ -]', '', row) for row in rows[:1])


class PySession:
    """Python ssl: a request, keeping the session for the next connection (same context)."""

    def __init__(self, site, **ctx_args):
        self.site = site
        self.ctx = client_context(site, **ctx_args)
        self.session = None

    def request(self):
        """(reused?, status) of one request on a new connection, resuming the kept session."""
        sock = socket.create_connection((self.site.addr, self.site.port), timeout=20 * SLOW)
        with self.ctx.wrap_socket(sock, server_hostname=self.site.name, session=self.session) as s:
            s.sendall(get_request(self.site).encode())
            status, _, _ = read_response(s)
            while s.recv(65536):          # to the close: every ticket read
                pass
            reused = s.session_reused
            self.session = s.session      # the newest ticket, renewed on a resumed connection
            return reused, status


def listening_for_devices(proc):
    return 'listening for devices on' in proc.log_text()


def test_sessions_resume_at_the_other_instance_and_after_a_restart(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs, instances=2)
    keys = site.dir / 'ticket.keys'
    gw0 = start_gateway(procs, site, 0)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600, oct(keys.stat().st_mode)
    names = file_keys(keys)
    assert len(names) == 1, keys.read_text()
    assert names[0] not in gw0.log_text(), 'a ticket key was logged'

    # sessions made at instance 0, the only one on the port
    sess13, sess12 = tmp_path / 'tls13.sess', tmp_path / 'tls12.sess'
    assert s_client(site, '1.3', sess_out=sess13) == (False, 200)
    assert s_client(site, '1.2', sess_out=sess12) == (False, 200)
    py = PySession(site)
    assert py.request() == (False, 200)
    assert ticket_key_name(sess12) == names[0] and ticket_key_name(sess13) == names[0]

    # instance 1 joins, instance 0 drains away: the sessions resume at instance 1
    gw1 = start_gateway(procs, site, 1)
    poll(lambda: listening_for_devices(gw1), 10 * SLOW, 'instance 1 to join the device port',
         check=procs.check)
    assert gw0.signal(signal.SIGTERM) == 0
    assert s_client(site, '1.3', sess_in=sess13) == (True, 200)
    assert s_client(site, '1.2', sess_in=sess12) == (True, 200)
    assert py.request() == (True, 200)
    assert 'created (mode 0600)' not in gw1.log_text(), 'instance 1 made the file anew'
    assert file_keys(keys) == names, 'instance 1 made a key of its own'

    # every instance restarted: the sessions still resume
    assert gw1.signal(signal.SIGTERM) == 0
    gws = [start_gateway(procs, site, 0), start_gateway(procs, site, 1)]
    for gw in gws:
        poll(lambda: listening_for_devices(gw), 15 * SLOW, 'the restarted instances to serve',
             check=procs.check)
    assert s_client(site, '1.3', sess_in=sess13) == (True, 200)
    assert s_client(site, '1.2', sess_in=sess12) == (True, 200)
    assert py.request() == (True, 200)
    assert file_keys(keys) == names


def test_instances_started_together_agree_on_one_key(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs, instances=2)
    alone_gateway(site)
    keys = site.dir / 'ticket.keys'
    gws = [procs.start(f'gateway{i}', [CMG, 'gateway', '-c', site.gateway_conf, '--instance', i])
           for i in range(2)]
    poll(lambda: all(listening_for_devices(gw) for gw in gws), 10 * SLOW, 'both instances to serve',
         check=procs.check)
    names = file_keys(keys)
    assert len(names) == 1, keys.read_text()
    assert sum('created (mode 0600)' in gw.log_text() for gw in gws) == 1
    sess = tmp_path / 's.sess'
    for _ in range(8):                    # spread over both by the kernel: one key all the same
        s_client(site, '1.2', sess_out=sess)
        assert ticket_key_name(sess) == names[0]


def test_a_device_of_an_intermediate_ca_resumes_and_is_judged_again(procs, tmp_path, svc):
    """The chain a device sent is not in its ticket: a resumed connection's certificate is
    still judged (issued by an intermediate CA the CTL does not hold) and served."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((site.dir / 'ca.key').read_bytes(), None)
    inter, inter_key, (inter_crt, _) = make_cert(tmp_path / 'issuing', 'Issuing CA', ca, ca_key, ca=True)
    _, _, (dev_crt, dev_key) = make_cert(tmp_path / 'dev', 'dev-of-issuing', inter, inter_key)
    chain = tmp_path / 'chain.crt'
    chain.write_bytes(dev_crt.read_bytes() + inter_crt.read_bytes())
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    py = PySession(site, cert=chain, key=dev_key)
    assert py.request() == (False, 200)
    assert py.request() == (True, 200)
    assert py.request() == (True, 200)    # a ticket made on a resumed connection keeps it too
    py12 = PySession(site, cert=chain, key=dev_key)
    py12.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert [py12.request() for _ in range(3)] == [(False, 200), (True, 200), (True, 200)]
    refused = [line for line in gw.log_text().splitlines() if 'refused' in line]
    assert not refused, refused


def test_a_chain_too_long_for_the_ticket_is_not_resumed(procs, tmp_path, svc):
    """A device that sends more intermediates than a ticket keeps (8): its sessions are never
    resumed (a resumed connection could not be judged without them), so it is served on
    every full handshake instead of refused for the ticket's lifetime."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    ca = x509.load_pem_x509_certificate(site.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((site.dir / 'ca.key').read_bytes(), None)
    inter, inter_key, (inter_crt, _) = make_cert(tmp_path / 'issuing', 'Issuing CA', ca, ca_key, ca=True)
    _, _, (dev_crt, dev_key) = make_cert(tmp_path / 'dev', 'dev-of-issuing', inter, inter_key)
    extra = b''.join(make_cert(tmp_path / f'x{i}', f'Unrelated CA {i}', ca=True)[2][0].read_bytes()
                     for i in range(8))
    chain = tmp_path / 'chain.crt'
    chain.write_bytes(dev_crt.read_bytes() + inter_crt.read_bytes() + extra)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        py = PySession(site, cert=chain, key=dev_key)
        py.ctx.maximum_version = version
        assert [py.request() for _ in range(3)] == [(False, 200)] * 3, version
    refused = [line for line in gw.log_text().splitlines() if 'refused' in line]
    assert not refused, refused


def test_sighup_reads_the_file_again(procs, tmp_path, svc):
    """A file copied in from elsewhere (a key made there, the old one kept): SIGHUP puts it in
    force at once; tickets of the old key still resume."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    keys = site.dir / 'ticket.keys'
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    old_sess, new_sess = tmp_path / 'old.sess', tmp_path / 'new.sess'
    assert s_client(site, '1.3', sess_out=old_sess) == (False, 200)
    old_line = KEY_LINE.search(keys.read_text()).group(0)
    new_key = os.urandom(80).hex()
    # made on the rotating host more than a re-read interval ago: it encrypts at once here
    (tmp_path / 'copy').write_text(f'{int(time.time()) - 120} {new_key}\n{old_line}\n')
    os.chmod(tmp_path / 'copy', 0o600)
    os.replace(tmp_path / 'copy', keys)
    gw.signal(signal.SIGHUP, wait=False)
    gw.expected_exit = False
    poll(lambda: 'reloaded' in gw.log_text(), 5 * SLOW, 'the reload', check=procs.check)
    assert s_client(site, '1.2', sess_out=new_sess) == (False, 200)
    assert ticket_key_name(new_sess) == new_key[:32]
    assert s_client(site, '1.3', sess_in=old_sess) == (True, 200)
    assert new_key[:32] not in gw.log_text()


def rotation_site(tmp_path, procs, svc):
    site = Site(tmp_path / 'site', [svc.url], procs)
    alone_gateway(site)
    ini_set(site.gateway_conf, 'gateway', 'ticket_key_rotate', '2s')
    return site


def test_rotation_renews_old_tickets_and_drops_old_keys(procs, tmp_path, svc):
    site = rotation_site(tmp_path, procs, svc)
    keys = site.dir / 'ticket.keys'
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)

    # a session whose ticket is of the newest key (a rotation may come in between: again)
    sess = tmp_path / 'old.sess'
    def fresh_session():
        s_client(site, '1.2', sess_out=sess)
        newest = file_keys(keys)[0]
        # a ticket of the newest key resumes without a new ticket
        return ticket_key_name(sess) == newest and \
            s_client_msg(site, '1.2', sess_in=sess) == (True, 200, False) and \
            file_keys(keys)[0] == newest and newest
    old = poll(fresh_session, 5 * SLOW, 'a ticket of the newest key')

    # a new key: decrypt-only for a re-read interval (1 s here: the other instances read it
    # first), then it encrypts; the old one still decrypts, and its ticket is renewed (TLS
    # 1.2: a NewSessionTicket in the resumed handshake)
    poll(lambda: file_keys(keys)[0] != old, 5 * SLOW, 'a new key in the file')
    new = file_keys(keys)[0]
    made = int(KEY_LINE.search(keys.read_text()).group(1))
    probe = tmp_path / 'probe.sess'
    if time.time() < made + 0.9:
        assert s_client(site, '1.2', sess_out=probe) == (False, 200)
        if time.time() < made + 0.9:
            assert ticket_key_name(probe) == old, 'a new key encrypted before the others had it'
    poll(lambda: time.time() >= made + 1.1, 5 * SLOW, 'a re-read interval')
    reused, status, renewed = s_client_msg(site, '1.2', sess_in=sess)
    assert old in file_keys(keys), 'the old key was dropped before it could be tried'
    assert (reused, status, renewed) == (True, 200, True), 'a ticket of the previous key'
    s_client(site, '1.2', sess_out=probe)
    assert ticket_key_name(probe) in (new, file_keys(keys)[0])
    assert 1 < len(file_keys(keys)) <= 3

    # two periods later the old key is gone: its ticket gets a full handshake
    poll(lambda: old not in file_keys(keys), 10 * SLOW, 'the old key to be dropped')
    assert s_client(site, '1.2', sess_in=sess) == (False, 200)
    assert len(file_keys(keys)) <= 3
    assert old not in gw.log_text()

    # the file corrupted while running: one warning, the keys in force kept
    py = PySession(site)
    assert py.request() == (False, 200)
    (tmp_path / 'corrupt').write_text('not a key\n')
    os.chmod(tmp_path / 'corrupt', 0o600)
    os.replace(tmp_path / 'corrupt', keys)      # at once: never an empty file in between
    poll(lambda: 'ticket_key_file' in gw.log_text() and 'expected' in gw.log_text(), 5 * SLOW,
         'a warning about the corrupt file', check=procs.check)
    time.sleep(2.5)                       # more re-reads: still one warning
    warnings = [line for line in gw.log_text().splitlines() if 'line 1: expected' in line]
    assert len(warnings) == 1, warnings
    assert 'kept' in warnings[0] and str(keys) in warnings[0]
    assert py.request() == (True, 200)


def test_corrupt_file_at_start_is_a_clear_error(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs)
    bad = site.dir / 'bad.keys'
    for text, expected in [
            ('1700000000 abcd\n', 'line 1: expected'),
            ('1700000000 ' + 'zz' * 80 + '\n', 'line 1: expected'),
            (''.join(f'{1700000000 + i} {"ab" * 80}\n' for i in range(4)), 'at most 3 keys'),
            ('x' * 5000, 'expected at most 3 keys in')]:
        bad.write_text(text)
        bad.chmod(0o600)
        ini_set(site.gateway_conf, 'gateway', 'ticket_key_file', bad.name)
        r = subprocess.run([CMG, 'gateway', '-c', str(site.gateway_conf)], capture_output=True,
                           text=True, timeout=20 * SLOW)
        assert r.returncode == 1, r.stderr
        assert f'ticket_key_file {bad}' in r.stderr and expected in r.stderr, r.stderr
        assert 'ab' * 16 not in r.stderr and 'zz' * 8 not in r.stderr, 'key material in the log'
    # an empty file (a copy in progress): unusable, never filled with a key of this instance
    bad.write_text('')
    bad.chmod(0o600)
    r = subprocess.run([CMG, 'gateway', '-c', str(site.gateway_conf)], capture_output=True,
                       text=True, timeout=20 * SLOW)
    assert r.returncode == 1 and f'ticket_key_file {bad}: expected a key, found none' in r.stderr \
        and 'temporary name, then mv' in r.stderr, r.stderr
    assert bad.read_text() == ''
    for value, expected in [('ticket_key_rotate', '-1'), ('ticket_key_rotate', '31d'),
                            ('handshake_rate', '-5'), ('handshake_rate', 'fast')]:
        ini_set(site.gateway_conf, 'gateway', 'ticket_key_file', 'off')
        ini_set(site.gateway_conf, 'gateway', value, expected)
        r = subprocess.run([CMG, 'gateway', '-c', str(site.gateway_conf)], capture_output=True,
                           text=True, timeout=20 * SLOW)
        assert r.returncode == 1 and f'{value}: expected' in r.stderr and expected in r.stderr, r.stderr
        ini_set(site.gateway_conf, 'gateway', value, '1')


def test_a_key_file_open_to_other_users_is_refused(procs, tmp_path, svc):
    """Whoever reads the file can forge a ticket that names any device's certificate: a
    file (or the directory it is to be made in) that other users can read or write is
    refused at start (exit 1) and, at a re-read, warned of with the keys in force kept."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    keys = site.dir / 'ticket.keys'
    keys.write_text(f'{int(time.time())} {os.urandom(80).hex()}\n')
    for mode in (0o644, 0o620, 0o602):
        os.chmod(keys, mode)
        r = subprocess.run([CMG, 'gateway', '-c', str(site.gateway_conf)], capture_output=True,
                           text=True, timeout=20 * SLOW)
        assert r.returncode == 1, r.stderr
        assert f'ticket_key_file {keys}: expected the file closed to other users' in r.stderr, r.stderr
        assert f'found mode {mode:04o}' in r.stderr and 'impersonate any certificate device' in r.stderr
    keys.unlink()
    os.chmod(site.dir, 0o777)
    r = subprocess.run([CMG, 'gateway', '-c', str(site.gateway_conf)], capture_output=True,
                       text=True, timeout=20 * SLOW)
    assert r.returncode == 1 and 'expected its directory closed to other users' in r.stderr, r.stderr
    assert not keys.exists()
    os.chmod(site.dir, 0o700)

    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    py = PySession(site)
    assert py.request() == (False, 200)
    os.chmod(keys, 0o666)
    gw.signal(signal.SIGHUP, wait=False)
    gw.expected_exit = False
    poll(lambda: 'found mode 0666' in gw.log_text(), 5 * SLOW, 'the warning', check=procs.check)
    assert 'ticket key(s) in force are kept' in gw.log_text()
    assert py.request() == (True, 200)


def test_off_is_a_key_of_the_process(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs)
    ini_set(site.gateway_conf, 'gateway', 'ticket_key_file', 'off')
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    sess = tmp_path / 's.sess'
    assert s_client(site, '1.3', sess_out=sess) == (False, 200)
    assert s_client(site, '1.3', sess_in=sess) == (True, 200)
    assert not (site.dir / 'ticket.keys').exists()
    assert gw.signal(signal.SIGTERM) == 0
    start_gateway(procs, site)
    wait_ready(procs, site)
    assert s_client(site, '1.3', sess_in=sess) == (False, 200), 'resumed with another process key'
    assert not (site.dir / 'ticket.keys').exists()


def test_a_file_that_cannot_be_created_yet(procs, tmp_path, svc):
    """Absent in a directory that does not exist: a warning and a key of the process (as a
    policy_cache it cannot write); once the directory is there, the file is made and used."""
    site = rotation_site(tmp_path, procs, svc)
    keys = site.dir / 'later' / 'ticket.keys'
    ini_set(site.gateway_conf, 'gateway', 'ticket_key_file', 'later/ticket.keys')
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    warnings = [line for line in gw.log_text().splitlines() if 'cannot be created' in line]
    assert len(warnings) == 1 and str(keys) in warnings[0] and 'this process only' in warnings[0]
    sess = tmp_path / 's.sess'
    assert s_client(site, '1.3', sess_out=sess) == (False, 200)
    assert s_client(site, '1.3', sess_in=sess) == (True, 200)
    keys.parent.mkdir()
    poll(lambda: keys.exists() and file_keys(keys), 5 * SLOW, 'the file made at a re-read',
         check=procs.check)
    def ticket_of_the_file():
        s_client(site, '1.2', sess_out=sess)
        return ticket_key_name(sess) in file_keys(keys)
    poll(ticket_of_the_file, 5 * SLOW, 'a ticket of the file\'s key')
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600


def test_a_symbolic_link_stays_one(procs, tmp_path, svc):
    """ticket_key_file a symbolic link (a mounted secret, a shared file): read through it, and
    a rotation replaces the file it names, not the link."""
    site = rotation_site(tmp_path, procs, svc)
    store = tmp_path / 'shared'
    store.mkdir()
    (site.dir / 'ticket.keys').symlink_to(store / 'real.keys')
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    first = file_keys(store / 'real.keys')
    assert len(first) == 1
    poll(lambda: len(file_keys(store / 'real.keys')) > 1, 5 * SLOW, 'a rotation', check=procs.check)
    assert (site.dir / 'ticket.keys').is_symlink()
    assert stat.S_IMODE((store / 'real.keys').stat().st_mode) == 0o600
    sess = tmp_path / 's.sess'
    assert s_client(site, '1.2', sess_out=sess) == (False, 200)
    assert ticket_key_name(sess) in file_keys(store / 'real.keys')
    assert not any(store.glob('*.new')) and 'a new ticket key, decrypting now, encrypting in' in gw.log_text()


# ---------------------------------------------------------------- handshake_rate

RATE, N = 5, 30


def metrics(port):
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
        text = r.read().decode()
    return {m.group(1): int(m.group(2)) for m in re.finditer(
        r'^(cmg_handshakes_total\{resumed="(?:true|false)"\}|cmg_handshake_rate_pauses_total) (\d+)$',
        text, re.M)}


def connect_all(site, ctx, sessions=None):
    """N connections at once, each a handshake then a request; returns the time just before
    the first connect and [(handshake done at, reused?, status, session)]."""
    results = [None] * N

    def one(i):
        sock = socket.create_connection((site.addr, site.port), timeout=30 * SLOW)
        with ctx.wrap_socket(sock, server_hostname=site.name,
                             session=sessions[i] if sessions else None) as s:
            done = time.monotonic()
            s.sendall(get_request(site).encode())
            status, _, _ = read_response(s)
            while s.recv(65536):
                pass
            results[i] = (done, s.session_reused, status, s.session)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60 * SLOW)
    assert all(results), 'a connection got no answer'
    return t0, results


def test_handshake_rate_spreads_full_handshakes_and_spares_resumed_ones(procs, tmp_path, svc):
    site = Site(tmp_path / 'site', [svc.url], procs)
    port = free_port()
    ini_set(site.gateway_conf, 'gateway', 'handshake_rate', RATE)
    ini_set(site.gateway_conf, 'gateway', 'metrics_listen', f'127.0.0.1:{port}')
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    time.sleep(1.0)                        # the bucket full again (one second's worth)
    before = metrics(port)
    logged_before = gw.log_text().count('handshake_rate reached: full TLS handshakes wait')
    ctx = client_context(site)

    # N at once, all connected after t0: every full handshake done by t was admitted within
    # [t0, t], so at most RATE x (t - t0) + RATE (the burst) of them
    t0, results = connect_all(site, ctx)
    assert [r[1:3] for r in results] == [(False, 200)] * N
    times = sorted(r[0] - t0 for r in results)
    for k, t in enumerate(times, 1):
        assert k <= RATE * t + RATE, f'{k} full handshakes done {t:.2f} s after the start: ' \
                                     f'more than {RATE}/s + a burst of {RATE}'
    print(f'{N} full handshakes at {RATE}/s: first {times[0]:.2f} s, median {times[N // 2]:.2f} s, '
          f'last {times[-1]:.2f} s')
    logged = gw.log_text().count('handshake_rate reached: full TLS handshakes wait') - logged_before
    assert logged == 1, f'expected one log line for the episode, found {logged}'
    after = metrics(port)
    full = 'cmg_handshakes_total{resumed="false"}'
    assert after[full] - before[full] == N
    assert after['cmg_handshake_rate_pauses_total'] > before['cmg_handshake_rate_pauses_total']

    # N resumed at once: not charged, so not spread over N / RATE seconds
    time.sleep(1.0)
    t0, again = connect_all(site, ctx, [r[3] for r in results])
    assert [r[1:3] for r in again] == [(True, 200)] * N
    last = max(r[0] for r in again) - t0
    print(f'{N} resumed handshakes: last {last:.2f} s')
    assert last < (N - RATE) / RATE / 2, f'resumed handshakes were held back ({last:.2f} s)'
    final, resumed = metrics(port), 'cmg_handshakes_total{resumed="true"}'
    assert final[resumed] - after[resumed] == N and final[full] == after[full]


def timed_request(site, ctx, session=None):
    """(seconds to the answer, reused?, status, session) of one request on a new connection."""
    t = time.monotonic()
    sock = socket.create_connection((site.addr, site.port), timeout=30 * SLOW)
    with ctx.wrap_socket(sock, server_hostname=site.name, session=session) as s:
        s.sendall(get_request(site).encode())
        status, _, _ = read_response(s)
        while s.recv(65536):
            pass
        return time.monotonic() - t, s.session_reused, status, s.session


def test_a_connect_and_close_flood_costs_no_handshake_token(procs, tmp_path, svc):
    """TCP connections that close without a ClientHello take no token of handshake_rate: a
    flood of them at 15 times the rate delays no device."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    ini_set(site.gateway_conf, 'gateway', 'handshake_rate', 20)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    time.sleep(1.0)                        # the bucket full
    stop, flooded = threading.Event(), [0]

    def flood():
        while not stop.is_set():
            try:
                socket.create_connection((site.addr, site.port), timeout=5).close()
                flooded[0] += 1
            except OSError:
                pass
            time.sleep(0.005)

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)                    # the old design had stopped accepting by now
        served = [timed_request(site, client_context(site)) for _ in range(3)]
    finally:
        stop.set()
        for t in threads:
            t.join()
    print(f'{flooded[0]} connect+close in the flood; 3 full handshakes took '
          f'{", ".join(f"{s[0]:.3f}" for s in served)} s')
    assert flooded[0] > 100
    assert [s[2] for s in served] == [200] * 3
    assert max(s[0] for s in served) < 3 * SLOW, 'a device was delayed by the flood'
    assert 'handshake_rate reached' not in gw.log_text(), 'the flood took handshake tokens'


def test_resumed_devices_do_not_wait_behind_full_handshakes(procs, tmp_path, svc):
    """While N full handshakes wait their turn at RATE a second, a device that resumes its
    session is served at once."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    ini_set(site.gateway_conf, 'gateway', 'handshake_rate', RATE)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    ctx = client_context(site)
    session = timed_request(site, ctx)[3]
    time.sleep(1.0)
    waiting = threading.Thread(target=connect_all, args=(site, client_context(site)))
    waiting.start()
    poll(lambda: 'handshake_rate reached' in gw.log_text(), 5 * SLOW, 'full handshakes waiting')
    took, reused, status, _ = timed_request(site, ctx, session)
    waiting.join(60 * SLOW)
    print(f'resumed while {N} full handshakes waited at {RATE}/s: {took:.3f} s')
    assert (reused, status) == (True, 200)
    assert took < (N - 2 * RATE) / RATE / 2, f'the resumed device waited ({took:.2f} s)'


def hello_with_a_garbage_ticket(name):
    """A TLS 1.2 ClientHello offering a session ticket no key of the gateway made."""
    def ext(kind, body):
        return kind.to_bytes(2, 'big') + len(body).to_bytes(2, 'big') + body

    host = name.encode()
    sni = (len(host) + 3).to_bytes(2, 'big') + b'\x00' + len(host).to_bytes(2, 'big') + host
    sigs = bytes.fromhex('0403080404010503080505010601')
    exts = (ext(0x0000, sni) + ext(0x000a, bytes.fromhex('0004001d0017')) +
            ext(0x000b, b'\x01\x00') + ext(0x000d, len(sigs).to_bytes(2, 'big') + sigs) +
            ext(0x0017, b'') + ext(0xff01, b'\x00') + ext(0x0023, os.urandom(160)))
    suites = bytes.fromhex('c02fc02bc030c02c')
    body = (b'\x03\x03' + os.urandom(32) + b'\x20' + os.urandom(32) +
            len(suites).to_bytes(2, 'big') + suites + b'\x01\x00' +
            len(exts).to_bytes(2, 'big') + exts)
    hs = b'\x01' + len(body).to_bytes(3, 'big') + body
    return b'\x16\x03\x01' + len(hs).to_bytes(2, 'big') + hs


def test_offering_a_bogus_session_and_hanging_up_is_charged(procs, tmp_path, svc):
    """A ClientHello with a ticket the gateway cannot open gets a full handshake: it is
    charged at the ClientHello, so clients that offer garbage tickets and hang up once the
    server's first flight came still reach handshake_rate (and a real device then waits)."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    ini_set(site.gateway_conf, 'gateway', 'handshake_rate', RATE)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    time.sleep(1.0)                        # the bucket full
    flights = 0
    for _ in range(4 * RATE):
        with socket.create_connection((site.addr, site.port), timeout=10 * SLOW) as s:
            s.sendall(hello_with_a_garbage_ticket(site.name))
            first = s.recv(5)               # the server's first flight: its handshake was done
            flights += len(first) == 5 and first[0] == 0x16
    print(f'{flights} full first flights to garbage tickets')
    assert flights == 4 * RATE, 'the gateway did not answer the ClientHellos with a full handshake'
    poll(lambda: 'handshake_rate reached' in gw.log_text(), 5 * SLOW,
         'handshake_rate reached by bogus resumption offers')
    assert timed_request(site, client_context(site))[2] == 200


def test_a_file_being_copied_in_place_is_never_overwritten(procs, tmp_path, svc):
    """cp/scp truncate the file, then write it: an empty file at a re-read is unusable, the
    keys in force stay, and the instance writes nothing into it (ticket_key_rotate = 0)."""
    site = Site(tmp_path / 'site', [svc.url], procs)
    ini_set(site.gateway_conf, 'gateway', 'ticket_key_rotate', '0')
    keys = site.dir / 'ticket.keys'
    k1 = os.urandom(80).hex()
    keys.write_text(f'{int(time.time()) - 120} {k1}\n')
    keys.chmod(0o600)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    sess = tmp_path / 's.sess'
    assert s_client(site, '1.2', sess_out=sess) == (False, 200)
    with open(keys, 'r+') as f:
        f.truncate(0)                              # as cp does before it writes
        gw.signal(signal.SIGHUP, wait=False)
        gw.expected_exit = False
        poll(lambda: 'expected a key, found none' in gw.log_text(), 5 * SLOW, 'the warning',
             check=procs.check)
        assert keys.read_text() == '', 'the instance wrote into a file being copied'
        f.write(f'{int(time.time()) - 120} {k1}\n')    # the copy completes
    assert file_keys(keys) == [k1[:32]] and 'kept' in gw.log_text()
    assert s_client(site, '1.2', sess_in=sess) == (True, 200)


def test_a_key_dated_in_the_future_does_not_freeze_rotation(procs, tmp_path, svc):
    site = rotation_site(tmp_path, procs, svc)
    keys = site.dir / 'ticket.keys'
    future = os.urandom(80).hex()
    keys.write_text(f'{int(time.time()) + 10 ** 9} {future}\n')
    keys.chmod(0o600)
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    poll(lambda: file_keys(keys)[0] != future[:32], 10 * SLOW, 'a rotation', check=procs.check)
    warnings = [line for line in gw.log_text().splitlines() if 's ahead of this host' in line]
    assert len(warnings) == 1 and 'taken as made now' in warnings[0], warnings
    assert future[:32] not in gw.log_text()


def test_the_lock_is_never_waited_for(procs, tmp_path, svc):
    """Readers take no lock; a writer that finds ticket.keys.lock held skips its rotation
    (picked up at a later re-read) instead of waiting in the event loop."""
    site = rotation_site(tmp_path, procs, svc)
    keys = site.dir / 'ticket.keys'
    gw = start_gateway(procs, site)
    start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    first = file_keys(keys)
    py = PySession(site)
    with open(str(keys) + '.lock', 'a') as lock, open(keys) as held:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(held, fcntl.LOCK_EX)          # a reader of the old design would wait
        slowest = 0.0
        until = time.monotonic() + 4
        while time.monotonic() < until:
            gw.signal(signal.SIGHUP, wait=False)
            t = time.monotonic()
            assert py.request()[1] == 200
            slowest = max(slowest, time.monotonic() - t)
        assert file_keys(keys) == first, 'rotated while another process held the lock'
    gw.expected_exit = False
    print(f'requests with the lock held and a SIGHUP before each: slowest {slowest:.3f} s')
    assert slowest < 0.5 * SLOW
    poll(lambda: file_keys(keys)[0] != first[0], 5 * SLOW, 'the rotation once the lock is free',
         check=procs.check)
