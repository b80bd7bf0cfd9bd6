"""Signing-key rotation (issue 12, item 5). `cmg site key rotate` makes a new key, announced
by the current one inside every policy and routes document; gateways and connectors follow
the announcements from the key they pin (site_key), so a gateway restarted with the old
site_key and no cache still takes the new policy. A policy signed by a key nobody announced
is refused; device tokens signed by the retired key keep working until they expire; `site
serve` rotates by itself a key older than key_rotation."""
import base64
import hashlib
import json
import shutil
import signal
import sqlite3
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cmgtest import SLOW, bring_up, curl, free_port, ini_set, poll, request, run_cmg, start_connector, start_gateway
from sitetest import Deployment, Device, jwt_claims, public_jwk, sign_jwt, unb64u
from test_site_channel import FakeSite
from underload import MiB, Load


def kid_of_pem(pem):
    """The RFC 7638 thumbprint of a P-256 public key (PEM): the kid the site gives it."""
    n = serialization.load_pem_public_key(pem).public_numbers()
    b64 = lambda i: base64.urlsafe_b64encode(i.to_bytes(32, 'big')).rstrip(b'=').decode()  # noqa: E731
    canon = json.dumps({'crv': 'P-256', 'kty': 'EC', 'x': b64(n.x), 'y': b64(n.y)},
                       separators=(',', ':'), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canon.encode()).digest()).rstrip(b'=').decode()


def header(jws):
    return json.loads(unb64u(jws.split('.')[0]))


def pinned_deployment(procs, tmp_path, svc):
    """A running deployment whose gateway and connector pin their own copy of the site's
    public key, as on hosts of their own: a rotation does not touch what they pin."""
    dep = Deployment(procs, tmp_path, svc, start=False)
    for conf, copy in ((dep.site.gateway_conf, 'gateway-pinned.pub'),
                       (dep.site.connector_conf, 'connector-pinned.pub')):
        shutil.copy(dep.site.dir / 'site-signing.pub', dep.site.dir / copy)
        ini_set(conf, conf.stem, 'site_key', copy)
    dep.start_site()
    dep.gateway, dep.connector = bring_up(procs, dep.site)
    dep.wait_policy()
    return dep


def in_force(proc, version, kid):
    return any(f'policy version {version} ' in line and kid in line
               for line in proc.log_text().splitlines())


