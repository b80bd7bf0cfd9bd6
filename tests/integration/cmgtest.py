"""Helpers for the integration tests: ports, processes, the site, clients.

Everything runs on loopback (127.0.0.1; ::1 with site.addr) with ports the kernel hands out; every process started here is
stopped at teardown, and one that crashed, tripped a sanitizer or exited on its own fails
the test.
"""
import atexit
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent
CMG = os.path.abspath(os.environ.get('CMG_BIN') or HERE / '../../build/cmg')
SANITIZED = os.environ.get('CMG_SANITIZED', '0').strip().upper() in ('1', 'ON', 'TRUE', 'YES', 'Y')
SLOW = 4 if SANITIZED else 1          # factor for start-up and shutdown deadlines
PYTHON = '/usr/bin/python3'
SERVICE_NAME = 'cmg.test'
SANITIZER_MARKS = ('ERROR: AddressSanitizer', 'runtime error:', 'LeakSanitizer')
LOG_TAIL = 200                         # lines of each log shown for a failed test


# ---------------------------------------------------------------- waiting

def poll(fn, timeout, what, interval=0.02, check=None):
    """Call fn() until it returns something truthy; return that. AssertionError after
    `timeout` seconds. `check()` runs each round (e.g. to fail fast if a process died)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if check:
            check()
        try:
            result = fn()
            if result:
                return result
            last = result
        except (OSError, http.client.HTTPException) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout:.1f} s waiting for {what} (last: {last!r})')
        time.sleep(interval)


def free_port():
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    return free_port_range(1)


# Below the kernel's ephemeral range (32768-60999 by default): a port picked there
# can be taken by any outgoing connection of a test running alongside before our
# server binds it; here only another test's random pick can, which is rare.
PORT_LOW, PORT_HIGH = 10000, 32000

# Every port handed out in this process: a test picks several ports before any
# server binds one, so a free-looking port may already be promised elsewhere.
_handed_out = set()


# Test runs alongside this one (ctest -j, or another suite on the machine) pick from the
# same range: a port is claimed for this process by a file named after it, created
# exclusively; a claim whose process is gone is taken over.
_CLAIMS = os.path.join(tempfile.gettempdir(), 'cmg-test-ports')


def _claim_one(port):
    path = os.path.join(_CLAIMS, str(port))
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read() or 0)
                if pid == os.getpid():
                    return False
                os.kill(pid, 0)
                return False        # its process lives: the port is promised there
            except (ProcessLookupError, ValueError):
                try:
                    os.unlink(path)  # a claim left by a process that is gone
                except FileNotFoundError:
                    pass
                continue
            except (PermissionError, FileNotFoundError):
                return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        _claimed.append(path)
        return True
    return False


_claimed = []


@atexit.register
def _release_claims():
    for path in _claimed:
        try:
            os.unlink(path)
        except OSError:
            pass


def _claim(ports):
    os.makedirs(_CLAIMS, exist_ok=True)
    got = []
    for port in sorted(ports):
        if not _claim_one(port):
            for p in got:
                path = os.path.join(_CLAIMS, str(p))
                os.unlink(path)
                _claimed.remove(path)
            return False
        got.append(port)
    return True


def free_port_range(n):
    """The first of n consecutive ports that were free on 127.0.0.1 (for tunnel_port + instance)."""
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(PORT_LOW, PORT_HIGH - n)
        ports = set(range(base, base + n))
        if ports & _handed_out or not _claim(ports):
            continue
        socks = []
        try:
            for i in range(n):
                socks.append(socket.socket())
                socks[i].bind(('127.0.0.1', base + i))
            _handed_out.update(ports)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f'no {n} consecutive free ports')


# ---------------------------------------------------------------- processes

class Proc:
    def __init__(self, name, popen, log):
        self.name, self.popen, self.log = name, popen, log
        self.expected_exit = False      # set when the test stops it on purpose

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_text(self):
        try:
            return self.log.read_text(errors='replace')
        except OSError:
            return ''

    def signal(self, sig, wait=True):
        """Send sig on purpose (the exit is then not a failure); wait for the exit."""
        self.expected_exit = True
        if self.alive():
            self.popen.send_signal(sig)
        if wait:
            return self.popen.wait(timeout=10 * SLOW)

    def peak_rss_kib(self):
        """VmHWM: the peak resident set size of the process so far."""
        status = Path(f'/proc/{self.pid}/status').read_text()
        return int(re.search(r'^VmHWM:\s+(\d+) kB', status, re.M).group(1))

    def problems(self):
        """What is wrong with how this process ran or ended, as a list of sentences."""
        found = [f'{self.name}: sanitizer report ({m!r}) in {self.log}'
                 for m in SANITIZER_MARKS if m in self.log_text()]
        rc = self.popen.poll()
        if rc is not None and not self.expected_exit:
            found.append(f'{self.name} (pid {self.pid}) exited on its own with status {rc}')
        elif rc is not None and rc not in (0, -signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM):
            found.append(f'{self.name} (pid {self.pid}) exited with status {rc} when stopped')
        return found


class Processes:
    """Starts processes with their output in a log file in the test's directory; stops them
    all at teardown (SIGTERM, then SIGKILL) and reports what went wrong."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.procs = []
        self.notes = {}                 # extra text shown when the test fails

    def start(self, name, argv, stdout_pipe=False, env=None):
        log = self.tmp / f'{name}.log'
        n = 2
        while log.exists():
            log = self.tmp / f'{name}-{n}.log'
            n += 1
        full_env = dict(os.environ, **(env or {}))
        full_env.setdefault('ASAN_OPTIONS', 'detect_leaks=1:abort_on_error=0')
        full_env.setdefault('UBSAN_OPTIONS', 'print_stacktrace=1')
        with open(log, 'wb') as f:
            popen = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_pipe else f,
                                     stderr=f, env=full_env)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def check(self):
        """Fail now if a process died or reported a sanitizer error."""
        problems = [p for proc in self.procs for p in proc.problems()]
        if problems:
            raise AssertionError('; '.join(problems))

    def close(self):
        stubborn = []
        for proc in reversed(self.procs):
            if proc.alive() and not proc.expected_exit:
                proc.popen.send_signal(signal.SIGTERM)
                try:
                    proc.popen.wait(timeout=10 * SLOW)
                except subprocess.TimeoutExpired:
                    stubborn.append(f'{proc.name} did not exit within {10 * SLOW} s of SIGTERM')
                proc.expected_exit = True
            if proc.alive():
                proc.popen.kill()
                proc.popen.wait()
            if proc.popen.stdout:
                proc.popen.stdout.close()
        problems = stubborn + [p for proc in self.procs for p in proc.problems()]
        if problems:
            raise AssertionError('; '.join(problems))

    def report_sections(self):
        for name, text in self.notes.items():
            yield name, text
        for proc in self.procs:
            lines = proc.log_text().splitlines()
            head = f'[{proc.log}, last {LOG_TAIL} of {len(lines)} lines]\n' if len(lines) > LOG_TAIL else ''
            yield f'log {proc.name} (pid {proc.pid})', head + '\n'.join(lines[-LOG_TAIL:])


