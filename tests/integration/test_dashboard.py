"""The web dashboard of `cmg site serve` on the admin listener: sign-in with the admin
token, the session cookie, the security headers of every page and file, what a session
may read (and may not change), and the pages in headless Chromium (playwright-core)."""
import html.parser
import http.client
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import time
from pathlib import Path

import cmgtest
from cmgtest import SLOW, poll
from sitetest import Deployment, Device
from test_revocation import FAKETIME_LIB

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
ASSETS = {'/ui/app.js': 'text/javascript', '/ui/app.css': 'text/css',
          '/ui/uPlot.iife.min.js': 'text/javascript', '/ui/uPlot.min.css': 'text/css',
          '/ui/favicon.svg': 'image/svg+xml'}
SESSION_TTL = 12 * 3600
SESSIONS_MAX = 64
LOGIN_BURST = 10

class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        return self.headers.get(name)

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f'<{self.status} {dict(self.headers)} {self.body[:300]!r}>'

def ui(dep, method, path, body=None, cookie=None, headers=None, source='127.0.0.1'):
    """One request to the admin listener (TLS checked against the site CA), redirects not
    followed; `source` is the loopback address it comes from."""
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    conn = http.client.HTTPSConnection('127.0.0.1', dep.admin_port, context=ctx, timeout=10,
                                       source_address=(source, 0))
    h = dict(headers or {})
    if cookie:
        h['Cookie'] = f'cmg_session={cookie}'
    if isinstance(body, dict):
        body = '&'.join(f'{k}={v}' for k, v in body.items())
        h.setdefault('Content-Type', 'application/x-www-form-urlencoded')
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return Answer(r.status, r.headers, r.read())
    finally:
        conn.close()

def sign_in(dep, token=None, source='127.0.0.1'):
    """The session id the sign-in form gives for `token` (default: the admin token)."""
    r = ui(dep, 'POST', '/ui/login', {'token': token or dep.admin_token}, source=source)
    assert r.status == 303 and r.header('Location') == '/ui/', r
    m = re.fullmatch(r'cmg_session=([0-9a-f]{64}); (.*)', r.header('Set-Cookie'))
    assert m, r.header('Set-Cookie')
    return m.group(1)