def test_rotation_under_load_then_a_restart_follows_the_chain(procs, tmp_path, svc):
    dep = pinned_deployment(procs, tmp_path, svc)
    old_kid = kid_of_pem((dep.site.dir / 'site-signing.pub').read_bytes())
    _, bulk = dep.bulk_token()
    dev = Device(tmp_path, 'before-rotation')
    dep.register(dev, bulk)
    assert header(dev.token)['kid'] == old_kid
    v0 = dep.policy_version()

    with Load(dep.site, download_size=16 * MiB, rate='3M') as load:
        time.sleep(0.5)
        r = dep.cmg_site('key', 'rotate', '--json')
        new_kid = json.loads(r.stdout)['kid']
        assert json.loads(r.stdout)['previous'] == old_kid and new_kid != old_kid
        v = dep.wait_policy(after=v0)
        poll(lambda: in_force(dep.gateway[0], v, new_kid), 5 * SLOW,
             'the gateway to run the policy signed by the new key', check=procs.check)
        poll(lambda: in_force(dep.connector, v, new_kid), 5 * SLOW,
             'the connector to run it too', check=procs.check)
        assert all(dl.alive() for dl, _ in load.downloads), 'the downloads should span the rotation'
        time.sleep(1)
    load.assert_clean()
    print(f'{load.summary()}; peak RSS gateway {dep.gateway[0].peak_rss_kib()} KiB, connector '
          f'{dep.connector.peak_rss_kib()} KiB')
    for proc in (dep.gateway[0], dep.connector):
        log = proc.log_text()
        assert f'site key id {new_kid} learned: announced by site key id {old_kid}' in log, log
        refusals = [ln for ln in log.splitlines() if 'polic' in ln and 'refused:' in ln]
        assert not refusals, refusals
    # The site now signs with the new key; what the gateway and connector pin is unchanged.
    assert kid_of_pem((dep.site.dir / 'site-signing.pub').read_bytes()) == new_kid
    assert kid_of_pem((dep.site.dir / 'gateway-pinned.pub').read_bytes()) == old_kid
    policy = curl_policy(dep)
    assert header(policy)['kid'] == new_kid and len(header(policy)['cmg_key_chain']) == 1
    assert {k['kid'] for k in jwt_claims(policy)['site_keys']['keys']} == {old_kid, new_kid}

    # A device token signed by the old key still works, and renews into one of the new key.
    assert dep.get(dev).status == 200
    r = curl(dep.site, dep.reg_path('renew'), '-X', 'POST', '-H', f'Authorization: Bearer {dev.token}',
             '--data', '{}', cert=dev.cert)
    assert r.status == 200, r
    renewed = json.loads(r.body)['token']
    assert header(renewed)['kid'] == new_kid
    assert dep.get(dev, token=renewed).status == 200
    assert dep.get(dev, token=dev.token[:-4] + 'AAAA').status == 401

    # cert list: both keys, the old one retired.
    rows = [row for row in json.loads(dep.cmg_site('cert', 'list', '--json').stdout)
            if row['kind'] == 'signing key']
    assert [(row['kid'], row['retired'] is None) for row in rows] == [(old_kid, False), (new_kid, True)]
    assert rows[1]['name'] == 'site-signing.pub' and rows[0]['name'].startswith('retired ')

    # The gateway restarted with its unchanged gateway.conf (the old key) and no cache:
    # the policy the connector carries leads it to the new key.
    dep.gateway[0].signal(signal.SIGTERM)
    for name in ('policy-cache.jws', 'policy-cache.jws.keys'):
        (dep.site.dir / name).unlink()
    gw = start_gateway(procs, dep.site)
    poll(lambda: in_force(gw, v, new_kid), 10 * SLOW, 'the restarted gateway to follow the chain',
         check=procs.check)
    assert f'site key id {new_kid} learned: announced by site key id {old_kid}' in gw.log_text()
    assert (dep.site.dir / 'policy-cache.jws.keys').exists()
    assert request(dep.site, 'GET', dep.site.path('whoami')).status == 200

    # Restarted again, with the site and connector down: what it learned was kept.
    dep.connector.signal(signal.SIGTERM)
    gw.signal(signal.SIGTERM)
    gw = start_gateway(procs, dep.site)
    log = gw.log_text()
    assert f'site key id {new_kid} trusted (kept in' in log, log
    assert f'policy version {v} in force (from cache)' in log, log
    dep.connector = start_connector(procs, dep.site.connector_conf)
    poll(lambda: request(dep.site, 'GET', dep.site.path('whoami')).status == 200, 10 * SLOW,
         'the connector back', check=procs.check)
    refuse_unannounced(dep, procs, gw, v, old_kid, new_kid)


def curl_policy(dep):
    import ssl
    import urllib.request
    req = urllib.request.Request(f'https://127.0.0.1:{dep.admin_port}/v1/policy')
    req.add_header('Authorization', f'Bearer {dep.admin_token}')
    ctx = ssl.create_default_context(cafile=str(dep.site.ca))
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        return r.read().decode()


