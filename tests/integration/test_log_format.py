"""log_format = json on every role: each line of the gateway's, the connector's and the
site's log is one JSON object with ts (RFC 3339 UTC, milliseconds), level, role and msg; a
forwarded request gives one access-log line with its fields; each refusal gives one line
with its reason token and what failed: the certificate's subject, issuer, serial and
verification error, or the token's claim; a hostile target (control characters, invalid
UTF-8) still gives valid JSON; the refusal lines stay rate-limited; SIGHUP switches the
format."""
import json
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import cmgtest
from cmgtest import SLOW, curl, ini_set, make_cert, poll
from sitetest import Deployment, Device, IdP, jwt_claims, sign_jwt, unb64u

TS = re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$')
ROLES = ('gateway', 'connector', 'site')


def set_format(dep, fmt):
    ini_set(dep.site.gateway_conf, 'gateway', 'log_format', fmt)
    ini_set(dep.site.connector_conf, 'connector', 'log_format', fmt)
    ini_set(dep.site.dir / 'site.conf', 'site', 'log_format', fmt)


def start(dep):
    dep.start_site()
    dep.gateway, dep.connector = cmgtest.bring_up(dep.procs, dep.site)
    dep.wait_policy()
    return dep


def deployment(procs, tmp_path, svc, fmt):
    dep = Deployment(procs, tmp_path, svc, start=False)
    set_format(dep, fmt)
    return start(dep)


def procs_of(dep):
    return {'gateway': dep.gateway[0], 'connector': dep.connector, 'site': dep.site_proc}


def json_lines(proc, role, start=0):
    """Every line the process logged (from byte `start`), each parsed: strict UTF-8, one
    JSON object with the common fields."""
    raw = Path(proc.log).read_bytes()[start:]
    objs = []
    for line in raw.decode('utf-8').splitlines():
        o = json.loads(line)
        assert isinstance(o, dict), line
        assert TS.match(o['ts']) and o['level'] in ('debug', 'info', 'warn', 'error'), line
        assert o['role'] == role and o['pid'] == proc.pid and isinstance(o['msg'], str), line
        objs.append(o)
    return objs


def with_marker(lines, marker, msg='refused'):
    return [o for o in lines if o['msg'] == msg and marker in o.get('path', '')]


def one_refusal(gw, marker, timeout=5):
    """The one refusal line whose path holds marker (the line is written at once)."""
    found = poll(lambda: with_marker(json_lines(gw, 'gateway'), marker), timeout * SLOW,
                 f'the refusal line of {marker}')
    time.sleep(0.2)
    found = with_marker(json_lines(gw, 'gateway'), marker)
    assert len(found) == 1, found
    return found[0]


def site_key(dep):
    return serialization.load_pem_private_key((dep.site.dir / 'site-signing.key').read_bytes(), None)


def forged(dep, device, **over):
    """The device's token with claims changed, signed by the site's own key."""
    claims = dict(jwt_claims(device.token), **over)
    kid = json.loads(unb64u(device.token.split('.')[0]))['kid']
    return sign_jwt(site_key(dep), claims, kid=kid)


@pytest.fixture
def dep(procs, tmp_path, svc):
    return deployment(procs, tmp_path, svc, 'json')


