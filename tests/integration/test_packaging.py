"""A real service: `cmake --install`, the systemd units, the man page, the Debian package
built by CPack, the deploy/ examples (HAProxy, Kubernetes), and the gateway's drop from
root to `user =`.

The package test installs opencmg_*.deb on this machine (as root), runs a whole deployment
with the installed /usr/bin/cmg, then removes the package, and the opencmg user and
directories its postinst made, so that the machine is left as found.
"""
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

import cmgtest
import sitetest
from cmgtest import CMG, SLOW, ini_set, poll, request, run_cmg

ROOT = cmgtest.HERE.parent.parent
BUILD = Path(CMG).parent
UNITS = ('opencmg-gateway@.service', 'opencmg-connector.service', 'opencmg-site.service')
CAP_NET_BIND_SERVICE = 10
CONFIG_LINE_ERROR = re.compile(r'\.conf:\d+: ')     # how a config file's syntax error reads


def run(*argv, timeout=300, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout * SLOW, stdin=subprocess.DEVNULL, **kw)


def needs_root():
    if os.geteuid() != 0:
        pytest.skip('needs root (installs a package, switches users)')


@pytest.fixture(scope='module', autouse=True)
def deps():
    """systemd-analyze, haproxy, python3-yaml, man: from the test list of scripts/deps."""
    r = run('bash', '-c', f'. "{ROOT}/scripts/deps" && cmg_install_deps test', timeout=900)
    assert r.returncode == 0, f'scripts/deps: {r.returncode}\n{r.stdout}\n{r.stderr}'


@pytest.fixture(scope='module')
def install_tree(tmp_path_factory):
    """`cmake --install` of the build directory of $CMG_BIN into a fresh prefix."""
    prefix = tmp_path_factory.mktemp('prefix')
    r = run('cmake', '--install', BUILD, '--prefix', prefix)
    assert r.returncode == 0, f'cmake --install: {r.stdout}\n{r.stderr}'
    return prefix


def verify_units(paths, man=True):
    """systemd-analyze verify: exit 0 and not a line of complaint (it exits 0 on some)."""
    r = run('systemd-analyze', 'verify', *([] if man else ['--man=no']), *paths)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), \
        f'systemd-analyze verify: {r.returncode}\n{r.stdout}\n{r.stderr}'