def run_cmg(*args, timeout=60, cwd=None):
    return subprocess.run([CMG, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout * SLOW, stdin=subprocess.DEVNULL, cwd=cwd)


# ---------------------------------------------------------------- the internal service

class InternalService:
    def __init__(self, procs, name):
        self.name = name
        self.proc = procs.start(f'service-{name}',
                                [PYTHON, HERE / 'internal_service.py', '--name', name],
                                stdout_pipe=True)
        line = self.proc.popen.stdout.readline().decode()
        assert line.startswith('PORT '), f'internal service did not start: {line!r}'
        self.port = int(line.split()[1])
        self.url = f'http://127.0.0.1:{self.port}/'

    def stats(self):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=10)
        try:
            conn.request('GET', '/__stats')
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    @property
    def count(self):
        """How many requests the service has seen (not counting /__stats)."""
        return self.stats()['requests']


# ---------------------------------------------------------------- INI files, textually

_SECTION = re.compile(r'^\s*\[\s*([^\]]*?)\s*\]')


def _section_bounds(lines, section):
    want = ' '.join(section.split())
    start = None
    for i, line in enumerate(lines):
        m = _SECTION.match(line)
        if m and start is not None:
            return start, i
        if m and ' '.join(m.group(1).split()) == want:
            start = i + 1
    if start is None:
        raise KeyError(f'no section [{section}]')
    return start, len(lines)