def test_forwarded_and_refused_requests_in_json(dep, tmp_path, svc):
    gw = dep.gateway[0]
    ca_cert = x509.load_pem_x509_certificate(dep.site.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((dep.site.dir / 'ca.key').read_bytes(), None)
    idp = IdP(tmp_path)
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', idp.jwks)
    issued = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-1', '--json').stdout)
    lab = (issued['cert'], issued['key'])
    lab_cert = x509.load_pem_x509_certificate(Path(issued['cert']).read_bytes())
    v = dep.policy_version()
    dep.cmg_site('cert', 'revoke', '--device', 'lab-1')
    dep.wait_policy(after=v)
    device = Device(tmp_path, 'dev-json')
    _, bulk = dep.bulk_token()
    assert dep.register(device, bulk).status == 200

    # forwarded: one access-log line with its fields
    before = svc.count
    r = curl(dep.site, dep.site.path('policy.xml?case=forwarded'))
    assert r.status == 200, r
    assert dep.get(device, dep.token_path('policy.xml?case=token-ok')).status == 200
    assert svc.count == before + 2
    line = poll(lambda: with_marker(json_lines(gw, 'gateway'), 'case=forwarded', 'request'),
                5 * SLOW, 'the access-log line')
    assert len(line) == 1, line
    a = line[0]
    assert a['level'] == 'info' and a['method'] == 'GET' and a['status'] == 200, a
    assert a['peer'].startswith('127.0.0.1:') and a['connector'] == 'connector-1', a
    assert a['role_id'] == dep.site.role_ids[0] and a['auth'] == 'cert', a
    assert a['bytes_out'] == len(r.body) and a['bytes_in'] == 0 and a['duration_ms'] >= 0, a
    a = with_marker(json_lines(gw, 'gateway'), 'case=token-ok', 'request')[0]
    assert a['auth'] == 'site-token' and a['device_id'] == device.device_id, a

    # refused: one line each, with the reason token and what failed
    expired = make_cert(tmp_path / 'expired', 'dev-expired', ca_cert, ca_key, valid_from=-30,
                        valid_days=29)
    expired_cert = x509.load_pem_x509_certificate(Path(expired[2][0]).read_bytes())
    now = int(time.time())
    cases = {
        'no-cert': (lambda p: curl(dep.site, dep.site.path(p), cert=False),
                    401, 'CMGService_Invalid_Client_Certificate'),
        'revoked': (lambda p: curl(dep.site, dep.site.path(p), cert=lab),
                    403, 'CMGService_Client_Certificate_Revoked'),
        'expired-cert': (lambda p: curl(dep.site, dep.site.path(p), cert=expired[2]),
                         401, 'CMGService_Invalid_Client_Certificate'),
        'site-aud': (lambda p: dep.get(device, dep.token_path(p),
                                       token=forged(dep, device, aud='other.example')),
                     401, 'CMGService_Invalid_Token'),
        'site-exp': (lambda p: dep.get(device, dep.token_path(p),
                                       token=forged(dep, device, iat=now - 7200, exp=now - 3600)),
                     401, 'CMGService_Token_Expired'),
        'oidc-aud': (lambda p: curl(dep.site, dep.token_path(p), '-H',
                                    f'Authorization: Bearer {idp.token(aud="api://another")}',
                                    cert=False),
                     401, 'CMGService_Wrong_Audience'),
        'oidc-exp': (lambda p: curl(dep.site, dep.token_path(p), '-H',
                                    f'Authorization: Bearer {idp.token(iat=now - 7200, nbf=now - 7200, exp=now - 3600)}',
                                    cert=False),
                     401, 'CMGService_Token_Expired'),
        # the same over HTTP/2
        'h2-revoked': (lambda p: curl(dep.site, dep.site.path(p), cert=lab, http='2'),
                       403, 'CMGService_Client_Certificate_Revoked'),
        'h2-oidc-aud': (lambda p: curl(dep.site, dep.token_path(p), '-H',
                                       f'Authorization: Bearer {idp.token(aud="api://another")}',
                                       cert=False, http='2'),
                        401, 'CMGService_Wrong_Audience'),
    }
    # an OIDC token is accepted once the gateway has the provider's keys
    poll(lambda: curl(dep.site, dep.token_path('policy.xml?case=oidc-ok'), '-H',
                      f'Authorization: Bearer {idp.token()}', cert=False).status == 200,
         5 * SLOW, 'OIDC tokens to be accepted')
    before = svc.count
    lines = {}
    for case, (send, status, reason) in cases.items():
        r = send(f'policy.xml?case={case}')
        assert r.status == status and reason.encode() in r.body, (case, r)
        lines[case] = one_refusal(gw, f'case={case}')
        o = lines[case]
        assert (o['status'], o['reason'], o['level']) == (status, reason, 'info'), (case, o)
    assert svc.count == before, 'a refused request was forwarded'

    assert lines['no-cert']['cert'] == 'none' and 'subject' not in lines['no-cert']
    for case, cert, error in (('revoked', lab_cert, 'certificate revoked'),
                              ('h2-revoked', lab_cert, 'certificate revoked'),
                              ('expired-cert', expired_cert, 'certificate has expired')):
        o = lines[case]
        assert o['subject'] == cert.subject.rfc4514_string(), o
        assert 'CN=' in o['issuer'] and o['issuer'] == cert.issuer.rfc4514_string(), o
        assert o['serial'] == format(cert.serial_number, 'X'), o
        assert o['verify_error'] == error, o
        assert 'claim' not in o
    assert lines['site-aud']['claim'] == 'aud' and lines['oidc-aud']['claim'] == 'aud'
    assert lines['h2-oidc-aud']['claim'] == 'aud'
    assert lines['site-exp']['claim'] == 'exp' and lines['oidc-exp']['claim'] == 'exp'
    for case in ('site-aud', 'site-exp', 'oidc-aud', 'oidc-exp'):
        assert 'verify_error' not in lines[case] and 'subject' not in lines[case], lines[case]

    # every line of every role is JSON with the common fields (json_lines checks them)
    for role, proc in procs_of(dep).items():
        assert json_lines(proc, role), role
    site_lines = json_lines(dep.site_proc, 'site')
    assert any(o['msg'] == 'device registered id=' + device.device_id + ' name=dev-json'
               or o['msg'].startswith('device registered') for o in site_lines)


def hostile_request(site, target):
    with cmgtest.tls_connect(site) as s:
        s.sendall(b'GET ' + target + b' HTTP/1.1\r\nHost: ' + site.name.encode() + b'\r\n\r\n')
        status, _, _ = cmgtest.read_response(s)
    return status


def test_hostile_targets_give_valid_json(dep, svc, tmp_path):
    gw = dep.gateway[0]
    before = svc.count
    prefix = dep.site.path('').encode()
    targets = [
        prefix + b'hostile-1/\xff\xfe\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80"\\%22',   # invalid UTF-8
        prefix + b'hostile-2/\x01\x1b[31m\x7f',                                        # controls
        b'/hostile-3/\xe2\x82"},"level":"error',                                      # injection
        prefix + b'hostile-4/' + b'\xff' * 3000,                                      # long
    ]
    statuses = [hostile_request(dep.site, t) for t in targets]
    assert all(s is not None and 400 <= s < 500 for s in statuses), statuses
    # a certificate whose subject holds control characters and quotes
    evil = make_cert(tmp_path / 'evil', 'evil\x01\n"},"level":"error \u202e', valid_days=1)[2]
    r = curl(dep.site, dep.site.path('policy.xml?case=evil-cert'), cert=evil)
    assert r.status == 401, r
    assert svc.count == before

    def refusals():
        lines = [o for o in json_lines(gw, 'gateway') if o['msg'] == 'refused']
        return lines if len(lines) >= len(targets) else None
    lines = poll(refusals, 5 * SLOW, 'a refusal line for each hostile target')
    paths = [o.get('path', '') for o in lines]
    assert any('hostile-1/\ufffd\ufffd\ufffd\ufffd' in p and '"\\%22' in p for p in paths), paths
    assert any(p.startswith('/hostile-3/\ufffd\ufffd"},"level":"error') for p in paths), paths
    assert all(o['level'] == 'info' and o['status'] >= 400 and o['reason'].startswith('CMGService_')
               for o in lines), lines
    # control characters in the target: refused by the parser, its message in "error"
    assert any(o['reason'] == 'CMGService_Bad_Request' and o['error'] for o in lines), lines
    o = one_refusal(gw, 'case=evil-cert')
    assert o['subject'].startswith('CN=evil') and o['subject'].endswith('error \u202e'), o
    assert '\n' not in o['subject'] and o['verify_error'], o
    assert all(len(line) <= 4096 for line in Path(gw.log).read_bytes().splitlines())


def test_refusal_lines_stay_rate_limited_in_json(dep, svc):
    gw = dep.gateway[0]
    before = svc.count
    cmgtest.pipelined_404s(dep.site)

    def counted():
        lines = json_lines(gw, 'gateway')
        refused = len(with_marker(lines, '/not-published'))
        held = sum(int(o['msg'].split(' more refused requests')[0])
                   for o in lines if 'more refused requests not logged' in o['msg'])
        return (refused, held) if held and refused + held == 300 else None
    refused, held = poll(counted, 5 * SLOW, 'lines and counts for all 300 refusals')
    assert 0 < refused <= 200, refused
    assert svc.count == before


def after_line(proc, start, line):
    """The offset just past `line` in the process's log, once it is there."""
    def find():
        i = Path(proc.log).read_bytes().find(line, start)
        return i + len(line) if i >= 0 else None
    return poll(find, 5 * SLOW, f'{line!r} in the log of {proc.name}')


def test_sighup_switches_the_format(procs, tmp_path, svc):
    dep = deployment(procs, tmp_path, svc, 'text')
    gw = dep.gateway[0]
    assert curl(dep.site, dep.site.path('policy.xml?case=as-text')).status == 200
    r = curl(dep.site, dep.site.path('policy.xml?case=refused-as-text'), cert=False)
    assert r.status == 401
    text = poll(lambda: [ln for ln in gw.log_text().splitlines() if 'case=refused-as-text' in ln],
                5 * SLOW, 'the text refusal line')
    assert re.search(r' info: refused peer=127\.0\.0\.1:\d+ method=GET path=\S+ status=401 '
                     r'reason=CMGService_Invalid_Client_Certificate cert=none$', text[0]), text
    assert re.search(r' info: request peer=\S+ method=GET path=\S+case=as-text status=200 ',
                     gw.log_text()), gw.log_text()

    set_format(dep, 'json')
    marks = {role: Path(p.log).stat().st_size for role, p in procs_of(dep).items()}
    for proc in procs_of(dep).values():
        proc.popen.send_signal(signal.SIGHUP)
    for role, proc in procs_of(dep).items():
        # the signal's own line comes in the format in force; what follows, in the new one
        marks[role] = after_line(proc, marks[role], b'info: SIGHUP received: reloading\n')
        poll(lambda: any(o['msg'].startswith('reloaded') for o in json_lines(proc, role, marks[role])),
             5 * SLOW, f'the {role} to log its reload in JSON')
    assert curl(dep.site, dep.site.path('policy.xml?case=as-json')).status == 200
    o = poll(lambda: with_marker(json_lines(gw, 'gateway', marks['gateway']), 'case=as-json',
                                 'request'), 5 * SLOW, 'the access-log line in JSON')[0]
    assert o['status'] == 200 and o['connector'] == 'connector-1', o
    # what came before the reload stays as it was: text
    with pytest.raises(json.JSONDecodeError):
        json.loads(Path(gw.log).read_bytes()[:marks['gateway']].decode().splitlines()[0])

    set_format(dep, 'text')
    marks = {role: Path(p.log).stat().st_size for role, p in procs_of(dep).items()}
    gw.popen.send_signal(signal.SIGHUP)
    poll(lambda: ' info: reloaded ' in Path(gw.log).read_bytes()[marks['gateway']:].decode(),
         5 * SLOW, 'the gateway back in text')


def test_a_bad_log_format_is_refused(procs, tmp_path, svc):
    dep = Deployment(procs, tmp_path, svc, start=False)
    for role, conf in (('gateway', dep.site.gateway_conf), ('connector', dep.site.connector_conf)):
        ini_set(conf, role, 'log_format', 'yaml')
        r = cmgtest.run_cmg(role, '-c', conf, timeout=10)
        assert r.returncode == 1 and "log_format: bad value 'yaml'" in r.stderr, (role, r.stderr)
