"""`cmg client analyze`: each step (dns, tcp, tls, credential, clock, mapping, connector,
service) PASS, FAIL or SKIP; the failing step named for a wrong CA, a name mismatch, an
expired or revoked device certificate, a token for another audience, a clock 10 minutes
off, an unmapped path, no connector, the internal service down; all PASS (exit 0) on a
good setup. The gateway's reserved path /CCM_Analyze is answered by the gateway itself:
the internal service's request count proves it is never forwarded."""
import json
import subprocess

import pytest

import cmgtest
from cmgtest import CMG, SLOW, curl, make_cert, poll, run_cmg
from sitetest import Deployment, IdP
from test_client_auth import site_ca
from test_revocation import FAKETIME_LIB

STEPS = ['dns', 'tcp', 'tls', 'credential', 'clock', 'mapping', 'connector', 'service']


def gateway_args(site, ca=None, server_name=None):
    return ['--gateway', f'127.0.0.1:{site.port}', '--ca', ca or site.ca,
            '--server-name', server_name or site.name]


def analyze(*args, env=None):
    """Runs `cmg client analyze --json ARGS`: (exit status, {step: (result, detail, fix)})."""
    argv = [CMG, 'client', 'analyze', '--json', *map(str, args)]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60 * SLOW,
                       stdin=subprocess.DEVNULL, env=env)
    assert 'Sanitizer' not in r.stderr and 'runtime error' not in r.stderr, r.stderr
    steps = json.loads(r.stdout)
    assert [s['name'] for s in steps] == STEPS, r.stdout
    for s in steps:
        assert set(s) == {'name', 'result', 'detail', 'fix', 'ms'}, s
        assert s['result'] in ('PASS', 'FAIL', 'SKIP'), s
        assert (s['fix'] is not None) == (s['result'] == 'FAIL'), s
    return r.returncode, {s['name']: (s['result'], s['detail'], s['fix']) for s in steps}


def first_failure(steps):
    """The name of the first failing step; every step before it passed."""
    for name in STEPS:
        result = steps[name][0]
        if result == 'FAIL':
            return name
        assert result == 'PASS', (name, steps)
    return None


def cert_args(dep, cert):
    crt, key = cert
    return [*gateway_args(dep.site), '--cert', crt, '--key', key, '--path',
            dep.site.path('policy.xml')]


@pytest.fixture
def dep(procs, tmp_path, svc):
    return Deployment(procs, tmp_path, svc)


def test_good_setup_passes_every_step(dep, svc):
    site = dep.site
    before = svc.count
    rc, steps = analyze(*cert_args(dep, (site.device_cert, site.device_key)))
    assert rc == 0 and all(s[0] == 'PASS' for s in steps.values()), steps
    assert 'TLSv1.' in steps['tls'][1] and 'http/1.1' in steps['tls'][1], steps['tls']
    assert 'accepted' in steps['credential'][1], steps['credential']
    assert 'answered 200' in steps['service'][1], steps['service']
    # Only the service step's own request reached the internal service.
    assert svc.count == before + 1
    # The text form: one line per step, in order.
    r = run_cmg('client', 'analyze', *cert_args(dep, (site.device_cert, site.device_key)))
    assert r.returncode == 0, r
    lines = [line.split() for line in r.stdout.splitlines()]
    assert [(w[0], w[1]) for w in lines] == [('PASS', s) for s in STEPS], r.stdout