def unit_keys(path):
    keys = {}
    for line in Path(path).read_text().splitlines():
        if '=' in line and not line.startswith('#'):
            k, v = line.split('=', 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


# ---------------------------------------------------------------- install rules, units, man page

def test_install_tree_holds_the_service_and_nothing_else(install_tree):
    files = sorted(str(p.relative_to(install_tree)) for p in install_tree.rglob('*') if p.is_file())
    for f in ('bin/cmg', 'share/man/man1/cmg.1', 'lib/sysusers.d/opencmg.conf', 'lib/sysctl.d/60-opencmg.conf',
              'share/doc/opencmg/examples/gateway.conf', 'share/doc/opencmg/examples/connector.conf',
              'share/doc/opencmg/examples/site.conf', 'share/doc/opencmg/operations.md',
              'share/doc/opencmg/configuration.md', *[f'lib/systemd/system/{u}' for u in UNITS]):
        assert f in files, f'{f} not installed: {files}'
    assert [f for f in files if f.startswith('bin/')] == ['bin/cmg'], files   # no bench or test tools
    r = run(install_tree / 'bin/cmg', 'version')
    assert r.returncode == 0 and r.stdout.startswith('cmg '), r


def test_units_verify_and_are_hardened(install_tree):
    units = [install_tree / 'lib/systemd/system' / u for u in UNITS]
    verify_units(units, man=False)           # the man page is checked with the package
    for unit in units:
        k = unit_keys(unit)
        assert k['ExecStart'][0].startswith(f'{install_tree}/bin/cmg '), (unit, k['ExecStart'])
        assert k['User'] == ['opencmg'] and k['ProtectSystem'] == ['strict'], unit
        assert k['Restart'] == ['on-failure']
        assert k['StateDirectory'] == ['opencmg'] and k['ConfigurationDirectory'] == ['opencmg']
        assert int(k['LimitNOFILE'][0]) >= 65536 and k['NoNewPrivileges'] == ['yes']
    gateway = unit_keys(units[0])
    assert gateway['AmbientCapabilities'] == ['CAP_NET_BIND_SERVICE']
    assert '--instance %i' in gateway['ExecStart'][0]
    # Every role reloads on SIGHUP: systemctl reload sends it.
    assert all(unit_keys(u)['ExecReload'] == ['/bin/kill -HUP $MAINPID'] for u in units)
    # Stopping drains (SIGTERM, no ExecStop): SIGKILL only after more than drain_timeout (30 s).
    assert gateway['KillSignal'] == ['SIGTERM'] and 'ExecStop' not in gateway
    assert int(gateway['TimeoutStopSec'][0]) > 30
    for unit in units[1:]:                    # the others need no capability at all
        assert unit_keys(unit)['CapabilityBoundingSet'] == [''], unit


def help_options(*cmd):
    r = run_cmg(*cmd, '--help')
    assert r.returncode == 0, (cmd, r)
    return set(re.findall(r'(?<![\w-])(--[a-z][a-z-]+)', r.stdout))


def test_man_page_renders_and_names_every_option(install_tree):
    page = install_tree / 'share/man/man1/cmg.1'
    # ASCII output, no hyphenation, wide lines: an option reads as one word.
    env = dict(os.environ, LC_ALL='C', MANWIDTH='250', MANROFFOPT='-rHY=0')
    r = run('man', '--warnings', '-l', page, env=env)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    text = re.sub(r'.\x08', '', r.stdout)
    for section in ('SYNOPSIS', 'GATEWAY', 'CONNECTOR', 'SITE', 'CLIENT', 'FILES', 'EXIT STATUS'):
        assert section in text
    options = set()
    for cmd in (['gateway'], ['connector'], ['site', 'init'], ['site', 'serve'], ['site', 'mapping'],
                ['client', 'register'], ['client', 'get'], ['client', 'renew'],
                ['client', 'analyze'], ['connector', 'analyze']):
        options |= {(tuple(cmd), o) for o in help_options(*cmd)}
    missing = sorted(f'{" ".join(c)} {o}' for c, o in options
                     if o not in text and o not in ('--help', '--version'))
    assert not missing, f'options in --help but not in the man page: {missing}'


# ---------------------------------------------------------------- example configurations, deploy/

def loads_past_the_parser(role, conf):
    """The role reads conf: whatever stops it then is a missing file, not a key it refuses."""
    r = run_cmg(role, '-c', conf, timeout=10)
    assert r.returncode != 0 and not CONFIG_LINE_ERROR.search(r.stderr), (conf, r.stderr)


def k8s_documents():
    yaml = pytest.importorskip('yaml')
    docs = []
    for f in sorted((ROOT / 'deploy/kubernetes').glob('*.yaml')):
        docs += [(f.name, d) for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return docs


def test_example_configs_are_accepted(tmp_path):
    for role in ('gateway', 'connector'):
        conf = tmp_path / f'{role}.conf'
        shutil.copy(ROOT / f'packaging/examples/{role}.conf', conf)
        loads_past_the_parser(role, conf)
    for name, doc in k8s_documents():
        for key, text in (doc.get('data') or {}).items():
            if key.endswith('.conf'):
                conf = tmp_path / key
                conf.write_text(text)
                loads_past_the_parser(key.split('.')[0], conf)


def test_haproxy_example_is_valid():
    r = run('haproxy', '-c', '-f', ROOT / 'deploy/haproxy.cfg')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'WARNING' not in r.stdout + r.stderr, r.stdout + r.stderr


def test_kubernetes_manifests_parse_and_fit_together():
    docs = k8s_documents()
    for name, d in docs:
        assert d.get('apiVersion') and d.get('kind') and d.get('metadata', {}).get('name'), (name, d)
    kinds = {(d['kind'], d['metadata']['name']) for _, d in docs}
    for kind, obj in (('Deployment', 'cmg-gateway-0'), ('Deployment', 'cmg-connector-1'),
                      ('Service', 'cmg-gateway'), ('ConfigMap', 'cmg-gateway-conf'),
                      ('ConfigMap', 'cmg-connector-conf'), ('Secret', 'cmg-gateway-tls'),
                      ('Secret', 'cmg-connector-tls')):
        assert (kind, obj) in kinds, (kind, obj, kinds)
    by_name = {(d['kind'], d['metadata']['name']): d for _, d in docs}
    pods = [d['spec']['template'] for _, d in docs if d['kind'] == 'Deployment']
    for _, d in docs:
        if d['kind'] == 'Deployment':
            assert d['spec']['selector']['matchLabels'].items() <= \
                d['spec']['template']['metadata']['labels'].items(), d['metadata']['name']
            for vol in d['spec']['template']['spec']['volumes']:
                ref = vol.get('configMap', {}).get('name') or vol.get('secret', {}).get('secretName')
                if ref:
                    kind = 'ConfigMap' if 'configMap' in vol else 'Secret'
                    assert (kind, ref) in by_name, (d['metadata']['name'], kind, ref)
        if d['kind'] == 'Service':
            assert any(d['spec']['selector'].items() <= p['metadata']['labels'].items()
                       for p in pods), f'Service {d["metadata"]["name"]} selects no pod'


# ---------------------------------------------------------------- the gateway drops root

def status_ids(pid):
    status = Path(f'/proc/{pid}/status').read_text()
    ids = {k: [int(x) for x in re.search(rf'^{k}:\s+(.*)$', status, re.M).group(1).split()]
           for k in ('Uid', 'Gid', 'Groups')}
    ids.update({k: int(re.search(rf'^{k}:\s+(\w+)$', status, re.M).group(1), 16)
                for k in ('CapEff', 'CapPrm', 'CapAmb')})
    return ids


def test_gateway_started_as_root_serves_as_user(procs, tmp_path, svc):
    needs_root()
    nobody = pwd.getpwnam('nobody')
    state = Path(tempfile.mkdtemp(prefix='cmg-state-'))   # the policy cache: the user's to write
    try:
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        dep = sitetest.Deployment(procs, tmp_path, svc, start=False)
        ini_set(dep.site.gateway_conf, 'gateway', 'user', 'nobody')
        ini_set(dep.site.gateway_conf, 'gateway', 'policy_cache', state / 'policy.jws')
        dep.start_site()
        dep.gateway, dep.connector = cmgtest.bring_up(procs, dep.site)
        dep.wait_policy()
        gw = dep.gateway[0]
        assert 'running as user nobody' in gw.log_text()

        # While a request is in flight through it: every id is nobody's, no other group.
        seen = svc.count
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=request(dep.site, 'GET',
                             dep.site.path('delay?ms=1500'))))
        t.start()
        poll(lambda: svc.count > seen, 5 * SLOW, 'the request to reach the service')
        ids = status_ids(gw.pid)
        t.join()
        assert answer['r'].status == 200 and answer['r'].body == b'late', answer
        assert ids['Uid'] == [nobody.pw_uid] * 4 and ids['Gid'] == [nobody.pw_gid] * 4, ids
        assert set(ids['Groups']) <= {nobody.pw_gid}, ids
        # One capability left, as the systemd unit grants: binding ports below 1024.
        assert ids['CapEff'] == ids['CapPrm'] == 1 << CAP_NET_BIND_SERVICE and ids['CapAmb'] == 0, ids

        # The policy cache was written as that user; the files a reload re-reads are in
        # the test's root-only directory, and the gateway says so.
        cache = state / 'policy.jws'
        assert cache.exists() and cache.stat().st_uid == nobody.pw_uid
        log = gw.log_text()
        assert 'cannot write' not in log, log
        assert f'{dep.site.gateway_conf}: uid {nobody.pw_uid} cannot read it' in log, log
    finally:
        shutil.rmtree(state)


