/* The gateway's own HTTP/1.1 request handling, fed the bytes a device sends: the
 * parser callbacks and head checks of gateway/device_h1.c, the header collector
 * (http/h1_head.c) and admission (gateway/admit.c, auth.c), through cmg_h1_input(),
 * the function the device's read loop calls with each read. No socket: the device's
 * connection is not open, so answers stay in its output buffer, where they are
 * checked; there is no tunnel, so an admitted request is answered 503.
 *
 * Input: the first byte picks where the rest is cut in two (two reads). Requests
 * for the mapped role use /CCM_Proxy_MutualAuth/1234567890 (the device holds a
 * valid certificate) or /CCM_Proxy_ServerAuth/1234567890 (bearer tokens); the CRL
 * is at /CCM_CRL/site.crl. */
#include "core/log.h"
#include "gateway/gw.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ROLE "1234567890"
#define MAX_BODY 1000

static struct cmg_gateway gw;

static void gateway_once(void)
{
    struct cmg_policy *p;

    if (gw.loop)
        return;
    cmg_log_set_level(CMG_LOG_ERROR);
    gw.loop = cmg_loop_new();
    gw.cfg.max_header_size = 4096;
    gw.cfg.header_timeout_ms = 2000;
    gw.cfg.idle_timeout_ms = 4000;
    p = cmg_policy_new();
    if (!gw.loop || !p || !(p->mappings = calloc(1, sizeof(*p->mappings))))
        abort();
    snprintf(p->service_name, sizeof(p->service_name), "cmg.test");
    snprintf(p->mappings[0].role, sizeof(p->mappings[0].role), ROLE);
    snprintf(p->mappings[0].type, sizeof(p->mappings[0].type), "mp");
    p->mappings[0].auth = CMG_AUTH_CERT | CMG_AUTH_TOKEN;
    p->mappings[0].max_body = MAX_BODY;
    p->nmappings = 1;
    /* A CRL to serve at CMG_CRL_PATH (any bytes do: the gateway passes it on as it is;
     * the policy is never freed, nor is this) */
    p->crl_der = (unsigned char *)"0\x03\x02\x01\x00";
    p->crl_der_len = 5;
    gw.policy = p;
    gw.policy_gen = 1;
}

/* A device whose certificate was judged valid under the policy in force. */
static void device_init(struct cmg_device *d)
{
    memset(d, 0, sizeof(*d));
    d->gw = &gw;
    d->conn.io.fd = -1;
    d->conn.state = CMG_CONN_CLOSED;
    d->cert = CMG_CERT_OK;
    d->cert_gen = gw.policy_gen;
    d->has_cert = true;
    memset(d->thumbprint, 'a', 64);
    snprintf(d->subject, sizeof(d->subject), "CN=device1");
    snprintf(d->conn.peer, sizeof(d->conn.peer), "192.0.2.1:50000");
}

/* The Content-Length of a head (-1 if none). */
static long head_length(const char *head, size_t len)
{
    static const char name[] = "\r\nContent-Length: ";
    const char *at = memmem(head, len, name, sizeof(name) - 1);
    return at ? strtol(at + sizeof(name) - 1, NULL, 10) : -1;
}

/* Every answer the gateway wrote is a whole HTTP/1.1 status line and head, then the
 * body its Content-Length gives (none after HEAD: the next answer follows). */
static void check_output(const struct cmg_buf *out)
{
    const char *p = out->len ? cmg_buf_head(out) : "";
    size_t left = out->len;

    while (left) {
        const char *end;
        long body;
        if (left < 12 || memcmp(p, "HTTP/1.1 ", 9) != 0)
            __builtin_trap();
        end = memmem(p, left, "\r\n\r\n", 4);
        if (!end)
            __builtin_trap();
        body = head_length(p, (size_t)(end - p));
        left -= (size_t)(end + 4 - p);
        p = end + 4;
        if (left && memcmp(p, "HTTP/1.1 ", 9) != 0) {
            if (body < 0 || (size_t)body > left)
                __builtin_trap();
            left -= (size_t)body;
            p += body;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct cmg_device d;
    size_t split;

    if (size < 1)
        return 0;
    gateway_once();
    device_init(&d);
    if (cmg_h1_start(&d) < 0)
        return 0;
    split = data[0] % size;
    data++;
    size--;
    if (split > size)
        split = size;
    cmg_h1_input(&d, (const char *)data, split);
    if (d.h1 && size > split)
        cmg_h1_input(&d, (const char *)data + split, size - split);
    check_output(&d.conn.out);
    cmg_h1_free(&d);
    cmg_timer_stop(gw.loop, &d.timer);
    cmg_buf_free(&d.conn.out);
    free(d.tok);
    return 0;
}
