"""200 devices at once, each on one kept-alive connection making 50 requests: every answer is
200 with exactly the body meant for that request (bodies differ per request, so answers
mixed up between streams or connections show)."""
import threading
import time

from cmgtest import SLOW, DeviceConnection
from internal_service import blob

CLIENTS, REQUESTS = 200, 50


def test_200_keep_alive_clients_50_requests_each(site, connector):
    barrier = threading.Barrier(CLIENTS, timeout=60 * SLOW)
    ok = [0] * CLIENTS
    errors = []

    def client(i):
        conn = DeviceConnection(site, timeout=60 * SLOW)
        try:
            conn.connect()
            sock = conn.sock
            barrier.wait()              # all connected before anyone sends
            for j in range(REQUESTS):
                key = f'c{i}-r{j}'
                conn.request('GET', site.path(f'blob/{key}'))
                r = conn.getresponse()
                body = r.read()
                if r.status != 200 or body != blob(key):
                    errors.append(f'client {i} request {j}: {r.status} {body[:60]!r}')
                    return
                if conn.sock is not sock:
                    errors.append(f'client {i} request {j}: the gateway closed the connection')
                    return
                ok[i] += 1
        except Exception as e:          # reported below, with the others
            errors.append(f'client {i}: {e!r}')
            barrier.abort()
        finally:
            conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1, started + 300 * SLOW - time.monotonic()))
    elapsed = time.monotonic() - started
    print(f'{sum(ok)} requests in {elapsed:.1f} s')
    assert not any(t.is_alive() for t in threads), 'clients still running after the deadline'
    assert not errors, f'{len(errors)} clients failed, e.g.: {errors[:5]}'
    assert sum(ok) == CLIENTS * REQUESTS