def refuse_unannounced(dep, procs, gw, version, old_kid, new_kid):
    """A connector that trusts a rogue key (its own site_key) carries a policy signed by it,
    at a far higher version: the gateway refuses it, names the kid found and the kids it
    trusts, and keeps its policy."""
    rogue = ec.generate_private_key(ec.SECP256R1())
    pem = rogue.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    (dep.site.dir / 'rogue.pub').write_bytes(pem)
    rogue_kid = kid_of_pem(pem)
    forged = version + 1000
    now = int(time.time())
    payload = {'version': forged, 'iat': now, 'iss': f'opencmg-site:{dep.site_role}',
               'service_name': dep.site.name, 'site_role': dep.site_role, 'mappings': [],
               'ctl': [], 'site_keys': {'keys': [public_jwk(rogue, rogue_kid)]}}
    routes = {'version': forged, 'iat': now, 'routes': {}}
    feed = {'version': forged,
            'policy': sign_jwt(rogue, payload, kid=rogue_kid, header_extra={'typ': 'cmg-policy+jwt'}),
            'routes': sign_jwt(rogue, routes, kid=rogue_kid, header_extra={'typ': 'cmg-routes+jwt'})}
    port = free_port()
    fake = FakeSite(port, dep.site.dir / 'site.crt', dep.site.dir / 'site.key', feed)
    try:
        conf = dep.site.connector_copy('connector-rogue', [dep.svc.url])
        ini_set(conf, 'connector', 'site', f'https://127.0.0.1:{port}')
        ini_set(conf, 'connector', 'site_key', 'rogue.pub')
        rogue_cn = start_connector(procs, conf, 'connector-rogue')
        poll(lambda: f'policy version {forged} and its routes' in rogue_cn.log_text(), 10 * SLOW,
             'the rogue connector to take the rogue policy', check=procs.check)
        line = poll(lambda: next((ln for ln in gw.log_text().splitlines()
                                  if 'policy from connector-rogue refused' in ln), None),
                    10 * SLOW, 'the gateway to refuse the rogue policy', check=procs.check)
    finally:
        fake.stop()
    assert f'site key id {rogue_kid}, which no trusted key announced' in line, line
    assert f'trusted key ids: {old_kid}, {new_kid}' in line, line
    assert f'version {version} stays in force' in line, line
    assert f'policy version {forged} in force' not in gw.log_text()
    assert request(dep.site, 'GET', dep.site.path('whoami')).status == 200
    rogue_cn.signal(signal.SIGTERM)


def test_serve_rotates_a_key_older_than_key_rotation(procs, tmp_path, svc):
    dep = Deployment(procs, tmp_path, svc, start=False)
    site_dir = dep.site.dir
    run_cmg('site', 'cert', 'list', '--site', site_dir)       # records the first key
    old_kid = kid_of_pem((site_dir / 'site-signing.pub').read_bytes())
    ini_set(site_dir / 'site.conf', 'site', 'key_rotation', '30d')
    with sqlite3.connect(site_dir / 'site.db') as db:        # made 31 days ago
        db.execute('UPDATE signing_keys SET created = created - 31 * 86400')
    site = dep.start_site()
    log = poll(lambda: (lambda t: t if 'signing key rotated' in t else None)(site.log_text()),
               5 * SLOW, 'serve to rotate the old key', check=procs.check)
    assert f'signing key id {old_kid} is 31 day(s) old, key_rotation is 30 day(s): rotating' in log
    new_kid = kid_of_pem((site_dir / 'site-signing.pub').read_bytes())
    assert f'signing key rotated: key id {new_kid}, announced by key id {old_kid}' in log
    assert header(curl_policy(dep))['kid'] == new_kid
    # Restarted: the new key is young, nothing more happens; with key_rotation = 0 never.
    site.signal(signal.SIGTERM)
    with sqlite3.connect(site_dir / 'site.db') as db:
        db.execute('UPDATE signing_keys SET created = created - 400 * 86400')
    ini_set(site_dir / 'site.conf', 'site', 'key_rotation', '0')
    site = dep.start_site()
    assert header(curl_policy(dep))['kid'] == new_kid
    assert 'rotat' not in site.log_text()
    # Through the admin API of the running site: signed into the next policy at once.
    r = run_cmg('site', 'key', 'rotate', '--site', site_dir, '--json',
                '--api', f'https://127.0.0.1:{dep.admin_port}')
    assert r.returncode == 0, r.stderr
    third_kid = json.loads(r.stdout)['kid']
    poll(lambda: header(curl_policy(dep))['kid'] == third_kid, 5 * SLOW,
         'the policy signed by the key rotated through the API', check=procs.check)
    assert len(header(curl_policy(dep))['cmg_key_chain']) == 2
    r = run_cmg('site', 'cert', 'list', '--site', site_dir, '--json')
    kids = [row['kid'] for row in json.loads(r.stdout) if row['kind'] == 'signing key']
    assert kids == [old_kid, new_kid, third_kid]
