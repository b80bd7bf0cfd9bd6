"""The load of the zero-downtime acceptance tests: a continuous loop of device requests plus
long downloads, running while a test restarts, reloads or freezes parts of the deployment.

    with Load(site) as load:
        ...restart something...
    load.assert_clean()       # no failed request, every download whole (SHA-256)

Requests go on new connections (HTTP/1.1) and on kept-alive ones (HTTP/2, through curl, which
like every real client sends a request again when a reused connection closed before any of
its response); the downloads are rate-limited so that they are in flight for the whole test,
half over HTTP/1.1 and half over HTTP/2."""
import threading
import time

from cmgtest import CurlProcess, request
from internal_service import stream_sha256

MiB = 1 << 20


class Load:
    def __init__(self, site, clients=3, downloads=4, download_size=24 * MiB, rate='2M',
                 paths=('whoami', 'policy.xml'), role=0):
        self.site, self.clients, self.paths, self.role = site, clients, paths, role
        self.n_downloads, self.download_size, self.rate = downloads, download_size, rate
        self.results = []                # (started, ended, status or None, detail)
        self.downloads = []              # (CurlProcess, seed)
        self._stop = threading.Event()
        self._threads = []

    # ---- the request loop
    def _client(self, i):
        n = 0
        while not self._stop.is_set():
            path = self.site.path(self.paths[(i + n) % len(self.paths)], self.role)
            started = time.monotonic()
            try:
                r = request(self.site, 'GET', path, timeout=30)
                self.results.append((started, time.monotonic(), r.status, r.body[:120]))
            except Exception as e:   # noqa: BLE001 (a refused or cut request is a failure too)
                self.results.append((started, time.monotonic(), None, repr(e)))
            n += 1

    def start(self):
        for k in range(self.n_downloads):
            seed = 100 + k
            path = self.site.path(f'download?size={self.download_size}&seed={seed}', self.role)
            dl = CurlProcess(self.site, path, '--limit-rate', self.rate, http='2' if k % 2 else '1.1')
            self.downloads.append((dl, seed))
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                         for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self, download_timeout=120):
        """Stop the request loop and wait for the downloads to end."""
        self._stop.set()
        for t in self._threads:
            t.join(60)
        for dl, _ in self.downloads:
            try:
                dl.wait(download_timeout)
            except Exception:   # noqa: BLE001
                dl.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- what it saw
    def failed(self):
        return [r for r in self.results if r[2] != 200]

    def download_problems(self):
        problems = []
        for dl, seed in self.downloads:
            r = dl.wait(0)
            if r.rc != 0 or dl.received != self.download_size or dl.sha256 != stream_sha256(self.download_size, seed):
                problems.append(f'download seed={seed}: curl rc={r.rc}, {dl.received} of '
                                f'{self.download_size} bytes, {r.stderr.strip()[-200:]}')
        return problems

    def summary(self):
        ok = len(self.results) - len(self.failed())
        return (f'{len(self.results)} requests, {ok} answered 200; {len(self.downloads)} downloads of '
                f'{self.download_size >> 20} MiB at {self.rate}/s, {len(self.download_problems())} broken')

    def assert_clean(self):
        failed, problems = self.failed(), self.download_problems()
        assert self.results, 'the load made no request'
        assert not failed, f'{len(failed)} of {len(self.results)} requests failed: {failed[:5]}'
        assert not problems, problems