def test_registered_device_passes_with_its_state(dep, tmp_path, monkeypatch):
    """--state: the state's certificate, token, CA, server name and prefix; with --gateway
    an address, the registered server name still applies."""
    monkeypatch.setenv('HOME', str(tmp_path))
    _, bulk = dep.bulk_token()
    state = tmp_path / 'state'
    r = run_cmg('client', 'register', '--gateway', f'127.0.0.1:{dep.site.port}', '--server-name',
                dep.site.name, '--ca', dep.site.ca, '--bulk-token', bulk, '--state', state)
    assert r.returncode == 0, r
    rc, steps = analyze('--gateway', f'127.0.0.1:{dep.site.port}', '--state', state)
    assert rc == 0 and all(s[0] == 'PASS' for s in steps.values()), steps
    assert 'site-token' in steps['credential'][1], steps
    # A token of this device without its certificate: the binding fails.
    token = json.loads((state / 'device.json').read_text())['token']
    rc, steps = analyze(*gateway_args(dep.site), '--token', token, '--path',
                        dep.token_path('policy.xml'))
    assert rc == 1 and first_failure(steps) == 'credential', steps
    assert 'CMGService_Token_Certificate_Mismatch' in steps['credential'][1], steps


def test_reserved_path_is_answered_by_the_gateway(dep, svc):
    """Unauthenticated, with any path: the judgement, never forwarded, never a secret."""
    site = dep.site
    before = svc.count
    r = curl(site, '/CCM_Analyze?path=' + site.path('x'), '-H', 'Authorization: Bearer a.b.c',
             cert=False)
    assert r.status == 200, r
    doc = json.loads(r.body)
    assert doc['certificate'] == {'presented': False}
    assert doc['mapping']['found'] is True, doc
    assert 'connectors' not in doc, 'connectors told to a credential the mapping refuses'
    assert doc['credential']['result'] == 'fail', doc
    assert doc['credential']['reason'] == 'CMGService_Invalid_Client_Certificate', doc
    assert b'a.b.c' not in r.body
    r2 = curl(site, '/CCM_Analyze?path=' + site.path('x'), http='2', cert=False)
    assert r2.status == 200 and json.loads(r2.body)['mapping'] == doc['mapping'], r2
    assert curl(site, '/CCM_Analyze', '-X', 'POST', '-d', 'x', cert=False).status in (405, 413)
    assert curl(site, '/CCM_Analyze?path=%zz', cert=False).status == 400
    # only a printable request-target, at most 512 bytes, is judged (and echoed)
    for bad in ('/a%0Ab', '/a%20b', '/a%C3%A9', '/a%7Fb', '/' + 'a' * 512):
        assert curl(site, '/CCM_Analyze?path=' + bad, cert=False).status == 400, bad
    ok = json.loads(curl(site, '/CCM_Analyze?path=' + site.path('x'), cert=True).body)
    assert ok['credential']['result'] == 'pass' and ok['connectors'] == 1, ok
    assert svc.count == before, 'the analyser path was forwarded'


def test_wrong_ca_and_name_mismatch_fail_tls(dep, tmp_path):
    site = dep.site
    other, _, (other_crt, _) = make_cert(tmp_path / 'other-ca', 'Other CA', ca=True)
    device = ['--cert', site.device_cert, '--key', site.device_key, '--path', site.path('x')]
    rc, steps = analyze(*gateway_args(site, ca=other_crt), *device)
    assert rc == 1 and first_failure(steps) == 'tls', steps
    assert '--ca' in steps['tls'][2], steps['tls']
    assert all(steps[s][0] == 'SKIP' for s in STEPS[3:]), steps
    rc, steps = analyze(*gateway_args(site, server_name='wrong.example'), *device)
    assert rc == 1 and first_failure(steps) == 'tls', steps
    assert 'wrong.example' in steps['tls'][1] and '--server-name' in steps['tls'][2], steps


