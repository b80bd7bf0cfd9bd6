"""Large bodies stream through every hop intact, and neither the gateway nor the connector
holds them in memory: peak RSS stays under 64 MiB (reported only in sanitized builds, where
the sanitizers' own memory dominates). A device that stops reading stalls only itself."""
import hashlib
import json
import time

from cmgtest import SANITIZED, DeviceConnection, curl_stream, poll, request
from internal_service import POLICY, stream, stream_sha256

GiB, MiB = 1 << 30, 1 << 20
RSS_LIMIT_KIB = 64 * 1024


def check_peak_rss(*procs):
    peaks = {p.name: p.peak_rss_kib() for p in procs}
    print('peak RSS (VmHWM):', ', '.join(f'{name} {kib / 1024:.1f} MiB' for name, kib in peaks.items()))
    if not SANITIZED:
        for name, kib in peaks.items():
            assert kib < RSS_LIMIT_KIB, f'{name} peaked at {kib / 1024:.1f} MiB of RSS'


def test_1gib_download(site, gateway, connector):
    started = time.monotonic()
    r, sha, n = curl_stream(site, site.path(f'download?size={GiB}&seed=11'), timeout=300)
    print(f'1 GiB in {time.monotonic() - started:.1f} s')
    assert (r.rc, r.status) == (0, 200), r
    assert n == GiB
    assert sha == stream_sha256(GiB, 11)
    check_peak_rss(gateway, connector)


def test_256mib_download_over_http2(site, gateway, connector):
    size = 256 * MiB + 1
    r, sha, n = curl_stream(site, site.path(f'download?size={size}&seed=13'), http='2', timeout=300)
    assert (r.rc, r.status, r.version) == (0, 200, '2'), r
    assert (n, sha) == (size, stream_sha256(size, 13))
    check_peak_rss(gateway, connector)


def test_256mib_chunked_upload(site, gateway, connector):
    size = 256 * MiB
    started = time.monotonic()
    r, _, _ = curl_stream(site, site.path('upload'), '-T', '-', '-H', 'Content-Type: application/octet-stream',
                          upload=stream(size, 12), timeout=300)
    print(f'256 MiB up in {time.monotonic() - started:.1f} s')
    assert (r.rc, r.status) == (0, 200), r
    assert json.loads(r.body) == {'bytes': size, 'sha256': stream_sha256(size, 12)}
    check_peak_rss(gateway, connector)


def test_device_that_stops_reading_stalls_only_itself(site, gateway, connector, svc):
    stalled = DeviceConnection(site)
    stalled.request('GET', site.path(f'download?size={GiB}&seed=14'))
    r = stalled.getresponse()
    assert r.status == 200
    r.read(65536)                       # ... and then no more

    # wait until back-pressure has reached the internal service: it stops being able to write
    last = [-1]

    def service_blocked():
        sent, last[0] = last[0], svc.stats()['download_bytes']
        return sent == last[0] > 0
    poll(service_blocked, 30, 'the stalled download to stop flowing', interval=0.5)
    print(f'{last[0] / MiB:.1f} MiB of the stalled download left the service')

    for i in range(20):
        started = time.monotonic()
        r = request(site, 'GET', site.path('policy.xml'), timeout=10)
        assert (r.status, r.body) == (200, POLICY)
        assert time.monotonic() - started < 2, f'request {i} took {time.monotonic() - started:.1f} s'
    other = DeviceConnection(site, timeout=30)
    other.request('GET', site.path(f'download?size={16 * MiB}&seed=15'))
    r = other.getresponse()
    assert r.status == 200
    assert hashlib.sha256(r.read()).hexdigest() == stream_sha256(16 * MiB, 15)
    other.close()
    check_peak_rss(gateway, connector)
    stalled.close()