def ini_sections(path):
    return [m.group(1) for m in map(_SECTION.match, Path(path).read_text().splitlines()) if m]


def ini_get(path, section, key):
    """All values of `key` in [section], inline comments removed."""
    lines = Path(path).read_text().splitlines()
    start, end = _section_bounds(lines, section)
    key_re = re.compile(r'^\s*' + re.escape(key) + r'\s*=(.*)$')
    return [re.sub(r'\s[;#].*$', '', m.group(1)).strip()
            for m in map(key_re.match, lines[start:end]) if m]


def ini_set(path, section, key, *values):
    """Replace every `key = ...` line of [section] by one line per value (no values: remove
    the key). New keys go at the end of the section."""
    path = Path(path)
    lines = path.read_text().splitlines()
    start, end = _section_bounds(lines, section)
    key_re = re.compile(r'^\s*' + re.escape(key) + r'\s*=')
    where = [i for i in range(start, end) if key_re.match(lines[i])]
    at = where[0] if where else end
    while not where and at > start and not lines[at - 1].strip():
        at -= 1                         # before the blank lines that end the section
    kept = [line for i, line in enumerate(lines) if i not in where]
    at -= sum(1 for i in where if i < at)
    kept[at:at] = [f'{key} = {v}' for v in values]
    path.write_text('\n'.join(kept) + '\n')


# ---------------------------------------------------------------- certificates

DAY = datetime.timedelta(days=1)


def make_cert(path, cn, issuer_cert=None, issuer_key=None, ca=False,
              eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), valid_from=-1, valid_days=30, san=()):
    """Write path.crt/path.key: a P-256 certificate signed by issuer (self-signed if none),
    valid from `valid_from` days from now for `valid_days` days, with subjectAltNames `san`
    (IP addresses or DNS names). Returns (cert, key, (crt path, key path))."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = datetime.datetime.now(datetime.timezone.utc) + valid_from * DAY
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start)
               .not_valid_after(start + valid_days * DAY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    elif eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if san:
        names = []
        for n in san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                names.append(x509.DNSName(n))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    crt, pem_key = path.with_suffix('.crt'), path.with_suffix('.key')
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem_key.chmod(0o600)
    return cert, key, (crt, pem_key)


# ---------------------------------------------------------------- the site

class Site:
    """A site directory made by `cmg site init`, with its configs edited for loopback."""

    def __init__(self, path, internal_urls, procs=None, name=SERVICE_NAME, instances=1, init_args=()):
        self.dir = Path(path)
        self.name = name
        self.addr = '127.0.0.1'         # where clients connect for the service name (IPv4 or IPv6)
        self.port = free_port()
        self.tunnel_port = free_port_range(instances)
        args = ['site', 'init', self.dir, '--service-name', name]
        for url in internal_urls:
            args += ['--mp', url]
        args += ['--gateway-port', self.port, '--tunnel-port', self.tunnel_port, *init_args]
        r = run_cmg(*args)
        self.init_output = r.stdout
        if procs:
            procs.notes['cmg site init'] = f'exit {r.returncode}\n{r.stdout}\n{r.stderr}'
        assert r.returncode == 0, f'cmg site init failed ({r.returncode}):\n{r.stdout}\n{r.stderr}'
        self.urls = [line.strip() for line in r.stdout.splitlines() if line.startswith('https://')]
        assert len(self.urls) == len(internal_urls), f'expected one URL per --mp:\n{r.stdout}'
        self.role_ids = [url.rstrip('/').rsplit('/', 1)[1] for url in self.urls]
        self.gateway_conf = self.dir / 'gateway.conf'
        self.connector_conf = self.dir / 'connector.conf'
        self.ca = self.dir / 'ca.crt'
        self.device_cert = self.dir / 'devices' / 'device1.crt'
        self.device_key = self.dir / 'devices' / 'device1.key'
        self.loopback(instances)

    def loopback(self, instances):
        """Devices and connectors on 127.0.0.1 only, quick health pings, no metrics listener."""
        g, c = self.gateway_conf, self.connector_conf
        ini_set(g, 'gateway', 'listen', f'127.0.0.1:{self.port}')
        ini_set(g, 'gateway', 'tunnel_listen', '127.0.0.1')
        ini_set(g, 'gateway', 'tunnel_port', self.tunnel_port)
        ini_set(g, 'gateway', 'ping_interval', 2)
        ini_set(g, 'gateway', 'ping_timeout', 6)
        # SIGTERM drains: a connection a test leaves open must not hold up its teardown.
        ini_set(g, 'gateway', 'drain_timeout', 2)
        ini_set(c, 'connector', 'gateway', *[f'127.0.0.1:{self.tunnel_port + i}' for i in range(instances)])
        ini_set(c, 'connector', 'ping_interval', 2)
        ini_set(c, 'connector', 'ping_timeout', 6)
        ini_set(c, 'connector', 'reconnect_max', 1)
        ini_set(c, 'connector', 'drain_timeout', 2)
        # The default metrics ports are one per host: a test that wants metrics sets its own
        # (test_metrics.py), so that tests running side by side never contend for them.
        ini_set(g, 'gateway', 'metrics_listen', 'off')
        ini_set(c, 'connector', 'metrics_listen', 'off')
        ini_set(self.dir / 'site.conf', 'site', 'metrics_listen', 'off')

    def prefix(self, i=0):
        return f'/CCM_Proxy_MutualAuth/{self.role_ids[i]}'

    def path(self, rest, i=0):
        """The gateway path of internal path `rest` on role i."""
        return f'{self.prefix(i)}/{rest.lstrip("/")}'

    def url(self, rest, i=0):
        return f'https://{self.name}:{self.port}{self.path(rest, i)}'

    def connector_copy(self, name, internal_urls):
        """Another connector.conf in the site directory (relative paths keep working):
        connector `name`, role i forwarded to internal_urls[i]."""
        conf = self.dir / f'{name}.conf'
        shutil.copy(self.connector_conf, conf)
        ini_set(conf, 'connector', 'name', name)
        for role, url in zip(self.role_ids, internal_urls):
            ini_set(conf, f'mapping {role}', 'internal_url', url)
        return conf

    def device_thumbprint(self):
        der = ssl.PEM_cert_to_DER_cert(self.device_cert.read_text())
        return hashlib.sha256(der).hexdigest()


def joins_at_once(site):
    """Whether the gateway opens its device port at start (ready_timeout = 0), not once a
    connector's tunnel is up."""
    return ini_get(site.gateway_conf, 'gateway', 'ready_timeout')[-1:] == ['0']