def test_expired_and_revoked_certificates_fail_the_credential(dep, tmp_path):
    ca_cert, ca_key = site_ca(dep.site)
    expired = make_cert(tmp_path / 'expired', 'device9', ca_cert, ca_key, valid_from=-30,
                        valid_days=29)[2]
    rc, steps = analyze(*cert_args(dep, expired))
    assert rc == 1 and first_failure(steps) == 'credential', steps
    assert 'CMGService_Invalid_Client_Certificate' in steps['credential'][1], steps
    assert 'expired' in steps['credential'][1], steps
    # Without --path: the certificate judged against the trusted roots alone, as well.
    rc, steps = analyze(*gateway_args(dep.site), '--cert', expired[0], '--key', expired[1])
    assert rc == 1 and first_failure(steps) == 'credential', steps
    assert 'CMGService_Invalid_Client_Certificate' in steps['credential'][1], steps
    assert all(steps[s][0] == 'SKIP' for s in ('mapping', 'connector', 'service')), steps

    out = json.loads(dep.cmg_site('cert', 'issue', '--device', 'lab-1', '--json').stdout)
    lab = (out['cert'], out['key'])
    v = dep.policy_version()
    dep.cmg_site('cert', 'check-revocation', 'on')
    dep.wait_policy(after=v)
    assert analyze(*cert_args(dep, lab))[0] == 0
    v = dep.policy_version()
    dep.cmg_site('cert', 'revoke', '--device', 'lab-1')
    dep.wait_policy(after=v)
    rc, steps = analyze(*cert_args(dep, lab))
    assert rc == 1 and first_failure(steps) == 'credential', steps
    assert 'CMGService_Client_Certificate_Revoked' in steps['credential'][1], steps
    assert 'revoked' in steps['credential'][2], steps
    rc, steps = analyze(*gateway_args(dep.site), '--cert', lab[0], '--key', lab[1])
    assert rc == 1 and 'CMGService_Client_Certificate_Revoked' in steps['credential'][1], steps


def test_token_for_another_audience_fails_the_credential(dep, tmp_path):
    idp = IdP(tmp_path)
    v = dep.policy_version()
    dep.cmg_site('oidc', 'set', '--issuer', idp.ISSUER, '--tenant', idp.TENANT,
                 '--audience', idp.AUDIENCE, '--jwks', idp.jwks)
    dep.wait_policy(after=v)
    args = [*gateway_args(dep.site), '--path', dep.token_path('policy.xml')]
    rc, steps = analyze(*args, '--token', idp.token())
    assert rc == 0 and 'oidc' in steps['credential'][1], steps
    rc, steps = analyze(*args, '--token', idp.token(aud='api://someone-else'))
    assert rc == 1 and first_failure(steps) == 'credential', steps
    assert 'CMGService_Wrong_Audience' in steps['credential'][1], steps
    assert 'audience' in steps['credential'][1], steps
    assert steps['service'][0] == 'SKIP', steps
    # Without --path: the token judged as any mapping taking tokens would.
    rc, steps = analyze(*gateway_args(dep.site), '--token', idp.token(aud='api://someone-else'))
    assert rc == 1 and first_failure(steps) == 'credential', steps
    assert 'CMGService_Wrong_Audience' in steps['credential'][1], steps
    rc, steps = analyze(*gateway_args(dep.site), '--token', idp.token())
    assert rc == 0 and 'oidc' in steps['credential'][1], steps


@pytest.mark.parametrize('offset, word', [('+10m', 'ahead'), ('-10m', 'behind')])
def test_clock_ten_minutes_off_fails_the_clock(dep, offset, word):
    """Ten minutes behind, the gateway's certificate (made 5 minutes ago) is not yet valid
    by this machine's clock: it is judged by the gateway's, and the clock is what fails."""
    assert FAKETIME_LIB, 'libfaketime is missing (Debian package faketime)'
    env = {'LD_PRELOAD': FAKETIME_LIB, 'FAKETIME': offset, 'FAKETIME_DONT_FAKE_MONOTONIC': '1',
           'FAKETIME_NO_CACHE': '1',
           'ASAN_OPTIONS': 'detect_leaks=1:abort_on_error=0:verify_asan_link_order=0'}
    site = dep.site
    rc, steps = analyze(*cert_args(dep, (site.device_cert, site.device_key)), env=env)
    assert rc == 1 and first_failure(steps) == 'clock', steps
    assert word in steps['clock'][1] and 'NTP' in steps['clock'][2], steps
    assert steps['credential'][0] == 'PASS', steps