@pytest.mark.parametrize('user, reason', [('no-such-user-cmg', 'no such user'),
                                          ('root', 'that is uid 0')])
def test_gateway_refuses_to_stay_root(site, user, reason):
    needs_root()
    ini_set(site.gateway_conf, 'gateway', 'user', user)
    r = run_cmg('gateway', '-c', site.gateway_conf, timeout=10)
    assert r.returncode == 1, r
    assert f'user = {user}: {reason}' in r.stderr and 'ready' not in r.stderr, r.stderr


# ---------------------------------------------------------------- the Debian package

@pytest.fixture(scope='module')
def installed_package(tmp_path_factory):
    """Builds the .deb once (cpack), installs it with apt-get; removes it all afterwards."""
    needs_root()
    if run('dpkg-query', '-W', '-f=${Status}', 'opencmg').stdout.startswith('install ok'):
        pytest.skip('opencmg is installed on this machine: not replacing it')
    out = tmp_path_factory.mktemp('deb')
    r = run('cpack', '-G', 'DEB', '-B', out, '--config', BUILD / 'CPackConfig.cmake')
    assert r.returncode == 0, f'cpack: {r.stdout}\n{r.stderr}'
    debs = list(out.glob('opencmg_*.deb'))
    assert len(debs) == 1, list(out.iterdir())
    had_user = run('getent', 'passwd', 'opencmg').returncode == 0
    had_dirs = {d: d.exists() for d in (Path('/etc/opencmg'), Path('/var/lib/opencmg'))}
    env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
    try:
        r = run('apt-get', 'install', '-y', '--no-install-recommends', debs[0], env=env)
        assert r.returncode == 0, f'apt-get install: {r.stdout}\n{r.stderr}'
        yield debs[0]
    finally:
        r = run('apt-get', 'remove', '--purge', '-y', 'opencmg', env=env)   # no dpkg record left
        if not had_user:
            run('userdel', 'opencmg')
            run('groupdel', 'opencmg')
        for d, existed in had_dirs.items():
            if not existed:
                shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 0 and not Path('/usr/bin/cmg').exists(), r.stdout + r.stderr


