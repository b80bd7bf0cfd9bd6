/* Admission: every request head from a device passes here once. The target must
 * be well-formed and covered by a published mapping, and the credential must be
 * the one the prefix demands; only then is anything forwarded. */
#include "core/log.h"
#include "gateway/gw.h"
#include "http/path.h"
#include "tls/tls.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *cmg_reason_phrase(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 417: return "Expectation Failed";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return "Unknown";
    }
}

enum cmg_cert_state cmg_device_cert(struct cmg_device *d)
{
    X509 *x;

    if (d->cert != CMG_CERT_UNKNOWN)
        return d->cert;
    x = d->conn.ssl ? SSL_get0_peer_certificate(d->conn.ssl) : NULL;
    if (!x) {
        d->cert = CMG_CERT_NONE;
        return d->cert;
    }
    cmg_tls_thumbprint(x, d->thumbprint);
    cmg_tls_subject(x, d->subject, sizeof(d->subject));
    d->cert_error = cmg_tls_peer_verify_error(d->conn.ssl);
    d->cert = d->cert_error == X509_V_OK ? CMG_CERT_OK : CMG_CERT_INVALID;
    return d->cert;
}

/* Header names go to HTTP/2 in lower case. */
static int add_lower(struct cmg_headers *h, const char *name, size_t nlen, const char *value,
                     size_t vlen)
{
    char lower[256];
    if (nlen >= sizeof(lower))
        return cmg_headers_add(h, name, nlen, value, vlen);
    for (size_t i = 0; i < nlen; i++)
        lower[i] = (char)tolower((unsigned char)name[i]);
    return cmg_headers_add(h, lower, nlen, value, vlen);
}

static int build_headers(struct cmg_device *d, struct cmg_exchange *ex,
                         const struct cmg_headers *in, int64_t content_length)
{
    char num[32], ip[64];
    const char *colon;
    int rc = 0;

    for (uint32_t i = 0; i < in->n; i++) {
        const char *name = cmg_headers_name(in, i);
        size_t nlen = in->v[i].name_len;
        /* CMG-* fields are ours to set: a device never gets to supply them. */
        if (cmg_header_not_forwarded(name, nlen) || cmg_header_has_prefix(name, nlen, "cmg-") ||
            (nlen == 15 && cmg_header_is(in, i, "x-forwarded-for")))
            continue;
        rc |= add_lower(&ex->req, name, nlen, cmg_headers_value(in, i), in->v[i].value_len);
    }
    if (content_length >= 0) {
        snprintf(num, sizeof(num), "%lld", (long long)content_length);
        rc |= cmg_headers_add(&ex->req, "content-length", 14, num, strlen(num));
    }
    if (d->cert == CMG_CERT_OK) {
        rc |= cmg_headers_add(&ex->req, "cmg-client-cert-thumbprint", 26, d->thumbprint, 64);
        rc |= cmg_headers_add(&ex->req, "cmg-client-subject", 18, d->subject, strlen(d->subject));
    }
    /* d->conn.peer is "ip:port" or "[ip6]:port" */
    snprintf(ip, sizeof(ip), "%s", d->conn.peer[0] == '[' ? d->conn.peer + 1 : d->conn.peer);
    colon = strrchr(ip, d->conn.peer[0] == '[' ? ']' : ':');
    if (colon)
        ip[colon - ip] = 0;
    rc |= cmg_headers_add(&ex->req, "x-forwarded-for", 15, ip, strlen(ip));
    rc |= cmg_headers_add(&ex->req, "x-forwarded-proto", 17, "https", 5);
    return rc ? -1 : 0;
}

struct cmg_exchange *cmg_admit(struct cmg_device *d, const char *method, const char *target,
                               size_t target_len, const struct cmg_headers *in,
                               int64_t content_length, bool has_body,
                               const struct cmg_exchange_dev_ops *ops, void *owner,
                               int *status, const char **reason)
{
    struct cmg_gateway *gw = d->gw;
    struct cmg_gw_mapping *m;
    struct cmg_exchange *ex;
    struct cmg_path p;

    if (cmg_path_check(target, target_len) < 0) {
        *status = 400;
        *reason = "CMGService_Bad_Request_Path";
        return NULL;
    }
    cmg_path_parse(target, target_len, &p);
    m = p.kind == CMG_PATH_OTHER ? NULL : cmg_gw_config_mapping(&gw->cfg, p.role, p.role_len);
    if (!m) {
        *status = 404;
        *reason = "CMGService_No_Mapping";
        return NULL;
    }
    if (p.kind == CMG_PATH_MUTUAL_AUTH) {
        if (!(m->auth & CMG_AUTH_CERT)) {
            *status = 403;
            *reason = "CMGService_Auth_Mode_Not_Allowed";
            return NULL;
        }
        if (cmg_device_cert(d) != CMG_CERT_OK) {
            *status = 401;
            *reason = "CMGService_Invalid_Client_Certificate";
            return NULL;
        }
    } else {
        *status = 401;   /* bearer tokens are not accepted yet */
        *reason = "CMGService_Invalid_Token";
        return NULL;
    }
    if (content_length >= 0 && (uint64_t)content_length > m->max_body) {
        *status = 413;
        *reason = "CMGService_Request_Too_Large";
        return NULL;
    }
    ex = cmg_exchange_new(gw, ops, owner);
    if (!ex || !(ex->target = strndup(target, target_len)) ||
        build_headers(d, ex, in, content_length) < 0) {
        cmg_exchange_free(ex);
        *status = 500;
        *reason = "CMGService_Out_Of_Memory";
        return NULL;
    }
    snprintf(ex->method, sizeof(ex->method), "%s", method);
    ex->mapping = m;
    ex->req_body_expected = has_body;
    snprintf(ex->peer, sizeof(ex->peer), "%s", d->conn.peer);
    snprintf(ex->identity, sizeof(ex->identity), "cert:%.16s", d->thumbprint);
    return ex;
}

void cmg_exchange_log(struct cmg_exchange *ex, const char *outcome)
{
    cmg_info("request peer=%s method=%s path=%s status=%d in=%llu out=%llu ms=%llu "
             "connector=%s client=%s%s%s",
             ex->peer, ex->method, ex->target ? ex->target : "-", ex->status,
             (unsigned long long)ex->req_bytes, (unsigned long long)ex->resp_bytes,
             (unsigned long long)(cmg_loop_now(ex->gw->loop) - ex->start_ms),
             ex->connector[0] ? ex->connector : "-", ex->identity,
             outcome ? " outcome=" : "", outcome ? outcome : "");
}
