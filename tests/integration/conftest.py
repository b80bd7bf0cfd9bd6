"""Fixtures: each test gets its own site directory, internal service, gateway and connector,
all on loopback with kernel-chosen ports, all stopped at teardown.

    svc        the internal service "svc-a" (a Python HTTP server, see internal_service.py)
    site       `cmg site init` into tmp_path/site with one --mp: svc's URL; configs on loopback
    gateway    `cmg gateway -c site/gateway.conf`, listening on the device port at once
               (ready_timeout = 0: it answers devices alone, 503 until a connector is up)
    connector  `cmg connector -c site/connector.conf`, serving: a device request gets an answer
    procs      the process list, for starting more (a second service, connector, ...)

When a test fails, the logs of its processes (and site init's output) are printed with it.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import cmgtest  # noqa: E402


def pytest_report_header(config):
    return f'cmg: {cmgtest.CMG} (sanitized: {cmgtest.SANITIZED})'


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    procs = getattr(item, 'cmg_procs', None)
    if report.failed and procs:
        for title, text in procs.report_sections():
            report.sections.append((title, text))


@pytest.fixture
def procs(request, tmp_path):
    if not os.access(cmgtest.CMG, os.X_OK):
        pytest.fail(f'no cmg binary at {cmgtest.CMG} (set CMG_BIN)')
    p = cmgtest.Processes(tmp_path)
    request.node.cmg_procs = p
    yield p
    p.close()


@pytest.fixture
def svc(procs):
    return cmgtest.InternalService(procs, 'svc-a')


@pytest.fixture
def site(tmp_path, procs, svc):
    return cmgtest.Site(tmp_path / 'site', [svc.url], procs)


@pytest.fixture
def gateway(procs, site):
    cmgtest.alone_gateway(site)
    return cmgtest.start_gateway(procs, site)


@pytest.fixture
def connector(procs, site, gateway):
    proc = cmgtest.start_connector(procs, site.connector_conf)
    cmgtest.wait_ready(procs, site)
    return proc