def start_gateway(procs, site, instance=None, conf=None):
    """Start a gateway (with `conf`, default site.gateway_conf); return once it listens for
    connectors (its log says so) and, if it joins the device port at once (ready_timeout = 0),
    completes a TLS handshake there. Otherwise the device port opens once a connector is up:
    wait_ready() waits for that."""
    argv = [CMG, 'gateway', '-c', conf or site.gateway_conf]
    if instance is not None:
        argv += ['--instance', instance]
    proc = procs.start('gateway' if instance is None else f'gateway{instance}', argv)
    poll(lambda: 'listening for connectors on' in proc.log_text(), 10 * SLOW,
         'the gateway to listen for connectors', check=procs.check)
    if joins_at_once(site):
        def handshake():
            tls_connect(site).close()
            return True
        poll(handshake, 10 * SLOW, 'the gateway to accept devices', check=procs.check)
    return proc


def alone_gateway(site):
    """A gateway that answers devices without a connector: it joins the device port at once."""
    ini_set(site.gateway_conf, 'gateway', 'ready_timeout', 0)


def start_connector(procs, conf, name='connector'):
    return procs.start(name, [CMG, 'connector', '-c', conf])


def bring_up(procs, site, instances=1):
    """Gateway instance(s) and a connector for `site`, serving. Returns (gateways, connector)."""
    gateways = [start_gateway(procs, site, i if instances > 1 else None) for i in range(instances)]
    connector = start_connector(procs, site.connector_conf)
    wait_ready(procs, site)
    return gateways, connector


def poll_request(procs, site, path, until, timeout, what):
    """GET path on a new connection, again and again, until until(response) holds; return
    that response. Connection errors count as "not yet"."""
    def once():
        r = request(site, 'GET', path)
        return r if until(r) else None
    return poll(once, timeout, what, interval=0.01, check=procs.check)


