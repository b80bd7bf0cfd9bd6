#!/usr/bin/python3
"""The engine of bench/run: stands up four ways of reaching one internal service
on 127.0.0.0/8, drives each in turn with the same load (A B A B ...), and prints
one Markdown table of medians and ratios (plus CSV, JSON and the raw runs).

Systems: direct (TLS straight to the internal nginx), nginx (a TLS-terminating
reverse proxy), nginx + ssh -R (the same proxy reaching the service through an
OpenSSH reverse tunnel dialled from the inside) and OpenCMG (gateway + tunnel +
connector). See bench/README.md for what each figure means.
"""
import argparse
import csv
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = 'cmg.bench.test'
CLK_TCK = os.sysconf('SC_CLK_TCK')
SYSTEMS = ['direct', 'nginx', 'ssh', 'opencmg']     # the table's order
RUN_ORDER = ['nginx', 'opencmg', 'ssh', 'direct']   # each round's order: the key pairs run side by side
LABEL = {'direct': 'direct', 'nginx': 'nginx', 'ssh': 'nginx + ssh -R', 'opencmg': 'OpenCMG',
         'nchan': 'nginx + nchan'}
# Process groups (a process and its descendants) whose CPU time is read, per system.
GROUPS = {'direct': ['internal'],
          'nginx': ['front', 'internal'],
          'ssh': ['front', 'sshd', 'ssh', 'internal'],
          'opencmg': ['gateway', 'connector', 'internal'],
          'nchan': []}   # the notification scenario reads its own processes' CPU
GROUP_LABEL = {'client': 'load tool', 'front': 'nginx (proxy)', 'sshd': 'sshd', 'ssh': 'ssh -R',
               'gateway': 'cmg gateway', 'connector': 'cmg connector', 'internal': 'nginx (service)'}
ALL_GROUPS = ['client', 'front', 'sshd', 'ssh', 'gateway', 'connector', 'internal']
# A scenario's figures rest on its undisturbed rounds alone only if this many are left.
CLEAN_ENOUGH = 3
# Scenarios judged by a tail percentile: their ratios come from the quieter half of the rounds.
TAIL_SCENARIOS = {'rate'}
# The side of each system that faces the devices: its memory per idle connection.
EDGE = {'direct': ['internal'], 'nginx': ['front'], 'ssh': ['front', 'sshd'], 'opencmg': ['gateway']}