def test_package_declares_its_libraries(installed_package):
    depends = run('dpkg-deb', '-f', installed_package, 'Depends').stdout
    for lib in ('libssl3', 'libnghttp2-14', 'libcjson1', 'libinih1', 'libsqlite3-0'):
        assert re.search(rf'\b{lib}\b', depends), (lib, depends)
    # Every library the binary loads comes from a declared package.
    for path in re.findall(r'=> (/\S+)', run('ldd', '/usr/bin/cmg').stdout):
        owner = run('dpkg', '-S', os.path.realpath(path)).stdout.split(':')[0]
        if owner and owner not in ('libc6', 'libasan8', 'libubsan1', 'libgcc-s1', 'libstdc++6'):
            assert re.search(rf'\b{re.escape(owner)}\b', depends), (path, owner, depends)


def test_sysctl_file_sets_tcp_migrate_req(install_tree):
    text = (install_tree / 'lib/sysctl.d/60-opencmg.conf').read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith('#')]
    assert lines == ['net.ipv4.tcp_migrate_req = 1'], lines


def test_package_installs_service_user_and_verified_units(installed_package):
    user = pwd.getpwnam('opencmg')
    assert user.pw_uid != 0 and user.pw_shell.endswith('nologin'), user
    assert Path('/var/lib/opencmg').stat().st_uid == user.pw_uid
    verify_units([f'/usr/lib/systemd/system/{u}' for u in UNITS])   # man cmg(1) found too
    assert Path('/usr/lib/sysctl.d/60-opencmg.conf').exists()
    assert unit_keys('/usr/lib/systemd/system/opencmg-gateway@.service')['ExecStart'][0] \
        .startswith('/usr/bin/cmg gateway ')
    r = run('man', '-w', 'cmg')
    assert r.returncode == 0 and 'man1/cmg.1' in r.stdout, r


def test_installed_cmg_runs_a_deployment(installed_package, procs, tmp_path, svc, monkeypatch):
    monkeypatch.setattr(cmgtest, 'CMG', '/usr/bin/cmg')
    monkeypatch.setattr(sitetest, 'CMG', '/usr/bin/cmg')
    dep = sitetest.Deployment(procs, tmp_path, svc)         # site init, site serve, gateway, connector
    for p in (dep.site_proc, dep.gateway[0], dep.connector):
        assert Path(f'/proc/{p.pid}/exe').resolve() == Path('/usr/bin/cmg'), p.name
    r = request(dep.site, 'GET', dep.site.path('policy.xml'))
    assert r.status == 200, r
    r = cmgtest.curl(dep.site, dep.site.path('blob/pkg'))
    assert r.status == 200, r