def wait_ready(procs, site, rest='policy.xml', i=0, timeout=15):
    """Wait until a connector serves role i: a device request gets something other than 503."""
    return poll_request(procs, site, site.path(rest, i), lambda r: r.status != 503, timeout * SLOW,
                        f'a connector to serve {site.path(rest, i)}')


# ---------------------------------------------------------------- clients

def client_context(site, cert=None, key=None, alpn=('http/1.1',)):
    """TLS client context trusting the site CA, presenting cert/key (default: the sample
    device certificate; cert=False: none)."""
    ctx = ssl.create_default_context(cafile=str(site.ca))
    if cert is not False:
        ctx.load_cert_chain(str(cert or site.device_cert), str(key or site.device_key))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class DeviceConnection(http.client.HTTPSConnection):
    """http.client over TLS to the gateway on site.addr, with SNI and Host = the service name."""

    def __init__(self, site, timeout=30, **ctx_args):
        super().__init__(site.name, site.port, timeout=timeout, context=client_context(site, **ctx_args))
        self.addr = site.addr

    def connect(self):
        sock = socket.create_connection((self.addr, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f'<Response {self.status} {self.body[:80]!r}>'


def request(site, method, path, body=None, headers=None, timeout=30, **ctx_args):
    """One request on a new connection."""
    conn = DeviceConnection(site, timeout=timeout, **ctx_args)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


class CurlResult:
    def __init__(self, rc, status, version, body, stderr):
        self.rc, self.status, self.version, self.body, self.stderr = rc, status, version, body, stderr

    def __repr__(self):
        return f'<curl rc={self.rc} status={self.status} http/{self.version} body={self.body[:80]!r} stderr={self.stderr[-300:]!r}>'


_WRITE_OUT = '%{stderr}\nCMG-CURL %{http_code} %{http_version}\n'


def curl_argv(site, path, *args, http='1.1', cert=True, timeout=300):
    addr = f'[{site.addr}]' if ':' in site.addr else site.addr
    argv = ['curl', '-sS', '--resolve', f'{site.name}:{site.port}:{addr}', '--cacert', site.ca,
            f'--http{http}', '-w', _WRITE_OUT, '--max-time', timeout]
    if cert is True:
        argv += ['--cert', site.device_cert, '--key', site.device_key]
    elif cert:
        argv += ['--cert', cert[0], '--key', cert[1]]
    return [str(a) for a in argv + list(args) + [f'https://{site.name}:{site.port}{path}']]


def _curl_result(rc, body, stderr):
    m = re.search(r'^CMG-CURL (\d+) (\S+)$', stderr, re.M)
    status, version = (int(m.group(1)), m.group(2)) if m else (0, '')
    return CurlResult(rc, status, version, body, stderr)


def curl(site, path, *args, http='1.1', cert=True, timeout=30, input=None):
    """Run curl against the gateway; body from stdout, status and version from -w; `input`
    (bytes) is curl's stdin (for `-T -`). curl gives up after `timeout` seconds (exit status 28)."""
    stdin = {'input': input} if input is not None else {'stdin': subprocess.DEVNULL}
    p = subprocess.run(curl_argv(site, path, *args, http=http, cert=cert, timeout=timeout),
                       capture_output=True, timeout=timeout + 30, **stdin)
    return _curl_result(p.returncode, p.stdout, p.stderr.decode(errors='replace'))


class CurlProcess:
    """curl running in the background: the response body is hashed and counted as it arrives
    (never stored whole; `received` grows while it runs) and, if `upload` is an iterable of
    bytes, that is fed to curl's stdin as it is generated. curl is killed `timeout` + 30 s after
    its start at the latest; kill() it in a `finally` if the test may leave it running."""

    HEAD = 65536                        # a body up to this size is kept, for the result

    def __init__(self, site, path, *args, upload=None, http='1.1', timeout=300):
        self.timeout = timeout
        self.p = subprocess.Popen(curl_argv(site, path, *args, http=http, timeout=timeout),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.PIPE if upload else subprocess.DEVNULL)
        self.received, self.head = 0, b''
        self._sha, self._stderr = hashlib.sha256(), []
        self.timed_out = threading.Event()
        self._timer = threading.Timer(timeout + 30, self._expire)
        self._timer.daemon = True
        self._timer.start()
        self._threads = [threading.Thread(target=self._read_body, daemon=True),
                         threading.Thread(target=lambda: self._stderr.append(self.p.stderr.read()), daemon=True)]
        if upload:
            self._threads.append(threading.Thread(target=self._feed, args=(upload,), daemon=True))
        for t in self._threads:
            t.start()

    def _expire(self):
        self.timed_out.set()
        self.p.kill()

    def _feed(self, upload):
        try:
            for block in upload:
                self.p.stdin.write(block)
        except OSError:                 # curl gave up early: its exit status says why
            pass
        finally:
            try:
                self.p.stdin.close()
            except OSError:
                pass

    def _read_body(self):
        while True:
            data = self.p.stdout.read1(1 << 20)
            if not data:
                break
            self._sha.update(data)
            self.received += len(data)
            if len(self.head) < self.HEAD:
                self.head += data[:self.HEAD - len(self.head)]

    def alive(self):
        return self.p.poll() is None

    def kill(self):
        if self.alive():
            self.p.kill()
        self.wait()

    def wait(self, timeout=None):
        """Wait for curl to end (subprocess.TimeoutExpired after `timeout` s); the CurlResult,
        with body=b'' unless the body was small."""
        rc = self.p.wait(timeout)
        self._timer.cancel()
        for t in self._threads:
            t.join()
        stderr = b''.join(self._stderr).decode(errors='replace')
        return _curl_result(rc, self.head if self.received <= self.HEAD else b'', stderr)

    @property
    def sha256(self):
        return self._sha.hexdigest()


def curl_stream(site, path, *args, upload=None, http='1.1', timeout=300):
    """curl with the response body hashed as it arrives (never stored) and, if `upload` is an
    iterable of bytes, that fed to curl's stdin as it is generated.
    Returns (CurlResult with body=b'' unless small, sha256 hex, byte count)."""
    c = CurlProcess(site, path, *args, upload=upload, http=http, timeout=timeout)
    r = c.wait()
    assert not c.timed_out.is_set(), f'curl took longer than {timeout} s (got {c.received} bytes)'
    return r, c.sha256, c.received


def tls_connect(site, timeout=10, **ctx_args):
    sock = socket.create_connection((site.addr, site.port), timeout=timeout)
    return client_context(site, **ctx_args).wrap_socket(sock, server_hostname=site.name)


def read_response(sock):
    """Read one HTTP/1.1 response with a Content-Length (or none) from a socket.
    Returns (status or None if the peer closed first, header bytes, body)."""
    buf = b''
    while b'\r\n\r\n' not in buf:
        try:
            data = sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            data = b''
        if not data:
            return None, buf, b''
        buf += data
    head, body = buf.split(b'\r\n\r\n', 1)
    m = re.match(rb'HTTP/1\.[01] (\d{3})(?!\d)', head)
    if not m:
        return None, buf, b''
    status = int(m.group(1))
    m = re.search(rb'^content-length:\s*(\d+)', head, re.I | re.M)
    while m and len(body) < int(m.group(1)):
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return status, head, body



def pipelined_404s(site, n=300):
    """n pipelined requests for an unpublished path on one connection, each answered 404."""
    with tls_connect(site) as s:
        s.sendall(f'GET /not-published HTTP/1.1\r\nHost: {site.name}\r\n\r\n'.encode() * n)
        got = b''
        while got.count(b'HTTP/1.1 404') < n:
            data = s.recv(65536)
            assert data, f'closed after {got.count(b"HTTP/1.1 404")} answers'
            got += data

def peer_closed(sock, wait=2.0):
    """True if the peer closes the connection within `wait` seconds (nothing else arrives)."""
    sock.settimeout(wait * SLOW)
    try:
        return sock.recv(65536) == b''
    except socket.timeout:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def raw_exchange(site, data, wait_close=True):
    """Send raw bytes on a new TLS connection; return (status, closed afterwards, response).
    With wait_close=False, `closed` is only known if the peer closed before answering."""
    with tls_connect(site) as sock:
        sock.sendall(data)
        status, head, body = read_response(sock)
        closed = status is None or (wait_close and peer_closed(sock))
        return status, closed, head + b'\r\n\r\n' + body