# The speed of a shared machine drifts by tens of per cent within seconds: many
# short rounds, taken in turn, and ratios computed within each round, beat a few
# long ones.
SIZES = {
    'full': dict(rounds=dict(h1=5, h2=5, rate=12, newconn=5, download=3, upload=3, idle=2, x=3, notify=3),
                 dur=2.0, warm=0.5, conns=64, h2_conns=8, h2_streams=8,
                 rate=1000, rate_conns=32, rate_dur=2.0, newconn_conns=16,
                 download=1 << 30, upload=256 << 20, idle=10000, idle_procs=2, hold=2.0,
                 xdur=2, xwarm=1, xpaths=dict(h1=('direct', 'nginx', 'ssh'), h2=('direct', 'nginx')),
                 reruns=20, channels=100000, notify_connect_rate=500, notify_settle=10, notify_single=20),
    'tiny': dict(rounds=dict(h1=2, h2=2, rate=2, newconn=2, download=2, upload=2, idle=2, x=1, notify=1),
                 dur=0.3, warm=0.1, conns=8, h2_conns=2, h2_streams=4,
                 rate=200, rate_conns=4, rate_dur=0.3, newconn_conns=4,
                 download=8 << 20, upload=2 << 20, idle=200, idle_procs=2, hold=0.3,
                 xdur=1, xwarm=0, xpaths=dict(h1=('nginx',), h2=('nginx',)), reruns=0,
                 channels=200, notify_connect_rate=2000, notify_settle=3, notify_single=5),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

def proc_table():
    """pid -> (ppid, utime + stime in ticks) for every process."""
    table = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open(f'/proc/{d}/stat') as f:
                rest = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        table[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return table


def stat_ticks():
    """(busy, steal): CPU ticks the machine spent running something (all CPUs), and
    those the hypervisor gave to someone else, from /proc/stat."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v) - v[3] - v[4] - v[7], v[7]   # user nice system irq softirq; steal


def descendants(table, root):
    kids = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in table:
            out.append(p)
            todo.extend(kids.get(p, []))
    return out


def rss_kib(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            m = re.search(r'^VmRSS:\s+(\d+) kB', f.read(), re.M)
        return int(m.group(1)) if m else 0
    except OSError:
        return 0


class Procs:
    """The processes of the bench: started with their output in a log file,
    stopped (SIGTERM, then SIGKILL) in reverse order at the end, whatever happens."""

    def __init__(self, logdir):
        self.logdir = Path(logdir)
        self.procs = {}

    def start(self, name, argv, env=None):
        log_path = self.logdir / f'{name}.log'
        with open(log_path, 'ab') as f:
            p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env=dict(os.environ, **(env or {})))
        self.procs[name] = p
        return p

    def pid(self, name):
        p = self.procs.get(name)
        return p.pid if p and p.poll() is None else None

    def alive(self, name):
        return self.pid(name) is not None

    def stop(self, name, sig=signal.SIGTERM):
        p = self.procs.pop(name, None)
        if not p:
            return
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for name in reversed(list(self.procs)):
            self.stop(name)

    def groups(self):
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}


def free_ports(n):
    """n TCP ports that were free on 127.0.0.1 a moment ago. They are taken below the
    kernel's ephemeral range (32768-60999 by default): a port from that range could go to an
    outgoing connection (ssh -R dials out while later servers are still starting) before
    the server meant to listen on it binds it."""
    rng = random.SystemRandom()
    socks, ports = [], []
    try:
        for _ in range(100 * n):
            if len(ports) == n:
                break
            s = socket.socket()
            try:
                s.bind(('127.0.0.1', rng.randrange(10000, 32000)))
            except OSError:
                s.close()
                continue
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    if len(ports) < n:
        raise RuntimeError(f'no {n} free ports on 127.0.0.1 between 10000 and 32000')
    return ports


def free_port_range(n):
    """The first of n consecutive TCP ports free on 127.0.0.1 a moment ago (below the
    ephemeral range, as free_ports)."""
    rng = random.SystemRandom()
    for _ in range(200):
        base = rng.randrange(10000, 32000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(('127.0.0.1', p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f'no {n} consecutive free ports on 127.0.0.1 between 10000 and 32000')


def wait_port(port, procs, name, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.alive(name):
            raise RuntimeError(f'{name} exited during start-up; see {procs.logdir}/{name}.log')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f'{name} does not listen on 127.0.0.1:{port} after {timeout} s')


# ---------------------------------------------------------------- notifications

NOTIFY_PER_GATEWAY = 18000   # channels per gateway instance / nginx worker (20,000 descriptors each)
NOTIFY_PER_LOAD = 19000      # channels per cmg-load process
NOTIFY_SYSTEMS = ['nchan', 'opencmg']
NOTIFY_LABEL = {'nchan': 'nginx + nchan', 'opencmg': 'OpenCMG'}


def ceil_div(a, b):
    return -(-a // b)


class NotifyLoad:
    """The cmg-load --notify processes of one system: each holds its share of the channels
    and answers commands on stdin with a JSON line."""

    def __init__(self, bench, system, port, path, n, first_src, key_data):
        self.bench, self.system, self.n = bench, system, n
        self.procs = []
        self.ids = []          # device id of channel i (OpenCMG: cert:<thumbprint>)
        nprocs = ceil_div(n, NOTIFY_PER_LOAD)
        w = bench.work
        for j in range(nprocs):
            share = n // nprocs + (j < n % nprocs)
            offset = j * (n // nprocs) + min(j, n % nprocs)
            src = f'127.0.{first_src}.{4 * j + 1}-127.0.{first_src}.{4 * j + 4}'
            argv = [bench.load, '--notify', '-q', '-c', share, '--device-offset', offset,
                    '--connect', f'127.0.0.1:{port}', '--cacert', bench.n_ca,
                    '--mint-ca', bench.n_ca, '--mint-ca-key', bench.n_ca_key, '--bind', src,
                    '--connect-rate', bench.size['notify_connect_rate'], '--concurrency', 64,
                    '--ids-out', w / f'ids-{system}-{j}.txt', '--max-time', 1800]
            if key_data:
                argv.append('--key-data')
            argv.append(f'https://{NAME}:{port}{path}')
            err = open(w / f'load-{system}-{j}.log', 'ab')
            p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=err, text=True, bufsize=1)
            err.close()
            self.procs.append(p)

    def wait_up(self, timeout):
        """Until every process said 'up': (channels up, seconds to set up, first error)."""
        up, slowest, errors = 0, 0.0, []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            j = self.read(p, max(1, deadline - time.monotonic()))
            up += j['up']
            slowest = max(slowest, j['establish_s'])
            if j['first_error']:
                errors.append(j['first_error'])
        for j in range(len(self.procs)):
            self.ids += (self.bench.work / f'ids-{self.system}-{j}.txt').read_text().split()
        return up, slowest, errors[0] if errors else ''

    @staticmethod
    def read(p, timeout):
        import select
        r, _, _ = select.select([p.stdout], [], [], timeout)
        line = p.stdout.readline() if r else ''
        if not line:
            raise RuntimeError(f'cmg-load --notify (pid {p.pid}) gave no answer in {timeout:.0f} s')
        return json.loads(line)

    def ask(self, command, timeout=30):
        for p in self.procs:
            p.stdin.write(command + '\n')
            p.stdin.flush()
        return [self.read(p, timeout) for p in self.procs]

    def events(self):
        return sum(j['events'] for j in self.ask('stats'))

    def cpu_ticks(self):
        table = proc_table()
        return sum(table[p.pid][1] for p in self.procs if p.pid in table)

    def up(self):
        return sum(j['up'] for j in self.ask('stats'))

    def dump(self):
        """What arrived since the last dump, merged: key -> [arrival ns, ...]."""
        merged = {}
        for j, p in enumerate(self.procs):
            path = self.bench.work / f'arrivals-{self.system}-{j}.txt'
            p.stdin.write(f'dump {path}\n')
            p.stdin.flush()
            if not self.read(p, 60)['ok']:
                raise RuntimeError(f'cmg-load could not write {path}')
            for line in path.read_text().splitlines():
                f = line.split(' ')
                merged.setdefault(f[0], []).extend(int(t) for t in f[4:])
            path.unlink()
        return merged

    def stop(self):
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        self.procs = []
        return codes


class NotifyBench:
    """The notification scenario: N SSE channels held on OpenCMG (site serve, a connector
    on the site's feed, K gateway instances sharing the device port) and on nginx + nchan
    (K workers, a channel per device plus 'all'), side by side; rounds of 'notify all', a
    list of 1,000 and of 10,000, each timed from the publishing call to the last delivery
    (one clock: every load process stamps CLOCK_REALTIME), and a replay check."""

    def __init__(self, bench):
        self.b = bench
        self.z = bench.size
        self.n = bench.args.channels or self.z['channels']
        self.k = ceil_div(self.n, NOTIFY_PER_GATEWAY)
        self.loads = {}
        self.pub_conn = None
        # OpenCMG is left out with --systems without it (nchan alone checks the load tool)
        self.systems = [s for s in NOTIFY_SYSTEMS if s != 'opencmg' or 'opencmg' in bench.systems]

    # ------------------------------------------------------------ set-up

    def setup_site(self):
        b = self.b
        w = b.work
        (self.p_gw, self.p_admin, self.p_service, self.p_feed, self.p_nchan,
         self.p_pub) = free_ports(6)
        self.p_tun = free_port_range(self.k)
        site = w / 'site-notify'
        r = subprocess.run([b.cmg, 'site', 'init', site, '--service-name', NAME,
                            '--mp', f'http://127.0.0.1:{b.p_int}/',
                            '--gateway-port', str(self.p_gw), '--tunnel-port', str(self.p_tun),
                            '--site-admin', f'127.0.0.1:{self.p_admin}',
                            '--site-service', f'127.0.0.1:{self.p_service}',
                            '--site-feed', f'127.0.0.1:{self.p_feed}'],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f'cmg site init (notify) failed:\n{r.stdout}\n{r.stderr}')
        self.site = site
        b.n_ca, b.n_ca_key = site / 'ca.crt', site / 'ca.key'
        self.token = (site / 'admin.token').read_text().strip()
        per = ceil_div(self.n, self.k)
        b.edit_ini(site / 'gateway.conf', 'gateway', {
            'listen': f'127.0.0.1:{self.p_gw}', 'tunnel_listen': '127.0.0.1',
            'max_connections': str(min(19000, per + max(1000, per // 20)))})
        b.edit_ini(site / 'connector.conf', 'connector', {
            'gateway': '\ngateway = '.join(f'127.0.0.1:{self.p_tun + i}' for i in range(self.k)),
            'reconnect_max': '1'})

    def start_opencmg(self):
        b = self.b
        b.procs.start('n-site', [b.cmg, 'site', 'serve', self.site])
        wait_port(self.p_admin, b.procs, 'n-site')
        for i in range(self.k):
            b.procs.start(f'n-gateway{i}', [b.cmg, 'gateway', '-c', self.site / 'gateway.conf',
                                            '--instance', i])
            wait_port(self.p_tun + i, b.procs, f'n-gateway{i}')
        b.procs.start('n-connector', [b.cmg, 'connector', '-c', self.site / 'connector.conf'])
        wait_port(self.p_gw, b.procs, 'n-connector', timeout=30)

    def write_nchan_conf(self):
        b = self.b
        w = b.work
        (w / 'tmp-nchan').mkdir(exist_ok=True)
        shm = max(64, ceil_div(self.n * 4, 1024) + 64)   # MiB: channels, subscribers, messages
        conf = b.nginx_head('nchan', 19500).replace('worker_processes 1;', f'worker_processes {self.k};')
        conf = 'load_module /usr/lib/nginx/modules/ngx_nchan_module.so;\n' + conf + f'''http {{
    access_log off;
    client_body_temp_path {w}/tmp-nchan/body;
    proxy_temp_path {w}/tmp-nchan/proxy;
    fastcgi_temp_path {w}/tmp-nchan/fastcgi;
    uwsgi_temp_path {w}/tmp-nchan/uwsgi;
    scgi_temp_path {w}/tmp-nchan/scgi;
    client_max_body_size 16m;
    nchan_shared_memory_size {shm}m;
    nchan_message_buffer_length 16;
    nchan_message_timeout 1h;
    # a channel per device (the CN of its certificate) plus one for all
    map $ssl_client_s_dn $device {{ ~CN=(?<cn>[^,/]+) $cn; default none; }}
    server {{
        listen 127.0.0.1:{self.p_nchan} ssl reuseport;
        ssl_certificate {self.site}/gateway.crt;
        ssl_certificate_key {self.site}/gateway.key;
        ssl_client_certificate {self.site}/ca.crt;
        ssl_verify_client on;
        ssl_protocols TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        location = /CCM_Notify {{
            nchan_subscriber eventsource;
            nchan_channel_id $device all;
            nchan_subscriber_first_message newest;
            nchan_eventsource_ping_interval 0;
        }}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{self.p_pub};
        location = /pub {{
            nchan_publisher;
            nchan_channel_id $arg_id;
            nchan_channel_id_split_delimiter ",";
            nchan_max_channel_id_length 8192;
        }}
    }}
}}
'''
        (w / 'nchan.conf').write_text(conf)

    def setup(self):
        self.setup_site()
        self.write_nchan_conf()
        self.b.start_nginx('nchan', self.p_nchan)
        if 'opencmg' in self.systems:
            self.start_opencmg()

    # ------------------------------------------------------------ measuring

    def pids(self, system):
        """The device-facing processes: the gateway instances, or the nginx workers."""
        b = self.b
        table = proc_table()
        groups = b.procs.groups()
        if system == 'nchan':
            return [p for p in descendants(table, groups['nchan']) if p != groups['nchan']]
        return [groups[f'n-gateway{i}'] for i in range(self.k)]

    def cpu_ticks(self, pids):
        table = proc_table()
        return sum(table[p][1] for p in pids if p in table)

    def rss(self, pids):
        return sum(rss_kib(p) for p in pids)

    def hold(self, system):
        """Opens the N channels of a system; records the memory they cost."""
        b = self.b
        pids = self.pids(system)
        others = {'connector': b.procs.pid('n-connector'), 'site': b.procs.pid('n-site')}
        time.sleep(0.3)
        before = self.rss(pids)
        other_before = {k: rss_kib(v) for k, v in others.items()} if system == 'opencmg' else {}
        port = self.p_gw if system == 'opencmg' else self.p_nchan
        t0 = time.monotonic()
        load = NotifyLoad(b, system, port, '/CCM_Notify', self.n, 1 if system == 'opencmg' else 2,
                          key_data=system == 'nchan')
        self.loads[system] = load
        up, est, err = load.wait_up(timeout=2400)
        time.sleep(min(1.0, 0.2 + self.n / 100000))
        held = self.rss(pids)
        rec = {'scenario': 'notify-hold', 'system': system, 'tool': 'cmg-load', 'round': 1,
               'channels': self.n, 'up': up, 'establish_s': est, 'wall_s': round(time.monotonic() - t0, 3),
               'rss_before_kib': before, 'rss_held_kib': held,
               'kib_per_channel': round((held - before) / up, 2) if up else None}
        for k, pid in others.items():
            if system == 'opencmg':
                rec[f'{k}_rss_before_kib'] = other_before[k]
                rec[f'{k}_rss_held_kib'] = rss_kib(pid)
        if up != self.n:
            rec['error'] = f'{up} of {self.n} channels up; first error: {err}'
        b.runs.append(rec)
        log(f'    {NOTIFY_LABEL[system]:<15} {up} of {self.n} channels up in {est:.1f} s; '
            f'{rec["kib_per_channel"]} KiB per channel'
            + (f' (connector {rec["connector_rss_before_kib"]} → {rec["connector_rss_held_kib"]} KiB)'
               if system == 'opencmg' else '') + (f'  ERROR: {rec["error"]}' if 'error' in rec else ''))

    def api(self, op, body):
        import ssl
        import urllib.request
        req = urllib.request.Request(f'https://127.0.0.1:{self.p_admin}/v1/ops/{op}', method='POST',
                                     data=json.dumps(body).encode())
        req.add_header('Authorization', f'Bearer {self.token}')
        req.add_header('Content-Type', 'application/json')
        ctx = ssl.create_default_context(cafile=str(self.site / 'ca.crt'))
        ctx.check_hostname = False
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            return json.loads(r.read())

    def publish(self, channels, body):
        """nchan: one POST per up to 255 channels (its multi-channel publish)."""
        import http.client
        for i in range(0, len(channels), 255):
            if self.pub_conn is None:
                self.pub_conn = http.client.HTTPConnection('127.0.0.1', self.p_pub, timeout=60)
            self.pub_conn.request('POST', '/pub?id=' + ','.join(channels[i:i + 255]), body=body,
                                  headers={'Content-Type': 'text/plain'})
            r = self.pub_conn.getresponse()
            r.read()
            if r.status >= 300:
                raise RuntimeError(f'nchan publish answered {r.status}')

    def send(self, system, kind, targets, tag):
        """Publishes one notification; returns (event key, time of the call in ns)."""
        if system == 'nchan':
            t0 = time.time_ns()
            self.publish(['all'] if targets is None else [f'bench-device-{i}' for i in targets], tag)
            return tag, t0
        load = self.loads['opencmg']
        body = {'type': 'bench', 'data': {'round': tag}, 'ttl': 3600}
        if targets is None:
            body['all'] = True
        else:
            body['devices'] = [load.ids[i] for i in targets]
        t0 = time.time_ns()
        res = self.api('notify', body)
        return res['id'], t0

    def wait_delivered(self, load, want, settle):
        """Until `want` events arrived (or nothing more came for `settle` s)."""
        last, last_change = -1, time.monotonic()
        while True:
            got = load.events()
            if got >= want:
                return got
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > settle:
                return got
            time.sleep(0.02)

    def round(self, system, kind, targets, rnd):
        b = self.b
        load = self.loads[system]
        pids = self.pids(system)
        extra = {'connector': b.procs.pid('n-connector'), 'site': b.procs.pid('n-site')} \
            if system == 'opencmg' else {}
        want = load.up() if targets is None else len(targets)
        load.dump()   # forget anything before
        c0, l0 = self.cpu_ticks(pids), load.cpu_ticks()
        x0 = {k: self.cpu_ticks([v]) for k, v in extra.items()}
        cpu0 = b.cpu_snapshot()
        tag = f'r{rnd}-{kind}-{system}'
        key, t0 = self.send(system, kind, targets, tag)
        got = self.wait_delivered(load, want, self.z['notify_settle'])
        c1, l1 = self.cpu_ticks(pids), load.cpu_ticks()
        x1 = {k: self.cpu_ticks([v]) for k, v in extra.items()}
        cpu1 = b.cpu_snapshot()
        arrivals = load.dump()
        times = sorted(t - t0 for t in arrivals.get(key, []))
        rec = {'scenario': f'notify-{kind}', 'system': system, 'tool': 'cmg-load', 'round': rnd,
               'targets': want, 'delivered': len(times)}
        if times:
            pick = lambda q: times[min(len(times) - 1, int(q * len(times)))] / 1e6
            rec.update(first_ms=round(times[0] / 1e6, 2), p50_ms=round(pick(0.5), 2),
                       p99_ms=round(pick(0.99), 2), last_ms=round(times[-1] / 1e6, 2))
            rec['server_cpu_us_per_delivery'] = round((c1 - c0) / CLK_TCK / len(times) * 1e6, 2)
            for k in extra:
                rec[f'{k}_cpu_us_per_delivery'] = round((x1[k] - x0[k]) / CLK_TCK / len(times) * 1e6, 2)
        wall = max(0.001, (time.time_ns() - t0) / 1e9)
        b.account(rec, cpu0, cpu1, (l1 - l0) / CLK_TCK, wall, 'nchan')
        if len(times) != want:
            rec['error'] = f'{len(times)} of {want} delivered ({got} events in all)'
        b.runs.append(rec)
        log(f'    notify {kind:<6} {NOTIFY_LABEL[system]:<15} r{rnd}: {len(times)}/{want} delivered, '
            f'first {rec.get("first_ms")} p50 {rec.get("p50_ms")} p99 {rec.get("p99_ms")} '
            f'last {rec.get("last_ms")} ms; {rec.get("server_cpu_us_per_delivery")} µs CPU per delivery'
            + (f'  ERROR: {rec["error"]}' if 'error' in rec else ''))

    def single(self, system, rnd):
        """Notifications to one device at a time, each waited for: the latency a single
        device sees (its p99 over the samples)."""
        load = self.loads[system]
        count = self.z['notify_single']
        lat = []
        for i in range(count):
            load.dump()
            device = (rnd * count + i) * 7919 % self.n
            key, t0 = self.send(system, 'one', [device], f'r{rnd}-one{i}-{system}')
            self.wait_delivered(load, 1, self.z['notify_settle'])
            lat += [t - t0 for t in load.dump().get(key, [])]
        lat.sort()
        rec = {'scenario': 'notify-one', 'system': system, 'tool': 'cmg-load', 'round': rnd,
               'targets': count, 'delivered': len(lat)}
        if lat:
            pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1e6
            rec.update(first_ms=round(lat[0] / 1e6, 2), p50_ms=round(pick(0.5), 2),
                       p99_ms=round(pick(0.99), 2), last_ms=round(lat[-1] / 1e6, 2))
        if len(lat) != count:
            rec['error'] = f'{len(lat)} of {count} single-device notifications delivered'
        self.b.runs.append(rec)
        log(f'    notify one    {NOTIFY_LABEL[system]:<15} r{rnd}: {len(lat)}/{count} delivered, '
            f'min {rec.get("first_ms")} p50 {rec.get("p50_ms")} p99 {rec.get("p99_ms")} max {rec.get("last_ms")} ms'
            + (f'  ERROR: {rec["error"]}' if 'error' in rec else ''))

    def replay(self, system):
        """Mark every channel, send 3 to all, reconnect a tenth of the channels with the
        marked Last-Event-ID: each must get exactly the 3, once."""
        load = self.loads[system]
        m = max(1, self.n // 10)
        load.ask('mark')
        for i in range(3):
            want = load.up()
            load.dump()
            self.send(system, 'all', None, f'replay{i}-{system}')
            self.wait_delivered(load, want, self.z['notify_settle'])
        load.dump()
        per = [m // len(load.procs) + (j < m % len(load.procs)) for j in range(len(load.procs))]
        for p, share in zip(load.procs, per):
            p.stdin.write(f'replay {share}\n')
            p.stdin.flush()
        for p in load.procs:
            load.read(p, 30)
        t0 = time.monotonic()
        while True:
            stats = load.ask('replay-stats')
            done = sum(s['up'] for s in stats) == m and sum(s['events'] for s in stats) >= 3 * m
            if done or time.monotonic() - t0 > self.z['notify_settle'] * 4 + m / 100:
                break
            time.sleep(0.05)
        up = sum(s['up'] for s in stats)
        events = sum(s['events'] for s in stats)
        lo = min(s['min'] for s in stats if s['channels'])
        hi = max(s['max'] for s in stats)
        rec = {'scenario': 'notify-replay', 'system': system, 'tool': 'cmg-load', 'round': 1,
               'replayed': m, 'replay_up': up, 'replay_events': events, 'replay_min': lo,
               'replay_max': hi, 'replay_s': round(time.monotonic() - t0, 3)}
        if up != m or lo != 3 or hi != 3:
            rec['error'] = f'{up} of {m} reconnected; each got {lo}..{hi} events, 3 expected'
        self.b.runs.append(rec)
        log(f'    replay {NOTIFY_LABEL[system]:<15}: {up}/{m} reconnected with Last-Event-ID, '
            f'{lo}..{hi} events each (3 missed) in {rec["replay_s"]} s'
            + (f'  ERROR: {rec["error"]}' if 'error' in rec else ''))

    def run(self):
        z = self.z
        log(f'  notifications: {self.n} SSE channels (mutual TLS, a certificate each) on OpenCMG '
            f'({self.k} gateway instance(s)) and nginx + nchan ({self.k} worker(s)), '
            f'{ceil_div(self.n, NOTIFY_PER_LOAD)} cmg-load process(es) each')
        t0 = time.monotonic()
        try:
            self.setup()
            for s in self.systems:
                self.hold(s)
            small, large = min(1000, max(1, self.n // 4)), min(10000, max(1, self.n // 2))
            spread = lambda k: [i * self.n // k for i in range(k)]
            kinds = [('all', None), (f'list{small}', spread(small)), (f'list{large}', spread(large))]
            self.kinds = [k for k, _ in kinds]
            for rnd in range(1, z['rounds']['notify'] + 1):
                for kind, targets in kinds:
                    for s in self.systems:
                        self.b.check_alive()
                        self.round(s, kind, targets, rnd)
                for s in self.systems:
                    self.single(s, rnd)
            for s in self.systems:
                self.replay(s)
        finally:
            for s, load in self.loads.items():
                codes = load.stop()
                hold = next((r for r in self.b.runs if r['scenario'] == 'notify-hold' and r['system'] == s), None)
                if any(codes) and hold is not None and 'error' not in hold:
                    hold['error'] = (f'cmg-load exited with {codes}; see load-{s}-*.log')
            for name in ['n-connector'] + [f'n-gateway{i}' for i in range(self.k)] + ['n-site', 'nchan']:
                self.b.procs.stop(name)
        log(f'    ({time.monotonic() - t0:.0f} s)')


# ---------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.size = dict(SIZES['tiny' if args.quick else 'full'])
        if args.rounds:
            self.size['rounds'] = {k: args.rounds for k in self.size['rounds']}
        if args.idle_conns:
            self.size['idle'] = args.idle_conns
        if args.rate:
            self.size['rate'] = args.rate
        self.cmg = Path(args.cmg).resolve()
        self.load = Path(args.load).resolve()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        base = '/dev/shm' if os.access('/dev/shm', os.W_OK) else None
        self.work = Path(tempfile.mkdtemp(prefix='opencmg-bench-', dir=base))
        self.procs = Procs(self.work)
        self.runs = []             # one dict per measurement
        self.systems = [s for s in RUN_ORDER if s in args.systems.split(',')]
        self.reruns = 0
        self.pairs_used = {}   # (scenario, other system) -> (rounds used, rounds, 'quietest'/'undisturbed'/'all')
        self.waited = 0.0
        self.quiet_probe = 0.2 if args.quick else 0.5
        self.nginx = shutil.which('nginx') or '/usr/sbin/nginx'

    # ------------------------------------------------------------ set-up

    def setup(self):
        w = self.work
        (self.p_int, self.p_int_tls, self.p_int_tls_nc, self.p_front, self.p_front_nc,
         self.p_front_ssh, self.p_front_ssh_nc, self.p_sshd, self.p_fwd, self.p_gw,
         self.p_tun) = free_ports(11)
        # The site: CA, server and device certificates, gateway.conf, connector.conf.
        site = w / 'site'
        r = subprocess.run([self.cmg, 'site', 'init', site, '--service-name', NAME,
                            '--mp', f'http://127.0.0.1:{self.p_int}/',
                            '--gateway-port', str(self.p_gw), '--tunnel-port', str(self.p_tun)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f'cmg site init failed:\n{r.stdout}\n{r.stderr}')
        m = re.search(r'^https://\S+/CCM_Proxy_MutualAuth/([A-Za-z0-9_-]+)/?$', r.stdout, re.M)
        if not m:
            raise RuntimeError(f'cmg site init printed no device URL:\n{r.stdout}')
        self.role = m.group(1)
        self.site = site
        self.ca, self.crt, self.key = site / 'ca.crt', site / 'gateway.crt', site / 'gateway.key'
        self.dev_crt, self.dev_key = site / 'devices/device1.crt', site / 'devices/device1.key'
        self.edit_ini(site / 'gateway.conf', 'gateway', {
            'listen': f'127.0.0.1:{self.p_gw}', 'tunnel_listen': '127.0.0.1',
            'max_connections': str(max(19000, self.size['idle'] + 100)),
            'idle_timeout': '300'})
        self.edit_ini(site / 'connector.conf', 'connector', {
            'gateway': f'127.0.0.1:{self.p_tun}', 'reconnect_max': '1',
            'site': None, 'site_secret': None})   # no site service: the static mapping serves

        # The internal service's files, in memory (tmpfs) where possible.
        www = w / 'www'
        (www / 'upload').mkdir(parents=True)
        (www / 'small.bin').write_bytes(bytes((i * 7) & 0xff for i in range(1024)))
        with open(www / 'big.bin', 'wb') as f:   # sparse: no page of it is ever written
            f.truncate(self.size['download'])
        for d in ('int', 'front'):
            (w / f'tmp-{d}').mkdir()
        self.write_internal_conf()
        self.write_front_conf()
        self.start_internal()
        self.start_front()
        if 'ssh' in self.systems:
            self.start_ssh()
        if 'opencmg' in self.systems:
            self.start_opencmg()
        self.check_paths()

    @staticmethod
    def edit_ini(path, section, values):
        """Set (value) or remove (None) keys of [section], textually; comments stay."""
        lines = path.read_text().splitlines()
        out, cur, seen = [], None, set()
        for line in lines:
            sm = re.match(r'^\s*\[\s*([^\]]+?)\s*\]', line)
            if sm:
                if cur == section:
                    out.extend(f'{k} = {v}' for k, v in values.items() if v is not None and k not in seen)
                    seen.update(values)
                cur = sm.group(1)
            km = re.match(r'^\s*([A-Za-z_]+)\s*=', line)
            if cur == section and km and km.group(1) in values:
                k = km.group(1)
                if values[k] is not None and k not in seen:
                    out.append(f'{k} = {values[k]}')
                seen.add(k)
                continue
            out.append(line)
        if cur == section:
            out.extend(f'{k} = {v}' for k, v in values.items() if v is not None and k not in seen)
        path.write_text('\n'.join(out) + '\n')

    def nginx_head(self, name, conns):
        w = self.work
        user = 'user root root;\n' if os.geteuid() == 0 else ''
        return f'''{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
error_log {w}/{name}-error.log error;
pid {w}/{name}.pid;
events {{ worker_connections {conns}; }}
'''

    def tls_block(self, verify):
        return f'''        ssl_certificate {self.crt};
        ssl_certificate_key {self.key};
        ssl_client_certificate {self.ca};
        ssl_verify_client {'on' if verify else 'off'};
'''

    def write_internal_conf(self):
        w = self.work
        server = lambda listen, tls: f'''    server {{
        listen {listen};
{tls}        root {w}/www;
        location /upload/ {{
            dav_methods PUT;
            client_max_body_size 0;
        }}
    }}
'''
        conf = self.nginx_head('internal', 19500) + f'''http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {w}/tmp-int/body;
    proxy_temp_path {w}/tmp-int/proxy;
    fastcgi_temp_path {w}/tmp-int/fastcgi;
    uwsgi_temp_path {w}/tmp-int/uwsgi;
    scgi_temp_path {w}/tmp-int/scgi;
    types {{ application/octet-stream bin; }}
    default_type application/octet-stream;
''' + server(f'127.0.0.1:{self.p_int}', '') \
    + server(f'127.0.0.1:{self.p_int_tls} ssl http2', self.tls_block(True)) \
    + server(f'127.0.0.1:{self.p_int_tls_nc} ssl http2', self.tls_block(False)) + '}\n'
        (w / 'internal.conf').write_text(conf)

    def write_front_conf(self):
        w = self.work
        prefix = f'/CCM_Proxy_MutualAuth/{self.role}/'
        server = lambda port, verify, upstream: f'''    server {{
        listen 127.0.0.1:{port} ssl http2;
{self.tls_block(verify)}        location {prefix} {{
            proxy_pass http://{upstream}/;
        }}
        location / {{ return 404; }}
    }}
'''
        conf = self.nginx_head('front', 19500) + f'''http {{
    access_log {w}/front-access.log;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_max_body_size 0;
    client_body_temp_path {w}/tmp-front/body;
    proxy_temp_path {w}/tmp-front/proxy;
    fastcgi_temp_path {w}/tmp-front/fastcgi;
    uwsgi_temp_path {w}/tmp-front/uwsgi;
    scgi_temp_path {w}/tmp-front/scgi;
    proxy_http_version 1.1;
    proxy_request_buffering off;
    proxy_buffering {self.args.nginx_buffering};
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto https;
    proxy_set_header X-Client-Verify $ssl_client_verify;
    proxy_set_header X-Client-Subject $ssl_client_s_dn;
    upstream internal {{ server 127.0.0.1:{self.p_int}; keepalive 256; keepalive_requests 10000000; keepalive_timeout 300s; }}
    upstream tunnel {{ server 127.0.0.1:{self.p_fwd}; keepalive 256; keepalive_requests 10000000; keepalive_timeout 300s; }}
''' + server(self.p_front, True, 'internal') + server(self.p_front_nc, False, 'internal') \
    + server(self.p_front_ssh, True, 'tunnel') + server(self.p_front_ssh_nc, False, 'tunnel') + '}\n'
        (w / 'front.conf').write_text(conf)

    def start_nginx(self, name, port):
        w = self.work
        conf = w / f'{name}.conf'
        r = subprocess.run([self.nginx, '-t', '-q', '-e', w / f'{name}-error.log', '-c', conf,
                            '-p', f'{w}/'], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f'nginx -t ({name}) failed:\n{r.stdout}{r.stderr}'
                               f'{(w / f"{name}-error.log").read_text(errors="replace")}')
        self.procs.start(name, [self.nginx, '-e', w / f'{name}-error.log', '-c', conf, '-p', f'{w}/'])
        wait_port(port, self.procs, name)

    def start_internal(self):
        self.start_nginx('internal', self.p_int)
        wait_port(self.p_int_tls, self.procs, 'internal')

    def start_front(self):
        self.start_nginx('front', self.p_front)

    def start_ssh(self):
        w = self.work / 'ssh'
        w.mkdir()
        os.chmod(w, 0o700)
        for key in ('host', 'client'):
            subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', w / key],
                           check=True, capture_output=True)
        shutil.copy(w / 'client.pub', w / 'authorized_keys')
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)   # sshd's privilege-separation dir
        (w / 'sshd_config').write_text(f'''ListenAddress 127.0.0.1:{self.p_sshd}
HostKey {w}/host
AuthorizedKeysFile {w}/authorized_keys
PidFile {w}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding remote
GatewayPorts no
X11Forwarding no
PermitTTY no
PrintMotd no
LogLevel ERROR
''')
        self.procs.start('sshd', ['/usr/sbin/sshd', '-D', '-e', '-f', w / 'sshd_config'])
        wait_port(self.p_sshd, self.procs, 'sshd')
        # The inside dials out; the "internet" side gets a port that leads back in.
        self.procs.start('ssh', ['ssh', '-N', '-T', '-i', w / 'client', '-p', self.p_sshd,
                                 '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null',
                                 '-o', 'BatchMode=yes', '-o', 'ExitOnForwardFailure=yes',
                                 '-o', 'LogLevel=ERROR',
                                 '-R', f'127.0.0.1:{self.p_fwd}:127.0.0.1:{self.p_int}',
                                 f'{os.environ.get("USER") or "root"}@127.0.0.1'])
        wait_port(self.p_fwd, self.procs, 'ssh')

    def start_gateway(self):
        """The gateway opens its device port once a tunnel is up: wait for the tunnel port;
        wait_served() waits for the device port."""
        self.procs.start('gateway', [self.cmg, 'gateway', '-c', self.site / 'gateway.conf'])
        wait_port(self.p_tun, self.procs, 'gateway')

    def start_opencmg(self):
        self.start_gateway()
        self.procs.start('connector', [self.cmg, 'connector', '-c', self.site / 'connector.conf'])
        self.wait_served('opencmg')

    def wait_served(self, system, timeout=20):
        deadline = time.monotonic() + timeout
        while True:
            res = self.cmgload(system, '/small.bin', ['-c', '1', '-n', '1', '--max-time', '5'],
                               check=False)
            if res and res.get('status_2xx') == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f'{system} does not serve /small.bin: {res}')
            time.sleep(0.2)

    def check_paths(self):
        """Every path answers 200 with the right size, and takes an upload."""
        for s in self.systems:
            r = self.cmgload(s, '/small.bin', ['-c', '2', '-n', '4'])
            if r['status_2xx'] != 4 or r['bytes_in'] != 4 * 1024:
                raise RuntimeError(f'{s}: /small.bin answered {r}')
            r = self.cmgload(s, '/small.bin', ['--h2', '-c', '1', '-m', '2', '-n', '4'])
            if r['status_2xx'] != 4 or r['bytes_in'] != 4 * 1024:
                raise RuntimeError(f'{s}: /small.bin over HTTP/2 answered {r}')
            r = self.cmgload(s, f'/upload/{s}.bin', ['-c', '1', '-n', '1', '-X', 'PUT',
                                                     '--body-size', '1M'])
            if r['status_2xx'] != 1 or (self.work / f'www/upload/{s}.bin').stat().st_size != 1 << 20:
                raise RuntimeError(f'{s}: upload answered {r}')
            if s != 'direct':
                r = self.cmgload(s, '/small.bin', ['-c', '1', '-n', '1'], cert=False, check=False)
                if r.get('status_2xx'):
                    raise RuntimeError(f'{s}: a request without a client certificate was served')
        log('  every path serves /small.bin over HTTP/1.1 and HTTP/2 and takes an upload; '
            'those behind a proxy refuse a device without a certificate')

    # ------------------------------------------------------------ clients

    def target(self, system, nocert=False):
        """(port, path prefix) of a system; nocert: its twin without client certificates."""
        prefix = '' if system == 'direct' else f'/CCM_Proxy_MutualAuth/{self.role}'
        port = {('direct', False): self.p_int_tls, ('direct', True): self.p_int_tls_nc,
                ('nginx', False): self.p_front, ('nginx', True): self.p_front_nc,
                ('ssh', False): self.p_front_ssh, ('ssh', True): self.p_front_ssh_nc,
                ('opencmg', False): self.p_gw}[(system, nocert)]
        return port, prefix

    def cmgload_argv(self, system, path, extra, cert=True, nocert_port=False):
        port, prefix = self.target(system, nocert_port)
        argv = [self.load, '-q', '--connect', f'127.0.0.1:{port}', '--cacert', self.ca]
        if cert:
            argv += ['--cert', self.dev_crt, '--key', self.dev_key]
        return argv + [str(a) for a in extra] + [f'https://{NAME}:{port}{prefix}{path}']

    def cmgload(self, system, path, extra, cert=True, nocert_port=False, check=True):
        argv = self.cmgload_argv(system, path, extra, cert, nocert_port)
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=900)
        try:
            res = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            if check:
                raise RuntimeError(f'cmg-load gave no result ({r.returncode}): {r.stderr}')
            return None
        return res

    # ------------------------------------------------------------ measuring

    def cpu_snapshot(self):
        """CPU ticks of every process group, of kernel threads, of the whole machine."""
        table = proc_table()
        snap = {g: sum(table[p][1] for p in descendants(table, pid))
                for g, pid in self.procs.groups().items()}
        snap['_kernel'] = sum(t for pid, (ppid, t) in table.items() if ppid == 2 or pid == 2)
        snap['_busy'], snap['_steal'] = stat_ticks()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        snap['_self'] = (ru.ru_utime + ru.ru_stime) * CLK_TCK
        return snap

    def account(self, rec, cpu0, cpu1, client_s, wall, system):
        """CPU seconds per process group, and what the rest of the machine used
        meanwhile (other users' processes make a run noisy: flagged in the report)."""
        rec['cpu_client_s'] = round(client_s, 3)
        ours = client_s
        for g in cpu1:
            if not g.startswith('_') and g in cpu0:
                d = (cpu1[g] - cpu0[g]) / CLK_TCK
                ours += d
                if g in GROUPS[system]:
                    rec[f'cpu_{g}_s'] = round(d, 3)
        kernel = (cpu1['_kernel'] - cpu0['_kernel']) / CLK_TCK
        other = (cpu1['_busy'] - cpu0['_busy']) / CLK_TCK - ours - kernel - \
            (cpu1['_self'] - cpu0['_self']) / CLK_TCK
        rec['cpu_kthreads_s'] = round(kernel, 3)
        rec['cpu_other_s'] = round(max(other, 0), 3)
        rec['other_pct'] = round(100 * max(other, 0) / (wall * (os.cpu_count() or 1)), 1)
        rec['steal_pct'] = round(100 * (cpu1['_steal'] - cpu0['_steal']) / CLK_TCK /
                                 (wall * (os.cpu_count() or 1)), 1)

    def wait_quiet(self, limit=20):
        """Waits (up to `limit` s, and 60 s in all) until processes outside the bench
        use less than 10 % of the machine: figures taken beside another load are noise."""
        n = os.cpu_count() or 1
        t0 = time.monotonic()
        while True:
            b0, s0 = stat_ticks()[0], self.cpu_snapshot()
            time.sleep(self.quiet_probe)
            b1, s1 = stat_ticks()[0], self.cpu_snapshot()
            ours = sum(s1[g] - s0[g] for g in s1 if g in s0 and not g.startswith('_'))
            pct = 100 * ((b1 - b0) - ours - (s1['_kernel'] - s0['_kernel'])) / (self.quiet_probe * CLK_TCK * n)
            waited = time.monotonic() - t0
            if pct < 10 or waited > limit or self.waited + waited > 60:
                if pct >= 10:
                    log(f'    the machine is still {pct:.0f} % busy with other processes: measuring anyway '
                        '(runs are flagged)')
                self.waited += waited
                return
            if waited < 0.6:
                log(f'    other processes use {pct:.0f} % of the machine: waiting for quiet ...')
            time.sleep(1)

    def measure(self, scenario, system, tool, argv, rnd, parse, timeout):
        """Runs one load tool to its end; returns the run's record, with the CPU
        seconds of every process group and of the tool itself. A run that shared the
        machine with other processes is taken again (a bounded number of times)."""
        while True:
            rec = self.measure_once(scenario, system, tool, argv, rnd, parse, timeout)
            if not self.disturbed(rec) or self.reruns >= self.size['reruns']:
                break
            self.reruns += 1
            self.runs.remove(rec)
            log('      (taken again)')
            self.wait_quiet(limit=10)
        return rec

    def measure_once(self, scenario, system, tool, argv, rnd, parse, timeout):
        self.check_alive()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = self.cpu_snapshot()
        t0 = time.monotonic()
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = self.cpu_snapshot()
        rec = {'scenario': scenario, 'system': system, 'tool': tool, 'round': rnd,
               'wall_s': round(wall, 3)}
        try:
            rec.update(parse(r.stdout))
        except Exception as e:   # a broken run is recorded, not fatal
            rec['error'] = f'unreadable output ({e}): {r.stdout[-300:]} {r.stderr[-300:]}'
        if r.returncode != 0 and 'error' not in rec:
            rec['error'] = f'exit {r.returncode}: {r.stderr.strip()[-300:]}'
        self.account(rec, cpu0, cpu1, (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                     wall, system)
        self.runs.append(rec)
        self.say(rec)
        return rec

    def say(self, rec):
        keys = [k for k in ('rps', 'p50_ms', 'p99_ms', 'p999_ms', 'hs_per_s', 'mb_per_s',
                            'kib_per_conn') if k in rec]
        figs = ', '.join(f'{k}={rec[k]}' for k in keys)
        cpu = ' '.join(f'{k[4:-2]}={v}' for k, v in rec.items()
                       if k.startswith('cpu_') and k not in ('cpu_other_s', 'cpu_kthreads_s'))
        err = f'  ERROR: {rec["error"]}' if rec.get('error') else ''
        if self.disturbed(rec):
            err += (f'  (other processes used {rec["other_pct"]} % of the machine, '
                    f'the hypervisor stole {rec.get("steal_pct", 0)} %)')
        log(f'    {rec["scenario"]:<10} {LABEL[rec["system"]]:<15} {rec["tool"]:<8} r{rec["round"]}: '
            f'{figs}  cpu s: {cpu}{err}')

    def check_alive(self):
        for name in list(self.procs.procs):
            if not self.procs.alive(name):
                raise RuntimeError(f'{name} exited; see {self.work}/{name}.log')

    @staticmethod
    def parse_cmgload(out):
        j = json.loads(out.strip().splitlines()[-1])
        lat = j['lat_us']
        rec = {'requests': j['requests'], 'rps': round(j['rps'], 1),
               'p50_ms': round(lat['p50'] / 1e3, 3), 'p90_ms': round(lat['p90'] / 1e3, 3),
               'p99_ms': round(lat['p99'] / 1e3, 3), 'p999_ms': round(lat['p999'] / 1e3, 3),
               'mean_ms': round(lat['mean'] / 1e3, 3), 'max_ms': round(lat['max'] / 1e3, 3),
               'window_s': j['window_s'], 'status_2xx': j['status_2xx'], 'errors': j['errors'],
               'handshakes': j['handshakes'], 'hs_per_s': round(j['handshakes_per_s'], 1),
               'bytes_in': j['bytes_in'], 'bytes_out': j['bytes_out'],
               'mb_per_s_in': j['mb_per_s_in'], 'mb_per_s_out': j['mb_per_s_out'],
               'tool_cpu_s': j['cpu_s']}
        bad = j['requests'] - j['status_2xx']
        if j['errors'] or bad or j['timed_out'] or not j['requests']:
            rec['error'] = (f'{j["errors"]} errors, {bad} non-2xx, timed out {j["timed_out"]}, '
                            f'first: {j["first_error"]}')
        return rec

    @staticmethod
    def parse_wrk(out):
        def ms(v):
            m = re.match(r'([\d.]+)(us|ms|s)$', v)
            return float(m.group(1)) * {'us': 1e-3, 'ms': 1, 's': 1e3}[m.group(2)]
        rec = {'rps': round(float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1)), 1)}
        for pct, key in (('50', 'p50_ms'), ('90', 'p90_ms'), ('99', 'p99_ms')):
            rec[key] = round(ms(re.search(rf'^\s+{pct}%\s+(\S+)', out, re.M).group(1)), 3)
        rec['mean_ms'] = round(ms(re.search(r'^\s+Latency\s+(\S+)', out, re.M).group(1)), 3)
        rec['requests'] = int(re.search(r'(\d+) requests in', out).group(1))
        m = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
        e = re.search(r'Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)', out)
        if m or (e and sum(map(int, e.groups()))):
            rec['error'] = (m.group(0) if m else '') + (e.group(0) if e else '')
        return rec

    @staticmethod
    def parse_h2load(out):
        def ms(v):
            m = re.match(r'([\d.]+)(us|ms|s)$', v)
            return float(m.group(1)) * {'us': 1e-3, 'ms': 1, 's': 1e3}[m.group(2)]
        rec = {'rps': round(float(re.search(r'finished in \S+, ([\d.]+) req/s', out).group(1)), 1)}
        m = re.search(r'time for request:\s+(\S+)\s+(\S+)\s+(\S+)', out)
        rec['mean_ms'] = round(ms(m.group(3)), 3)
        m = re.search(r'requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, '
                      r'(\d+) errored', out)
        rec['requests'] = int(m.group(3))
        if int(m.group(4)) or int(m.group(5)):
            rec['error'] = m.group(0)
        return rec

    # ------------------------------------------------------------ scenarios

    def scenario(self, name, title, fn):
        if self.args.only and name not in self.args.only.split(','):
            return
        log(f'  {title}')
        self.wait_quiet()
        t0 = time.monotonic()
        for rnd in range(1, self.size['rounds'][name] + 1):
            for s in self.systems:
                fn(s, rnd)
        log(f'    ({time.monotonic() - t0:.0f} s)')

    def run_scenarios(self):
        z = self.size
        d, wu = z['dur'], z['warm']
        tmo = d + wu + 60

        self.scenario('h1', f'small requests, HTTP/1.1, {z["conns"]} connections, client certificate',
                      lambda s, r: self.measure(
                          'h1', s, 'cmg-load', self.cmgload_argv(s, '/small.bin', [
                              '-c', z['conns'], '-d', d, '-w', wu]), r, self.parse_cmgload, tmo))
        self.scenario('h2', f'small requests, HTTP/2, {z["h2_conns"]} connections x {z["h2_streams"]} streams',
                      lambda s, r: self.measure(
                          'h2', s, 'cmg-load', self.cmgload_argv(s, '/small.bin', [
                              '--h2', '-c', z['h2_conns'], '-m', z['h2_streams'], '-d', d, '-w', wu]),
                          r, self.parse_cmgload, tmo))
        self.scenario('rate', f'fixed rate {z["rate"]} req/s, {z["rate_conns"]} connections, HTTP/1.1',
                      lambda s, r: self.measure(
                          'rate', s, 'cmg-load', self.cmgload_argv(s, '/small.bin', [
                              '-c', z['rate_conns'], '-r', z['rate'], '-d', z['rate_dur'], '-w', wu]),
                          r, self.parse_cmgload, z['rate_dur'] + wu + 60))
        self.scenario('newconn', f'a new connection per request, {z["newconn_conns"]} at once',
                      lambda s, r: self.measure(
                          'newconn', s, 'cmg-load', self.cmgload_argv(s, '/small.bin', [
                              '--new-conn', '-c', z['newconn_conns'], '-d', d, '-w', wu,
                              '--src', '127.0.0.2-127.0.0.17']), r, self.parse_cmgload, tmo))
        self.scenario('download', f'bulk download of {z["download"] >> 20} MiB, one connection',
                      lambda s, r: self.bulk('download', s, r))
        self.scenario('upload', f'bulk upload of {z["upload"] >> 20} MiB, one connection',
                      lambda s, r: self.bulk('upload', s, r))
        self.scenario('idle', f'{z["idle"]} idle TLS connections, one request each',
                      lambda s, r: self.idle(s, r))
        if not self.args.only or 'notify' in self.args.only.split(','):
            NotifyBench(self).run()
        if not self.args.no_crosscheck:
            self.crosscheck()

    def bulk(self, kind, s, rnd):
        z = self.size
        if kind == 'download':
            argv = self.cmgload_argv(s, '/big.bin', ['-c', '1', '-n', '1'])
        else:
            argv = self.cmgload_argv(s, f'/upload/{s}.bin', ['-c', '1', '-n', '1', '-X', 'PUT',
                                                              '--body-size', z['upload']])
        rec = self.measure(kind, s, 'cmg-load', argv, rnd, self.parse_cmgload, 600)
        moved = rec.get('bytes_in' if kind == 'download' else 'bytes_out', 0)
        want = z['download'] if kind == 'download' else z['upload']
        if moved != want and 'error' not in rec:
            rec['error'] = f'moved {moved} bytes, {want} expected'
        rec['mb_per_s'] = rec.get('mb_per_s_in' if kind == 'download' else 'mb_per_s_out')
        rec['gib'] = moved / (1 << 30)
        log(f'      {rec["mb_per_s"]} MB/s')

    def idle(self, s, rnd):
        """Fresh edge processes (memory a previous round freed would hide the cost),
        one request each to warm them, then N connections held: (RSS held - RSS
        before) / N."""
        z = self.size
        edge = EDGE[s]
        if 'front' in edge:
            self.procs.stop('front')
            self.start_front()
        if 'internal' in edge:
            self.procs.stop('internal')
            self.start_internal()
        if 'gateway' in edge:
            self.procs.stop('gateway')
            self.start_gateway()
            self.wait_served(s)
        self.cmgload(s, '/small.bin', ['-c', '4', '-n', '64'])
        time.sleep(0.3)
        table = proc_table()
        groups = self.procs.groups()
        pids = [p for g in edge for p in descendants(table, groups[g])]
        before = sum(rss_kib(p) for p in pids)
        n = z['idle']
        procs = max(z['idle_procs'], (n + 17999) // 18000)
        argv = self.cmgload_argv(s, '/small.bin', [
            '--idle', '--idle-request', '-c', n, '-p', procs, '--hold', z['hold'],
            '--concurrency', 64, '--src', '127.0.0.2-127.0.0.9', '--max-time', 300])
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = self.cpu_snapshot()
        t0 = time.monotonic()
        p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        held, established, event, final = None, 0, {}, None
        try:
            for line in p.stdout:
                j = json.loads(line)
                if j.get('event') == 'holding':
                    event = j
                    established = j['established']
                    time.sleep(min(0.5, z['hold'] / 3))
                    held = sum(rss_kib(q) for q in pids)
                else:
                    final = j
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        err = p.stderr.read()
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1 = self.cpu_snapshot()
        rec = {'scenario': 'idle', 'system': s, 'tool': 'cmg-load', 'round': rnd,
               'wall_s': round(wall, 3), 'connections': n, 'established': established,
               'establish_s': event.get('establish_s'), 'rss_before_kib': before,
               'rss_held_kib': held}
        if held is not None and established:
            rec['kib_per_conn'] = round((held - before) / established, 2)
        if final is None:
            rec['error'] = f'no result from cmg-load: {err[-300:]}'
        elif final['dropped'] or established != n or final['status_2xx'] != n:
            rec['error'] = (f'{established} of {n} established, {final["status_2xx"]} answered 2xx, '
                            f'{final["dropped"]} dropped; first error: {final["first_error"]}')
        self.account(rec, cpu0, cpu1, (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
                     wall, s)
        self.runs.append(rec)
        self.say(rec)

    def crosscheck(self):
        """cmg-load against wrk (HTTP/1.1) and h2load (HTTP/2) on the same paths,
        without a client certificate (which neither of them can present)."""
        if self.args.only and 'crosscheck' not in self.args.only.split(','):
            return
        z = self.size
        d = z['xdur']
        log(f'  cross-check: cmg-load and wrk, HTTP/1.1, {z["conns"]} connections, no client certificate')
        self.wait_quiet()
        for rnd in range(1, z['rounds']['x'] + 1):
            for s in [p for p in self.systems if p in z['xpaths']['h1']]:
                port, prefix = self.target(s, nocert=True)
                url = f'https://127.0.0.1:{port}{prefix}/small.bin'
                self.measure('x-h1', s, 'wrk', ['wrk', '-t1', f'-c{z["conns"]}', f'-d{d}s', '--latency', url],
                             rnd, self.parse_wrk, d + 60)
                self.measure('x-h1', s, 'cmg-load', self.cmgload_argv(   # wrk has no warm-up either
                    s, '/small.bin', ['-c', z['conns'], '-d', d, '-w', 0], cert=False, nocert_port=True),
                    rnd, self.parse_cmgload, d + 60)
        if shutil.which('h2load'):
            log(f'  cross-check: cmg-load and h2load, HTTP/2, {z["h2_conns"]} x {z["h2_streams"]}, '
                'no client certificate')
            for rnd in range(1, z['rounds']['x'] + 1):
                for s in [p for p in self.systems if p in z['xpaths']['h2']]:
                    port, prefix = self.target(s, nocert=True)
                    url = f'https://127.0.0.1:{port}{prefix}/small.bin'
                    self.measure('x-h2', s, 'h2load', [
                        'h2load', '-t1', '-c', z['h2_conns'], '-m', z['h2_streams'], '-D', d,
                        '--warm-up-time', z['xwarm'], url], rnd, self.parse_h2load, d + 60)
                    self.measure('x-h2', s, 'cmg-load', self.cmgload_argv(
                        s, '/small.bin', ['--h2', '-c', z['h2_conns'], '-m', z['h2_streams'], '-d', d,
                                          '-w', z['xwarm']], cert=False, nocert_port=True),
                        rnd, self.parse_cmgload, d + 60)

    # ------------------------------------------------------------ the report

    @staticmethod
    def disturbed(r):
        """A run that shared the machine with other processes, or lost time to the hypervisor."""
        return r.get('other_pct', 0) >= 10 or r.get('steal_pct', 0) >= 10

    def median(self, scenario, system, key, tool='cmg-load'):
        """The median over rounds; over the undisturbed rounds alone when there are enough."""
        runs = [r for r in self.runs if r['scenario'] == scenario and r['system'] == system
                and r['tool'] == tool and r.get(key) is not None]
        clean = [r for r in runs if not self.disturbed(r)]
        vals = [r[key] for r in (clean if len(clean) >= CLEAN_ENOUGH else runs)]
        return statistics.median(vals) if vals else None

    def paired(self, scenario, key, other, tool='cmg-load'):
        """The median over rounds of OpenCMG's figure divided by the other system's
        figure in the same round: the two ran side by side, so the drift of the
        machine's speed between rounds cancels out. Rounds in which either run was
        disturbed are left out when enough undisturbed ones remain; a tail-latency
        scenario keeps the quieter half of its rounds."""
        by = {}
        for r in self.runs:
            if r['scenario'] == scenario and r['tool'] == tool and r.get(key) and not r.get('error'):
                by.setdefault(r['round'], {})[r['system']] = r
        pairs = [(v['opencmg'], v[other]) for v in by.values() if 'opencmg' in v and other in v]
        if scenario in TAIL_SCENARIOS:
            # A tail percentile moves with disturbances far below the 10 % mark: the
            # quieter half of the rounds, by the busier run of each pair, judges it.
            noise = lambda r: r.get('steal_pct', 0) + r.get('other_pct', 0)
            pairs.sort(key=lambda p: max(noise(p[0]), noise(p[1])))
            used = pairs[:(len(pairs) + 1) // 2]
            self.pairs_used[(scenario, other)] = (len(used), len(pairs), 'quietest')
        else:
            clean = [(a, b) for a, b in pairs if not self.disturbed(a) and not self.disturbed(b)]
            used = clean if len(clean) >= CLEAN_ENOUGH else pairs
            self.pairs_used[(scenario, other)] = (len(used), len(pairs), 'undisturbed' if used is clean else 'all')
        ratios = [a[key] / b[key] for a, b in used]
        return round(statistics.median(ratios), 3) if ratios else None

    def paired_tools(self, scenario, system, other):
        """cmg-load's req/s divided by the other tool's, within each round; median."""
        by = {}
        for r in self.runs:
            if r['scenario'] == scenario and r['system'] == system and r.get('rps') and not r.get('error'):
                by.setdefault(r['round'], {})[r['tool']] = r['rps']
        ratios = [v['cmg-load'] / v[other] for v in by.values() if 'cmg-load' in v and other in v]
        return round(statistics.median(ratios), 3) if ratios else None

    def failed(self, scenario, system, tool='cmg-load'):
        return [r['error'] for r in self.runs if r['scenario'] == scenario and r['system'] == system
                and r['tool'] == tool and r.get('error')]

    def machine(self):
        cpu = platform.processor()
        try:
            with open('/proc/cpuinfo') as f:
                cpu = re.search(r'^model name\s*:\s*(.*)$', f.read(), re.M).group(1)
        except (OSError, AttributeError):
            pass
        return os.cpu_count(), cpu, platform.release()

    def report(self, wall):
        z = self.size
        rows = []     # (scenario title, figure, unit key, higher is better)
        spec = [
            ('h1', f'small 1 KiB, HTTP/1.1, {z["conns"]} conns, mTLS', [
                ('req/s', 'rps', True), ('p50 ms', 'p50_ms', False), ('p99 ms', 'p99_ms', False)]),
            ('h2', f'small 1 KiB, HTTP/2, {z["h2_conns"]}×{z["h2_streams"]} streams, mTLS', [
                ('req/s', 'rps', True), ('p50 ms', 'p50_ms', False), ('p99 ms', 'p99_ms', False)]),
            ('rate', f'fixed {z["rate"]} req/s, {z["rate_conns"]} conns, HTTP/1.1, mTLS', [
                ('achieved req/s', 'rps', True), ('p50 ms', 'p50_ms', False), ('p99 ms', 'p99_ms', False),
                ('p99.9 ms', 'p999_ms', False)]),
            ('newconn', f'new TLS connection per request, {z["newconn_conns"]} at once', [
                ('handshakes/s', 'hs_per_s', True), ('p50 ms', 'p50_ms', False),
                ('p99 ms', 'p99_ms', False)]),
            ('download', f'download {z["download"] >> 20} MiB, 1 conn', [('MB/s', 'mb_per_s', True)]),
            ('upload', f'upload {z["upload"] >> 20} MiB, 1 conn', [('MB/s', 'mb_per_s', True)]),
            ('idle', f'{z["idle"]} idle TLS conns (1 request each)', [
                ('edge RSS KiB/conn', 'kib_per_conn', False), ('established in s', 'establish_s', False)]),
        ]
        summary = []
        for sc, title, figs in spec:
            for label, key, higher in figs:
                row = {'scenario': sc, 'title': title, 'figure': label, 'key': key}
                for s in SYSTEMS:
                    row[s] = self.median(sc, s, key) if s in self.systems else None
                    if s in self.systems and self.failed(sc, s):
                        row.setdefault('failed', []).append(s)
                for other in ('direct', 'nginx', 'ssh'):
                    row[f'opencmg_vs_{other}'] = self.paired(sc, key, other)
                if any(row[s] is not None for s in SYSTEMS):
                    summary.append(row)

        def fmt(v, key):
            if v is None:
                return '–'
            if key in ('rps', 'hs_per_s'):
                return f'{v:,.0f}'
            if key == 'mb_per_s':
                return f'{v:,.0f}'
            if key in ('kib_per_conn', 'establish_s'):
                return f'{v:.1f}'
            return f'{v:.2f}' if v >= 1 else f'{v:.3f}'

        ncpu, cpu, kernel = self.machine()
        day = datetime.date.today().isoformat()
        try:
            tree = subprocess.run(['git', '-C', ROOT, 'describe', '--always', '--dirty'], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or 'unknown'
        except (OSError, subprocess.SubprocessError):
            tree = 'unknown'
        others = [r.get('other_pct', 0) for r in self.runs]
        steals = [r.get('steal_pct', 0) for r in self.runs]
        noisy = [r for r in self.runs if self.disturbed(r)]
        lines = [f'OpenCMG bench, {day}: nproc {ncpu}, {cpu}, Linux {kernel}; source tree {tree}; '
                 f'rounds per scenario {", ".join(f"{k} {v}" for k, v in z["rounds"].items())}, each round '
                 f'running the systems in turn ({", ".join(LABEL[x] for x in self.systems)}); medians, and '
                 f'ratios taken within each round (median of the per-round ratios), both over the rounds '
                 f'no other process or the hypervisor disturbed (≥ 10 % of the CPU) where {CLEAN_ENOUGH} or more are left; '
                 f'{"--quick (tiny sizes)" if self.args.quick else "full size"}; run took {wall / 60:.1f} min; '
                 f'processes outside the bench used {statistics.median(others) if others else 0:.1f} % '
                 f'of the machine (median over runs, max {max(others) if others else 0:.0f} %), '
                 f'hypervisor steal {statistics.median(steals) if steals else 0:.1f} % '
                 f'(max {max(steals) if steals else 0:.0f} %).',
                 '',
                 '| scenario | figure | direct | nginx | nginx + ssh -R | OpenCMG | OpenCMG ÷ nginx | '
                 'OpenCMG ÷ nginx+ssh | OpenCMG ÷ direct |',
                 '|---|---|--:|--:|--:|--:|--:|--:|--:|']
        last = None
        for row in summary:
            title = row['title'] if row['scenario'] != last else ''
            last = row['scenario']
            cells = []
            for s in SYSTEMS:
                c = fmt(row[s], row['key'])
                if s in row.get('failed', []):
                    c += ' ⚠'
                cells.append(c)
            ratios = [f'{row[f"opencmg_vs_{o}"]:.2f}' if row[f'opencmg_vs_{o}'] else '–'
                      for o in ('nginx', 'ssh', 'direct')]
            lines.append(f'| {title} | {row["figure"]} | ' + ' | '.join(cells + ratios) + ' |')
        used = [(sc, u) for (sc, o), u in self.pairs_used.items() if o == 'nginx' and u[1]]
        if used:
            lines += ['', 'Rounds behind the ratios to nginx: ' + ', '.join(
                f'{sc} all {total} (fewer than {CLEAN_ENOUGH} undisturbed)' if how == 'all' else
                f'{sc} the {n} {how} of {total}'
                for sc, (n, total, how) in used) + '.']

        # CPU per unit of work, per process.
        units = {'h1': ('µs/request', 'requests', 1e6), 'h2': ('µs/request', 'requests', 1e6),
                 'rate': ('µs/request', 'requests', 1e6), 'newconn': ('µs/handshake', 'handshakes', 1e6),
                 'download': ('s/GiB', 'gib', 1), 'upload': ('s/GiB', 'gib', 1),
                 'idle': ('µs/connection', 'established', 1e6)}
        lines += ['', 'CPU time per unit of work, median of the rounds (user + system, from /proc; '
                  'the load tool from its own rusage). "all" is the sum.', '',
                  '| scenario | unit | system | ' + ' | '.join(GROUP_LABEL[g] for g in ALL_GROUPS) +
                  ' | all |', '|---|---|---|' + '--:|' * (len(ALL_GROUPS) + 1)]
        cpu_rows = []
        for sc, title, _ in spec:
            unit, denom_key, scale = units[sc]
            for s in self.systems:
                runs = [r for r in self.runs if r['scenario'] == sc and r['system'] == s
                        and r['tool'] == 'cmg-load' and r.get(denom_key)]
                if not runs:
                    continue
                per = {}
                for g in ALL_GROUPS + ['all']:
                    vals = []
                    for r in runs:
                        if g == 'all':
                            v = sum(r.get(f'cpu_{x}_s', 0) for x in ALL_GROUPS)
                        elif f'cpu_{g}_s' in r:
                            v = r[f'cpu_{g}_s']
                        else:
                            continue
                        vals.append(v / r[denom_key] * scale)
                    per[g] = statistics.median(vals) if vals else None
                cpu_rows.append({'scenario': sc, 'unit': unit, 'system': s, **per})
                cells = [('–' if per[g] is None else f'{per[g]:.2f}' if per[g] < 10 else f'{per[g]:,.0f}')
                         for g in ALL_GROUPS + ['all']]
                lines.append(f'| {sc} | {unit} | {LABEL[s]} | ' + ' | '.join(cells) + ' |')

        # Bulk: on this machine all processes share two cores, so MB/s follows the CPU
        # summed over every hop. With a core per process, the busiest process of the
        # system (not the load tool, not the internal service) would set the pace.
        for sc in ('download', 'upload'):
            bound = {}
            for s in ('nginx', 'ssh', 'opencmg'):
                row = next((r for r in cpu_rows if r['scenario'] == sc and r['system'] == s), None)
                own = [row[g] for g in GROUPS[s] if row and g != 'internal' and row.get(g)]
                if own:
                    bound[s] = 1073.741824 / max(own)
            if 'opencmg' in bound and 'nginx' in bound:
                lines.append('')
                lines.append(f'{sc}: with a core per process the busiest process of each system would allow '
                             + ', '.join(f'{LABEL[s]} {v:,.0f} MB/s' for s, v in bound.items())
                             + f' (OpenCMG ÷ nginx {bound["opencmg"] / bound["nginx"]:.2f}).')
                for s, v in bound.items():
                    next(r for r in cpu_rows if r['scenario'] == sc and r['system'] == s)['bound_mb_per_s'] = round(v)

        # Cross-check: cmg-load against wrk / h2load on the same paths.
        xrows = []
        for sc, other in (('x-h1', 'wrk'), ('x-h2', 'h2load')):
            for s in ('direct', 'nginx', 'ssh'):
                a = self.median(sc, s, 'rps', 'cmg-load')
                b = self.median(sc, s, 'rps', other)
                if a is None or b is None:
                    continue
                xrows.append({'check': sc, 'system': s, 'other': other, 'cmgload_rps': a, 'other_rps': b,
                              'rps_ratio': self.paired_tools(sc, s, other),
                              'cmgload_p50_ms': self.median(sc, s, 'p50_ms', 'cmg-load'),
                              'other_p50_ms': self.median(sc, s, 'p50_ms', other),
                              'cmgload_p99_ms': self.median(sc, s, 'p99_ms', 'cmg-load'),
                              'other_p99_ms': self.median(sc, s, 'p99_ms', other),
                              'cmgload_mean_ms': self.median(sc, s, 'mean_ms', 'cmg-load'),
                              'other_mean_ms': self.median(sc, s, 'mean_ms', other)})
        if xrows:
            lines += ['', 'Cross-check of the load tool (no client certificate; same paths, same '
                      'connections, taken in turn): cmg-load against wrk (HTTP/1.1) and h2load (HTTP/2).', '',
                      '| protocol | path | tool | req/s | mean ms | p50 ms | p99 ms | cmg-load ÷ other (req/s) |',
                      '|---|---|---|--:|--:|--:|--:|--:|']
            for x in xrows:
                proto = 'HTTP/1.1' if x['check'] == 'x-h1' else 'HTTP/2'
                for tool, pre in (('cmg-load', 'cmgload'), (x['other'], 'other')):
                    lines.append(f'| {proto} | {LABEL[x["system"]]} | {tool} | {x[pre + "_rps"]:,.0f} | '
                                 f'{fmt(x[pre + "_mean_ms"], "ms")} | {fmt(x[pre + "_p50_ms"], "ms")} | '
                                 f'{fmt(x[pre + "_p99_ms"], "ms")} | '
                                 f'{x["rps_ratio"]:.2f} |' if tool == 'cmg-load' and x['rps_ratio'] else
                                 f'| {proto} | {LABEL[x["system"]]} | {tool} | {x[pre + "_rps"]:,.0f} | '
                                 f'{fmt(x[pre + "_mean_ms"], "ms")} | {fmt(x[pre + "_p50_ms"], "ms")} | '
                                 f'{fmt(x[pre + "_p99_ms"], "ms")} | |')

        notify_lines, notify_targets = self.notify_report(fmt)
        lines += notify_lines

        # Targets.
        def ratio(sc, key, other):
            for row in summary:
                if row['scenario'] == sc and row['key'] == key:
                    return row.get(f'opencmg_vs_{other}')
            return None
        targets = [
            ('req/s ≥ 0.8 × nginx, HTTP/1.1', ratio('h1', 'rps', 'nginx'), 0.8, True),
            ('req/s ≥ 0.8 × nginx, HTTP/2', ratio('h2', 'rps', 'nginx'), 0.8, True),
            ('req/s ≥ 2 × nginx + ssh -R, HTTP/1.1', ratio('h1', 'rps', 'ssh'), 2.0, True),
            ('req/s ≥ 2 × nginx + ssh -R, HTTP/2', ratio('h2', 'rps', 'ssh'), 2.0, True),
            ('p99 at the fixed rate ≤ 1.5 × nginx', ratio('rate', 'p99_ms', 'nginx'), 1.5, False),
            ('download MB/s ≥ 0.8 × nginx', ratio('download', 'mb_per_s', 'nginx'), 0.8, True),
            ('upload MB/s ≥ 0.8 × nginx', ratio('upload', 'mb_per_s', 'nginx'), 0.8, True),
        ]
        rss = self.median('idle', 'opencmg', 'kib_per_conn')
        lines += ['', '| target (OpenCMG) | measured | met |', '|---|--:|:-:|']
        target_rows = []
        for label, v, lim, higher in targets:
            if v is None and self.args.only:
                continue   # a scenario left out with --only: no verdict
            met = v is not None and (v >= lim if higher else v <= lim)
            target_rows.append({'target': label, 'measured': v, 'met': met})
            lines.append(f'| {label} | {"–" if v is None else f"{v:.2f} ×"} | {"✔" if met else "✘"} |')
        met = rss is not None and rss <= 32
        if rss is not None or not self.args.only:
            target_rows.append({'target': 'gateway RSS per idle TLS connection ≤ 32 KiB', 'measured': rss,
                                'met': met})
            lines.append(f'| gateway RSS per idle TLS connection ≤ 32 KiB | '
                         f'{"–" if rss is None else f"{rss:.1f} KiB"} | {"✔" if met else "✘"} |')
        for label, v, met in notify_targets:
            target_rows.append({'target': label, 'measured': v, 'met': met})
            lines.append(f'| {label} | {v} | {"✔" if met else "✘"} |')
        if noisy:
            lines += ['', f'⚠ {len(noisy)} of {len(self.runs)} runs shared the machine with other processes '
                      'or lost time to the hypervisor (≥ 10 % of its CPU): their figures are noisier.']
        errors = [r for r in self.runs if r.get('error')]
        if errors:
            lines += ['', f'⚠ {len(errors)} run(s) reported errors (see runs.csv):']
            lines += [f'- {r["scenario"]} {LABEL[r["system"]]} {r["tool"]} round {r["round"]}: {r["error"]}'
                      for r in errors[:10]]
        table = '\n'.join(lines) + '\n'

        (self.out / 'results.md').write_text(table)
        with open(self.out / 'results.csv', 'w', newline='') as f:
            cw = csv.writer(f)
            cw.writerow(['scenario', 'figure', 'key'] + SYSTEMS +
                        ['opencmg_vs_nginx', 'opencmg_vs_ssh', 'opencmg_vs_direct'])
            for row in summary:
                cw.writerow([row['scenario'], row['figure'], row['key']] + [row[s] for s in SYSTEMS] +
                            [row['opencmg_vs_nginx'], row['opencmg_vs_ssh'], row['opencmg_vs_direct']])
        keys = []
        for r in self.runs:
            keys += [k for k in r if k not in keys]
        with open(self.out / 'runs.csv', 'w', newline='') as f:
            cw = csv.DictWriter(f, fieldnames=keys)
            cw.writeheader()
            cw.writerows(self.runs)
        (self.out / 'results.json').write_text(json.dumps(
            {'date': day, 'nproc': ncpu, 'cpu': cpu, 'kernel': kernel, 'tree': tree, 'size': z,
             'quick': self.args.quick, 'wall_s': round(wall, 1), 'summary': summary, 'cpu_per_unit': cpu_rows,
             'crosscheck': xrows, 'targets': target_rows, 'runs': self.runs}, indent=1))
        return table

    def notify_report(self, fmt):
        """The notification table (medians of the rounds; ratios within each round) and its
        targets: (lines, [(target, measured, met)])."""
        runs = [r for r in self.runs if r['scenario'].startswith('notify-')]
        if not runs:
            return [], []
        hold = {s: next((r for r in runs if r['scenario'] == 'notify-hold' and r['system'] == s), {})
                for s in NOTIFY_SYSTEMS}
        n = hold['opencmg'].get('channels') or hold['nchan'].get('channels')
        kinds = []
        for r in runs:
            k = r['scenario'][len('notify-'):]
            if k not in ('hold', 'replay') and k not in kinds:
                kinds.append(k)
        title = lambda k: ('notify all' if k == 'all' else
                           f'notify one device, {self.size["notify_single"]} times (min, p50, p99, max)'
                           if k == 'one' else f'notify a list of {int(k[4:]):,}')
        lines = ['', f'Notifications: {n:,} SSE channels per system (HTTP/1.1, TLS 1.3, a client '
                 'certificate per device), held at once; each round publishes on each system in turn, '
                 'timed from the publishing call to each delivery (CLOCK_REALTIME stamped by every load '
                 'process); CPU of the device-facing processes (gateway instances; nginx workers) per '
                 'delivery.', '',
                 '| notification | figure | nginx + nchan | OpenCMG | OpenCMG ÷ nchan |', '|---|---|--:|--:|--:|']
        figs = [('first ms', 'first_ms'), ('p50 ms', 'p50_ms'), ('p99 ms', 'p99_ms'), ('last ms', 'last_ms'),
                ('delivered', 'delivered'), ('server CPU µs/delivery', 'server_cpu_us_per_delivery')]
        for k in kinds:
            sc = f'notify-{k}'
            for i, (label, key) in enumerate(figs):
                a, b = self.median(sc, 'nchan', key), self.median(sc, 'opencmg', key)
                ratio = self.paired(sc, key, 'nchan') if key != 'delivered' else None
                cell = lambda v: '–' if v is None else f'{v:,.0f}' if key == 'delivered' else fmt(v, 'ms')
                lines.append(f'| {title(k) if i == 0 else ""} | {label} | {cell(a)} | {cell(b)} | '
                             f'{"–" if ratio is None else f"{ratio:.2f}"} |')
            for k2 in ('connector', 'site'):
                v = self.median(sc, 'opencmg', f'{k2}_cpu_us_per_delivery')
                if v is not None:
                    lines.append(f'| | {k2} CPU µs/delivery | – | {fmt(v, "ms")} | |')
        kib = {s: hold[s].get('kib_per_channel') for s in NOTIFY_SYSTEMS}
        est = {s: hold[s].get('establish_s') for s in NOTIFY_SYSTEMS}
        lines.append(f'| {n:,} idle channels | RSS KiB per channel | {fmt(kib["nchan"], "kib_per_conn")} | '
                     f'{fmt(kib["opencmg"], "kib_per_conn")} | '
                     f'{kib["opencmg"] / kib["nchan"]:.2f} |' if kib['nchan'] and kib['opencmg'] else
                     f'| {n:,} idle channels | RSS KiB per channel | {fmt(kib["nchan"], "kib_per_conn")} | '
                     f'{fmt(kib["opencmg"], "kib_per_conn")} | – |')
        lines.append(f'| | all up in s | {fmt(est["nchan"], "establish_s")} | {fmt(est["opencmg"], "establish_s")} | |')
        h = hold['opencmg']
        for k2 in ('connector', 'site'):
            if f'{k2}_rss_before_kib' in h:
                lines.append(f'| | {k2} RSS KiB before → with the channels | – | '
                             f'{h[f"{k2}_rss_before_kib"]:,} → {h[f"{k2}_rss_held_kib"]:,} | |')
        for s in NOTIFY_SYSTEMS:
            r = next((x for x in runs if x['scenario'] == 'notify-replay' and x['system'] == s), None)
            if r:
                lines.append(f'| replay | {NOTIFY_LABEL[s]}: channels back with Last-Event-ID, events each '
                             f'(3 missed) | {r["replay_up"]:,} of {r["replayed"]:,}, {r["replay_min"]}..'
                             f'{r["replay_max"]} | | |' if s == 'nchan' else
                             f'| | {NOTIFY_LABEL[s]}: the same | | {r["replay_up"]:,} of {r["replayed"]:,}, '
                             f'{r["replay_min"]}..{r["replay_max"]} | |')
        ms = lambda k, key: self.median(f'notify-{k}', 'opencmg', key)
        targets = []
        def add(label, v, ok, unit=''):
            targets.append((label, '–' if v is None else f'{v:.2f}{unit}', v is not None and ok(v)))
        add('notify: gateway RSS per idle channel ≤ 32 KiB', kib['opencmg'], lambda v: v <= 32, ' KiB')
        add('notify: gateway RSS per idle channel ≤ 0.8 × nchan',
            kib['opencmg'] / kib['nchan'] if kib['opencmg'] and kib['nchan'] else None, lambda v: v <= 0.8, ' ×')
        if 'all' in kinds:
            add(f'notify all: last of {n:,} ≤ 2 s', ms('all', 'last_ms'), lambda v: v <= 2000, ' ms')
            add(f'notify all: median ≤ 1 s', ms('all', 'p50_ms'), lambda v: v <= 1000, ' ms')
            add('notify all: server CPU per delivery ≤ 0.8 × nchan',
                self.paired('notify-all', 'server_cpu_us_per_delivery', 'nchan'), lambda v: v <= 0.8, ' ×')
        if 'one' in kinds:
            add('notify one device: p99 ≤ 50 ms', ms('one', 'p99_ms'), lambda v: v <= 50, ' ms')
        big = [k for k in kinds if k.startswith('list')]
        if big:
            k = max(big, key=lambda x: int(x[4:]))
            add(f'notify a list of {int(k[4:]):,}: last ≤ 1 s', ms(k, 'last_ms'), lambda v: v <= 1000, ' ms')
        return lines, targets

    def cleanup(self, keep_logs):
        self.procs.stop_all()
        if keep_logs:
            dest = self.out / 'logs'
            dest.mkdir(exist_ok=True)
            for f in self.work.glob('*.log'):
                shutil.copy(f, dest / f.name)
        shutil.rmtree(self.work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description='OpenCMG against nginx, nginx + ssh -R and going direct.')
    ap.add_argument('--cmg', required=True, help='the cmg binary')
    ap.add_argument('--load', required=True, help='the cmg-load binary')
    ap.add_argument('--out', required=True, help='directory for results.md, results.csv, runs.csv, results.json')
    ap.add_argument('--quick', action='store_true', help='tiny sizes: checks that everything works')
    ap.add_argument('--rounds', type=int, help='rounds per system (default 2)')
    ap.add_argument('--systems', default=','.join(SYSTEMS), help='comma-separated subset of ' + ','.join(SYSTEMS))
    ap.add_argument('--only', help='comma-separated scenarios: h1,h2,rate,newconn,download,upload,idle,'
                                   'notify,crosscheck')
    ap.add_argument('--idle-conns', type=int, help='idle connections (default 10000)')
    ap.add_argument('--channels', type=int,
                    help='notification channels per system (default 100000; 200 with --quick)')
    ap.add_argument('--rate', type=int, help='the fixed rate, requests/s (default 1000)')
    ap.add_argument('--no-crosscheck', action='store_true', help='skip the wrk / h2load cross-check')
    ap.add_argument('--nginx-buffering', default='on', choices=('on', 'off'),
                    help="the proxy's proxy_buffering (default on)")
    ap.add_argument('--serve', action='store_true',
                    help='set everything up, print the endpoints, and wait for Ctrl-C (for profiling)')
    args = ap.parse_args()

    b = Bench(args)
    ok = False
    failed_runs = False

    def stop(sig, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    t0 = time.monotonic()
    try:
        log(f'setting up in {b.work} ...')
        b.setup()
        log(f'  up in {time.monotonic() - t0:.1f} s: ' + ', '.join(f'{n} pid {p}' for n, p in b.procs.groups().items()))
        if args.serve:
            for s in b.systems:
                log(f'  {LABEL[s]}: ' + ' '.join(map(str, b.cmgload_argv(s, '/small.bin', []))))
            log('Ctrl-C to stop')
            while True:
                b.check_alive()
                time.sleep(1)
        b.run_scenarios()
        table = b.report(time.monotonic() - t0)
        print(table)
        log(f'results in {b.out}: results.md, results.csv, runs.csv, results.json')
        ok = True
        if any(r.get('error') for r in b.runs):
            log('some runs saw errors (listed under the table)')
            failed_runs = True
    except KeyboardInterrupt:
        log('interrupted')
    except Exception as e:
        log(f'bench failed: {e}')
    finally:
        b.cleanup(keep_logs=not ok)
        if not ok:
            log(f'logs kept in {b.out}/logs')
    return 0 if ok and not failed_runs else 1


if __name__ == '__main__':
    sys.exit(main())
