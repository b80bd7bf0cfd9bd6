/* The gateway's device-side HTTP/2 session (gateway/device_h2.c: its nghttp2 session,
 * callbacks, admission and deadlines) fed frame sequences through cmg_h2dev_feed(),
 * which is what the read path does with each chunk it reads. The device's connection
 * is never opened: what the session sends collects in its output buffer, emptied
 * here. One mapping admits the device as if its certificate were valid, so requests
 * reach admission and exchanges (answered 503: there is no tunnel).
 *
 * Input: a sequence of records, each a length byte n then n bytes (the last one takes
 * what is left), fed one record at a time after the client preface. */
#include "auth/policy.h"
#include "core/log.h"
#include "gateway/gw.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const uint8_t PREFACE[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static void setup(struct cmg_gateway *gw, struct cmg_policy *p, struct cmg_policy_mapping *m)
{
    memset(gw, 0, sizeof(*gw));
    memset(p, 0, sizeof(*p));
    memset(m, 0, sizeof(*m));
    snprintf(m->role, sizeof(m->role), "1");
    snprintf(m->type, sizeof(m->type), "mp");
    m->auth = CMG_AUTH_CERT;
    m->max_body = 1000;
    p->refs = 1;
    p->mappings = m;
    p->nmappings = 1;
    /* A CRL to serve at CMG_CRL_PATH (any bytes do: the gateway passes it on as it is;
     * the policy is never freed, nor is this) */
    p->crl_der = (unsigned char *)"0\x03\x02\x01\x00";
    p->crl_der_len = 5;
    gw->policy = p;
    gw->cfg.max_header_size = 4096;
    gw->cfg.header_timeout_ms = 30000;
    gw->cfg.idle_timeout_ms = 120000;
}

static struct cmg_device *device_new(struct cmg_gateway *gw)
{
    struct cmg_device *d = calloc(1, sizeof(*d));

    if (!d)
        abort();
    d->gw = gw;
    d->cert = CMG_CERT_OK;   /* judged under policy generation 0, the one in force */
    snprintf(d->conn.peer, sizeof(d->conn.peer), "192.0.2.1:443");
    /* Never opened (writes are queued, not sent); a descriptor for close() to take. */
    d->conn.state = CMG_CONN_CLOSED;
    d->conn.io.loop = gw->loop;
    d->conn.io.fd = open("/dev/null", O_RDONLY);
    gw->devices = d;
    gw->ndevices = 1;
    if (d->conn.io.fd < 0 || cmg_h2dev_start(d) < 0)
        abort();
    return d;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cmg_gateway gw;
    struct cmg_policy policy;
    struct cmg_policy_mapping mapping;
    struct cmg_device *d;

    cmg_log_set_level(CMG_LOG_ERROR);   /* refusals are the normal case here */
    setup(&gw, &policy, &mapping);
    if (!(gw.loop = cmg_loop_new()))
        abort();
    d = device_new(&gw);
    cmg_h2dev_feed(d, PREFACE, sizeof(PREFACE) - 1);
    while (size && d->h2) {
        size_t n = data[0] < size - 1 ? data[0] : size - 1;
        cmg_h2dev_feed(d, data + 1, n);
        cmg_buf_reset(&d->conn.out);   /* what the device would have read */
        data += 1 + n;
        size -= 1 + n;
    }
    if (d->h2)
        cmg_device_close(d, "input done");
    cmg_loop_free(gw.loop);   /* frees the device */
    return 0;
}