def test_unmapped_path_fails_the_mapping(dep):
    site = dep.site
    rc, steps = analyze(*gateway_args(site), '--cert', site.device_cert, '--key',
                        site.device_key, '--path', '/CCM_Proxy_MutualAuth/999999999/x')
    assert rc == 1 and first_failure(steps) == 'mapping', steps
    assert 'CMGService_No_Mapping' in steps['mapping'][1], steps
    assert steps['connector'][0] == steps['service'][0] == 'SKIP', steps


def test_no_connector_fails_the_connector(dep):
    site = dep.site
    dep.connector.signal(15)
    poll(lambda: curl(site, site.path('policy.xml')).status == 503, 10 * SLOW,
         'the connector to be gone')
    rc, steps = analyze(*cert_args(dep, (site.device_cert, site.device_key)))
    assert rc == 1 and first_failure(steps) == 'connector', steps
    assert site.role_ids[0] in steps['connector'][1], steps


def test_internal_service_down_fails_the_service(dep, svc):
    site = dep.site
    svc.proc.signal(9)
    rc, steps = analyze(*cert_args(dep, (site.device_cert, site.device_key)))
    assert rc == 1 and first_failure(steps) == 'service', steps
    assert '502' in steps['service'][1] and 'internal service' in steps['service'][2], steps


# ---------------------------------------------------------------- cmg connector analyze

def connector_analyze(dep):
    """`cmg connector analyze --json -c connector.conf`: (exit status, {name: (result, detail, fix)})."""
    r = run_cmg('connector', 'analyze', '-c', dep.site.connector_conf, '--json', '--timeout', 5)
    assert 'Sanitizer' not in r.stderr and 'runtime error' not in r.stderr, r.stderr
    steps = json.loads(r.stdout)
    for s in steps:
        assert set(s) == {'name', 'result', 'detail', 'fix', 'ms'}, s
        assert (s['fix'] is not None) == (s['result'] == 'FAIL'), s
    return r.returncode, {s['name']: (s['result'], s['detail'], s['fix']) for s in steps}


def test_connector_analyze_passes_on_a_good_setup(dep):
    gw = f'gateway 127.0.0.1:{dep.site.tunnel_port}'
    route = f'route {dep.site.role_ids[0]}'
    rc, steps = connector_analyze(dep)
    assert rc == 0, steps
    assert list(steps) == [f'{gw} dns', f'{gw} tcp', f'{gw} tls', f'{gw} tunnel', 'site dns',
                           'site tcp', 'site tls', 'site feed', f'{route} dns', f'{route} tcp',
                           f'{route} tls', f'{route} http'], steps
    assert all(r == 'PASS' for name, (r, _, _) in steps.items() if name != f'{route} tls'), steps
    assert steps[f'{route} tls'][0] == 'SKIP'     # the service is plain http
    assert 'cmg-tunnel/1' in steps[f'{gw} tls'][1], steps


def test_connector_analyze_names_a_gateway_down_and_a_service_down(dep, svc):
    gw = f'gateway 127.0.0.1:{dep.site.tunnel_port}'
    route = f'route {dep.site.role_ids[0]}'
    svc.proc.signal(9)
    rc, steps = connector_analyze(dep)
    assert rc == 1, steps
    assert [n for n, (r, _, _) in steps.items() if r == 'FAIL'] == [f'{route} tcp'], steps
    assert 'internal service' in steps[f'{route} tcp'][2], steps
    dep.gateway[0].signal(15)
    rc, steps = connector_analyze(dep)
    assert [n for n, (r, _, _) in steps.items() if r == 'FAIL'] == [f'{gw} tcp', f'{route} tcp'], steps
    assert 'gateway runs' in steps[f'{gw} tcp'][2], steps