def site_only(procs, tmp_path, svc, env=None):
    """A site with `cmg site serve` running (no gateway or connector: the dashboard's own
    checks need none)."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    if env:
        dep.site_proc = procs.start('site', [cmgtest.CMG, 'site', 'serve', dep.site.dir], env=env)
        poll(lambda: dep.api('GET', '/v1/status'), 10 * SLOW, 'the site to serve',
             check=procs.check)
    else:
        dep.start_site()
    return dep

def assert_secure_headers(r, what):
    assert r.header('Content-Security-Policy') == CSP, (what, r)
    assert r.header('X-Content-Type-Options') == 'nosniff', (what, r)
    assert r.header('Referrer-Policy') == 'no-referrer', (what, r)
    assert r.header('Cache-Control') == 'no-store', (what, r)

class InlineFinder(html.parser.HTMLParser):
    """Counts what a strict CSP would refuse: inline script, style elements and attributes,
    event-handler attributes, javascript: URLs."""

    def __init__(self):
        super().__init__()
        self.problems, self.scripts, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'style':
            self.problems.append('<style>')
        if tag == 'script':
            self._in_script = True
            if not a.get('src'):
                self.problems.append('<script> without src')
            self.scripts.append(a.get('src'))
        for k, v in attrs:
            if k == 'style' or k.startswith('on') or (v or '').strip().startswith('javascript:'):
                self.problems.append(f'{tag} {k}={v}')

    def handle_endtag(self, tag):
        if tag == 'script':
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append('inline script text')

def inline_problems(body):
    f = InlineFinder()
    f.feed(body.decode())
    return f

# ---------------------------------------------------------------- plain HTTP checks

def test_sign_in_cookie_and_pages(procs, tmp_path, svc):
    dep = site_only(procs, tmp_path, svc)
    r = ui(dep, 'GET', '/')
    assert r.status in (302, 303) and r.header('Location') == '/ui/', r
    r = ui(dep, 'GET', '/ui/')
    assert r.status == 303 and r.header('Location') == '/ui/login', r
    r = ui(dep, 'GET', '/ui/login')
    assert r.status == 200 and r.header('Content-Type').startswith('text/html'), r
    assert b'name="token"' in r.body and b'action="/ui/login"' in r.body

    # a wrong token: 401, the form again, no cookie, a log line like a refused admin request
    for wrong in ('not-the-token', dep.admin_token[:-1], dep.admin_token + 'x', ''):
        r = ui(dep, 'POST', '/ui/login', {'token': wrong})
        assert r.status == 401, (wrong, r)
        assert r.header('Set-Cookie') is None, r
        assert b'name="token"' in r.body and b'Wrong admin token' in r.body, r
    r = ui(dep, 'POST', '/ui/login', 'nothing=here')
    assert r.status == 401 and r.header('Set-Cookie') is None, r
    poll(lambda: 'dashboard sign-in refused: no or wrong admin token' in dep.site_proc.log_text(),
         5, 'the refusal in the log')
    assert re.search(r'dashboard sign-in refused.*reason=admin_token.*peer=127\.0\.0\.1',
                     dep.site_proc.log_text()), dep.site_proc.log_text()
    assert dep.admin_token not in dep.site_proc.log_text()

    # the right one (percent-encoded as a browser may send it): a session cookie, exactly
    encoded = ''.join(f'%{b:02X}' for b in dep.admin_token.encode())
    r = ui(dep, 'POST', '/ui/login', f'token={encoded}')
    assert r.status == 303 and r.header('Location') == '/ui/', r
    cookies = r.headers.get_all('Set-Cookie')
    assert len(cookies) == 1, cookies
    name_value, *attrs = cookies[0].split('; ')
    assert re.fullmatch(r'cmg_session=[0-9a-f]{64}', name_value), cookies
    assert attrs == ['HttpOnly', 'Secure', 'SameSite=Strict', 'Path=/', f'Max-Age={SESSION_TTL}']
    session = name_value.split('=', 1)[1]
    assert session != sign_in(dep)   # each sign-in its own random session

    r = ui(dep, 'GET', '/ui/', cookie=session)
    assert r.status == 200 and r.header('Content-Type').startswith('text/html'), r
    page = inline_problems(r.body)
    assert page.problems == [] and '/ui/app.js' in page.scripts, page.problems
    r = ui(dep, 'GET', '/ui/login', cookie=session)
    assert r.status == 303 and r.header('Location') == '/ui/', r

    # the read-only lists: a session needed, only those named, GET only
    r = ui(dep, 'GET', '/ui/api/mapping.list', cookie=session)
    assert r.status == 200 and r.header('Content-Type') == 'application/json', r
    roles = [m['role'] for m in r.json()]
    assert set(roles) == {*dep.site.role_ids, dep.site_role}, roles
    assert r.json() == dep.api('POST', '/v1/ops/mapping.list', {})   # what the admin API says
    for name in ('device.list', 'cert.list', 'connector.list'):
        r = ui(dep, 'GET', f'/ui/api/{name}', cookie=session)
        assert r.status == 200 and isinstance(r.json(), list), (name, r)
    r = ui(dep, 'GET', '/ui/api/mapping.list')
    assert r.status == 401 and 'error' in r.json(), r
    for name in ('mapping.remove', 'device.block', 'key.rotate', 'status', '../v1/policy'):
        r = ui(dep, 'GET', f'/ui/api/{name}', cookie=session)
        assert r.status == 404, (name, r)
    r = ui(dep, 'POST', '/ui/api/mapping.list', b'{}', cookie=session)
    assert r.status == 405, r

    # sign-out ends the session here and in the browser
    r = ui(dep, 'POST', '/ui/logout', cookie=session)
    assert r.status == 303 and r.header('Location') == '/ui/login', r
    assert r.header('Set-Cookie') == ('cmg_session=; HttpOnly; Secure; SameSite=Strict; Path=/; '
                                      'Max-Age=0'), r
    assert ui(dep, 'GET', '/ui/', cookie=session).status == 303
    assert ui(dep, 'GET', '/v1/status', cookie=session).status == 401

def test_security_headers_on_every_page_and_file(procs, tmp_path, svc):
    dep = site_only(procs, tmp_path, svc)
    session = sign_in(dep)
    answers = {
        'GET /': ui(dep, 'GET', '/'),
        'GET /ui/ (no session)': ui(dep, 'GET', '/ui/'),
        'GET /ui/': ui(dep, 'GET', '/ui/', cookie=session),
        'HEAD /ui/': ui(dep, 'HEAD', '/ui/', cookie=session),
        'GET /ui/login': ui(dep, 'GET', '/ui/login'),
        'POST /ui/login (wrong)': ui(dep, 'POST', '/ui/login', {'token': 'x'}),
        'GET /ui/api (no session)': ui(dep, 'GET', '/ui/api/device.list'),
        'GET /ui/api': ui(dep, 'GET', '/ui/api/device.list', cookie=session),
        'GET /ui/nothing': ui(dep, 'GET', '/ui/nothing.js', cookie=session),
        'DELETE /ui/': ui(dep, 'DELETE', '/ui/', cookie=session),
    }
    for path, kind in ASSETS.items():
        for cookie in (None, session):   # the files are the same for everyone
            r = ui(dep, 'GET', path, cookie=cookie)
            assert r.status == 200 and r.header('Content-Type').startswith(kind), (path, r)
            assert int(r.header('Content-Length')) == len(r.body) > 0
            answers[f'GET {path} {bool(cookie)}'] = r
    for what, r in answers.items():
        assert_secure_headers(r, what)
    assert answers['HEAD /ui/'].body == b'' and answers['DELETE /ui/'].status == 405
    assert answers['GET /ui/nothing'].status == 404
    # the pages are whole files of their own; the HTML files are not served as files
    for path in ('/ui/index.html', '/ui/login.html', '/ui/../admin.token', '/ui/%2e%2e/x'):
        assert ui(dep, 'GET', path, cookie=session).status == 404, path
    login_page = inline_problems(answers['GET /ui/login'].body)
    assert login_page.problems == [], login_page.problems
    # the chart library is uPlot, whole
    lib = answers[f'GET /ui/uPlot.iife.min.js {True}'].body
    assert b'uPlot' in lib and len(lib) > 30000

def test_session_reads_status_but_changes_nothing(procs, tmp_path, svc):
    dep = site_only(procs, tmp_path, svc)
    session = sign_in(dep)
    r = ui(dep, 'GET', '/v1/status', cookie=session)
    assert r.status == 200 and r.json()['policy_version'] == dep.policy_version(), r
    r = ui(dep, 'GET', '/v1/traffic?range=day', cookie=session)
    assert r.status != 401, r   # open to the session (the document is the traffic module's)
    before = dep.policy_version()
    # POST /v1/ops/* stays bearer-only; so does everything else the session is not for
    for method, path, body in (('POST', '/v1/ops/mapping.list', b'{}'),
                               ('POST', '/v1/ops/key.rotate', b'{}'),
                               ('POST', '/v1/ops/device.block', b'{"name": "device1"}'),
                               ('GET', '/v1/policy', None),
                               ('HEAD', '/v1/status', None),
                               ('POST', '/v1/status', b'{}')):
        r = ui(dep, method, path, body, cookie=session,
               headers={'Content-Type': 'application/json'})
        assert r.status == 401, (method, path, r)
    assert 'admin request refused: no or wrong admin token' in dep.site_proc.log_text()
    assert dep.policy_version() == before
    assert dep.api('POST', '/v1/ops/mapping.list', {})   # the bearer token still works
    # sessions live in memory only: gone at a restart
    dep.site_proc.signal(signal.SIGTERM)
    dep.start_site()
    assert ui(dep, 'GET', '/v1/status', cookie=session).status == 401
    assert ui(dep, 'GET', '/ui/', cookie=session).status == 303

def test_forged_evicted_and_expired_sessions(procs, tmp_path, svc):
    stamp = tmp_path / 'faketime'
    stamp.write_text('+0s\n')
    assert FAKETIME_LIB, 'libfaketime is missing (Debian package faketime)'
    dep = site_only(procs, tmp_path, svc, env={
        'LD_PRELOAD': FAKETIME_LIB, 'FAKETIME_TIMESTAMP_FILE': str(stamp),
        'FAKETIME_DONT_FAKE_MONOTONIC': '1', 'FAKETIME_NO_CACHE': '1',
        'ASAN_OPTIONS': 'detect_leaks=1:abort_on_error=0:verify_asan_link_order=0'})
    session = sign_in(dep)
    forged = [secrets.token_hex(32), session[:-1] + ('0' if session[-1] != '0' else '1'),
              session.upper(), session[:-2], session + '00', 'x' * 64, '', ' ' + session[1:]]
    for bad in forged:
        assert ui(dep, 'GET', '/ui/', cookie=bad).status == 303, bad
        assert ui(dep, 'GET', '/v1/status', cookie=bad).status == 401, bad
        assert ui(dep, 'GET', '/ui/api/cert.list', cookie=bad).status == 401, bad
    assert ui(dep, 'GET', '/ui/', cookie=session).status == 200
    # a cookie among others, as a browser sends them
    r = ui(dep, 'GET', '/v1/status', headers={'Cookie': f'a=b; cmg_session={session}; c=d'})
    assert r.status == 200, r
    # a head full of made-up sessions (the most the listener reads): refused, and quickly
    many = '; '.join(f'cmg_session={secrets.token_hex(32)}' for _ in range(200))
    started = time.monotonic()
    assert ui(dep, 'GET', '/v1/status', headers={'Cookie': many}).status == 401
    assert ui(dep, 'GET', '/ui/', headers={'Cookie': many}).status == 303
    assert time.monotonic() - started < 2 * SLOW

    # at most 64 sessions: the 65th sign-in evicts the oldest, the others live on
    others = [sign_in(dep) for _ in range(SESSIONS_MAX)]
    assert ui(dep, 'GET', '/v1/status', cookie=session).status == 401
    assert all(ui(dep, 'GET', '/v1/status', cookie=s).status == 200 for s in others[::9])

    # 12 hours later (the site's wall clock moved): every session is over
    fresh = others[-1]
    stamp.write_text(f'+{SESSION_TTL - 120}s\n')
    assert ui(dep, 'GET', '/ui/', cookie=fresh).status == 200
    stamp.write_text(f'+{SESSION_TTL + 1}s\n')
    assert ui(dep, 'GET', '/ui/', cookie=fresh).status == 303
    assert ui(dep, 'GET', '/v1/status', cookie=fresh).status == 401
    assert ui(dep, 'GET', '/ui/api/device.list', cookie=fresh).status == 401
    assert ui(dep, 'GET', '/ui/', cookie=sign_in(dep)).status == 200   # a new one works

def test_sign_in_rate_limited_per_address(procs, tmp_path, svc):
    dep = site_only(procs, tmp_path, svc)
    for _ in range(LOGIN_BURST):
        assert ui(dep, 'POST', '/ui/login', {'token': 'guess'}).status == 401
    started = time.monotonic()
    r = ui(dep, 'POST', '/ui/login', {'token': 'guess'})
    assert r.status == 429 and r.header('Retry-After') == '60', r
    assert b'name="token"' in r.body
    assert_secure_headers(r, '429')
    # while limited, even the right token waits: guessing gains nothing
    r = ui(dep, 'POST', '/ui/login', {'token': dep.admin_token})
    assert r.status == 429 and r.header('Set-Cookie') is None, r
    # another address is not held up, with the form or the bearer token
    assert sign_in(dep, source='127.0.0.2')
    bearer = {'Authorization': f'Bearer {dep.admin_token}'}
    assert ui(dep, 'GET', '/v1/status', headers=bearer, source='127.0.0.2').status == 200
    # the held-back address may not try the bearer either
    assert ui(dep, 'GET', '/v1/status', headers=bearer).status == 429
    # hostile forms cost a try each and nothing more
    r = ui(dep, 'POST', '/ui/login', b'token=%zz', source='127.0.0.3')
    assert r.status == 401, r
    r = ui(dep, 'POST', '/ui/login', b'token=' + b'a' * 100000, source='127.0.0.3')
    assert r.status == 401, r
    poll(lambda: 'reason=rate_limited' in dep.site_proc.log_text(), 5, 'the 429 in the log')
    # one try more every 6 s: after it, the address may try again
    time.sleep(max(0, 6.5 - (time.monotonic() - started)))
    assert sign_in(dep)

def test_bearer_guesses_count_as_failed_sign_ins(procs, tmp_path, svc):
    """Wrong bearer tokens on the admin API are limited as the sign-in form is (else the
    form's limit would guard nothing); a request without any token is not a guess."""
    dep = site_only(procs, tmp_path, svc)
    src = '127.0.0.4'
    for _ in range(3):
        assert ui(dep, 'GET', '/v1/status', source=src).status == 401
    for _ in range(LOGIN_BURST):
        r = ui(dep, 'GET', '/v1/status', headers={'Authorization': 'Bearer guess'}, source=src)
        assert r.status == 401, r
    r = ui(dep, 'GET', '/v1/status', headers={'Authorization': f'Bearer {dep.admin_token}'},
           source=src)
    assert r.status == 429, r
    assert ui(dep, 'POST', '/ui/login', {'token': dep.admin_token}, source=src).status == 429
    assert dep.api('GET', '/v1/status')      # 127.0.0.1 is not held up


def test_cross_site_posts_and_the_webhook_secret(procs, tmp_path, svc):
    """Another site's page cannot sign the browser in or out; a session sees the alert
    webhook by its origin only (its user information, path and query are its secret)."""
    dep = site_only(procs, tmp_path, svc)
    cookie = sign_in(dep)
    for headers in ({'Origin': 'https://evil.example'}, {'Sec-Fetch-Site': 'cross-site'},
                    {'Origin': 'null', 'Sec-Fetch-Site': 'same-site'}):
        for path, body in (('/ui/logout', b''), ('/ui/login', {'token': dep.admin_token})):
            r = ui(dep, 'POST', path, body, cookie=cookie, headers=headers)
            assert r.status == 403 and r.header('Set-Cookie') is None, (headers, path, r)
    assert ui(dep, 'GET', '/v1/status', cookie=cookie).status == 200   # still signed in
    host = f'127.0.0.1:{dep.admin_port}'
    r = ui(dep, 'POST', '/ui/logout', b'', cookie=cookie,
           headers={'Origin': f'https://{host}', 'Host': host, 'Sec-Fetch-Site': 'same-origin'})
    assert r.status == 303, r
    cookie = sign_in(dep)
    dep.cmg_site('alert', 'webhook', 'https://user:s3cret@hooks.example:8443/T0K3N?key=abc')
    listed = ui(dep, 'GET', '/ui/api/alert.list', cookie=cookie)
    assert listed.status == 200, listed
    assert listed.json()['settings']['webhook'] == 'https://hooks.example:8443'
    assert b's3cret' not in listed.body and b'T0K3N' not in listed.body


# ---------------------------------------------------------------- in Chromium

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = '/usr/bin/chromium'
PLAYWRIGHT = REPO / 'tests' / 'node_modules' / 'playwright-core'
REQUESTS = 20
REPORT_INTERVAL = 1

def artifacts_dir():
    d = Path(os.environ.get('CMG_ARTIFACTS') or REPO / 'test-artifacts')
    d.mkdir(parents=True, exist_ok=True)
    return d

def run_browser(dep, tmp_path, tunnels, down=None):
    """dashboard.mjs with Chromium; with down=(connector name, its process), that connector
    is killed once the page says READY. What the page showed, and where the screenshots are."""
    out = artifacts_dir()
    cfg = tmp_path / 'browser.json'
    cfg.write_text(json.dumps({'url': f'https://127.0.0.1:{dep.admin_port}',
                               'token': dep.admin_token, 'out': str(out), 'tunnels': tunnels,
                               'timeout_ms': 20000 * SLOW, 'chromium': CHROMIUM,
                               'down': down and down[0]}))
    node = subprocess.Popen(['node', str(Path(__file__).with_name('dashboard.mjs')), str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if down:
            line = node.stdout.readline()
            assert line == 'READY\n', line + node.stdout.read() + node.stderr.read()
            down[1].signal(signal.SIGKILL)
        stdout, stderr = node.communicate(timeout=120 * SLOW)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert node.returncode == 0, f'dashboard.mjs: exit {node.returncode}\n{stdout}\n{stderr}'
    seen = json.loads(stdout)
    assert seen.get('ok'), json.dumps(seen, indent=1)
    return seen, out


def deployment_2x2(procs, tmp_path, svc):
    """Two gateway instances and two connectors (connector-1 and c2), reports every second."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    site = dep.site
    site.tunnel_port = cmgtest.free_port_range(2)
    site.loopback(2)
    for conf, section in ((site.dir / 'site.conf', 'site'), (site.gateway_conf, 'gateway'),
                          (site.connector_conf, 'connector')):
        cmgtest.ini_set(conf, section, 'report_interval', REPORT_INTERVAL)
    dep.cmg_site('connector', 'add', 'c2')
    conf_b = site.connector_copy('connector-b', [svc.url])
    cmgtest.ini_set(conf_b, 'connector', 'cert', 'connectors/c2.crt')
    cmgtest.ini_set(conf_b, 'connector', 'key', 'connectors/c2.key')
    cmgtest.ini_set(conf_b, 'connector', 'name', 'c2')
    dep.start_site()
    dep.gateway = [cmgtest.start_gateway(procs, site, i) for i in range(2)]
    dep.connector = [cmgtest.start_connector(procs, site.connector_conf, 'connector-a'),
                     cmgtest.start_connector(procs, conf_b, 'connector-b')]
    cmgtest.wait_ready(procs, site)
    return dep


def test_dashboard_in_chromium(procs, tmp_path, svc, capsys):
    assert os.access(CHROMIUM, os.X_OK), f'{CHROMIUM} is missing: scripts/deps installs it'
    assert PLAYWRIGHT.is_dir(), f'{PLAYWRIGHT} is missing: scripts/deps installs it (npm ci)'
    dep = deployment_2x2(procs, tmp_path, svc)
    for _ in range(REQUESTS):
        r = cmgtest.curl(dep.site, dep.site.path('policy.xml'))
        assert r.status == 200, r
    _, bulk = dep.bulk_token()
    dep.register(Device(tmp_path, 'dashboard-device'), bulk)

    def reported():
        s = dep.api('GET', '/v1/status')
        up = [t for t in s['tunnels'] if t['state'] == 'up']
        return len(up) == 4 and s['traffic']['today']['requests'] >= REQUESTS and s
    status = poll(reported, 15 * SLOW, 'the reports of 4 tunnels and the traffic at the site',
                  check=procs.check)

    # the pages; at the end, connector c2 killed while the connections page is open
    seen, out = run_browser(dep, tmp_path, tunnels=4, down=('c2', dep.connector[1]))
    with capsys.disabled():   # named in the output of every run, not only a failed one
        print(f'\ndashboard screenshots in {out}; c2 shown down {seen["down_ms"]} ms after its '
              'kill')
    assert seen['redirected_to'] == '/ui/login'
    cookie = [c for c in seen['cookies'] if c['name'] == 'cmg_session']
    assert cookie == [{'name': 'cmg_session', 'httpOnly': True, 'secure': True,
                       'sameSite': 'Strict', 'path': '/'}], seen['cookies']
    assert seen['script_sees_cookie'] is False   # HttpOnly
    instances = sorted(g['instance'] for g in status['gateways'])
    assert len(instances) == 2
    rows = sorted((t['gateway'], t['connector'], t['state']) for t in seen['tunnel_rows'])
    assert rows == [(g, c, 'up') for g in instances for c in ('c2', 'connector-1')], rows
    assert seen['traffic_points'] > 0 and seen['traffic_pixels'] > 50, seen
    assert seen['live_reloads'] == 0
    assert seen['csp_violations'] == [] and seen['page_errors'] == [], seen
    assert seen['after_sign_out'] == '/ui/login'
    names = ['sign-in', 'connections', 'traffic', 'egress', 'devices', 'certificates', 'alerts',
             'connector-down']
    assert [Path(p).name for p in seen['screenshots']] == [f'dashboard-{n}.png' for n in names]
    for p in seen['screenshots']:
        assert Path(p).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', p
    assert 'dashboard-device' in seen['devices_text'], seen['devices_text']
    assert 'site CA' in seen['certificates_text']

    # c2 killed: its tunnels shown down or stale without a reload (the status document calls a
    # connector stale after 2 report intervals; the page asks every interval)
    rows = {(t['gateway'], t['connector']): t for t in seen['down_rows']}
    assert all(rows[(g, 'c2')]['state'] != 'up' or rows[(g, 'c2')]['stale'] for g in instances)
    assert all(rows[(g, 'connector-1')]['state'] == 'up' for g in instances), rows
