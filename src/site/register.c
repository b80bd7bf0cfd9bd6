/* Device registration and token renewal; see register.h and docs/site.md. */
#include "site/register.h"

#include "auth/jws.h"
#include "core/log.h"
#include "http/httpd.h"
#include "site/serve.h"
#include "site/tokens.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define THUMB_HEADER "cmg-client-cert-thumbprint"

struct reg_result {
    struct cmg_device_rec dev;
    char *token;
    int64_t expires, issued;
};

/* The device name from the body {"name": ...}: printable, bounded; else "device". */
static void device_name(const struct cmg_httpd_req *req, char *out, size_t len)
{
    cJSON *body = req->body_len ? cJSON_ParseWithLength(req->body, req->body_len) : NULL;
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(body, "name");
    size_t n = 0;

    if (cJSON_IsString(name))
        for (const char *p = name->valuestring; *p && n + 1 < len; p++)
            if (isprint((unsigned char)*p))
                out[n++] = *p;
    if (n == 0)
        n = (size_t)snprintf(out, len, "device");
    out[n] = 0;
    cJSON_Delete(body);
}

static bool valid_thumb(const char *t)
{
    if (!t || strlen(t) != 64)
        return false;
    for (; *t; t++)
        if (!isxdigit((unsigned char)*t))
            return false;
    return true;
}

static void answer(struct cmg_httpd_req *req, const struct reg_result *r)
{
    cJSON *o = cJSON_CreateObject();

    cJSON_AddStringToObject(o, "device_id", r->dev.id);
    cJSON_AddStringToObject(o, "token", r->token);
    cJSON_AddNumberToObject(o, "expires", (double)r->expires);
    cJSON_AddNumberToObject(o, "renew_after",
                            (double)(r->issued + (int64_t)CMG_DEVICE_RENEW_DAYS * 86400));
    cmg_httpd_json(req, 200, o);
}

/* Issues the token and records it, inside the caller's transaction. */
static int issue(struct cmg_site_ctx *s, struct reg_result *r, const char *thumb)
{
    char jti[64];

    r->issued = (int64_t)time(NULL);
    r->token = cmg_site_device_token(s, r->dev.id, thumb, r->issued, jti, &r->expires);
    if (!r->token || cmg_store_device_token(s->store, r->dev.id, jti, r->issued, r->expires) < 0)
        return -1;
    return 0;
}

static void refuse(struct cmg_httpd_req *req, int status, const char *reason, const char *what)
{
    char msg[64];
    const struct cmg_log_field f[] = {
        CMG_F_NUM("status", status), CMG_F_STR("reason", reason), CMG_F_STR("peer", req->peer)};

    snprintf(msg, sizeof(msg), "%s refused", what);
    cmg_log_kv(CMG_LOG_WARN, msg, f, CMG_LOG_NFIELDS(f));
    cmg_httpd_error(req, status, reason);
}

static void do_register(struct cmg_site_ctx *s, struct cmg_httpd_req *req)
{
    const char *bearer = cmg_httpd_bearer(req), *thumb = cmg_httpd_header(req, THUMB_HEADER);
    const char *reason, *guid;
    struct reg_result r = {0};
    cJSON *claims = NULL;
    char name[128];
    int64_t expires;
    bool blocked;
    int rc;

    if (!bearer) {
        refuse(req, 401, "CMGService_Invalid_Token", "registration");
        return;
    }
    rc = cmg_site_token_check(s, bearer, strlen(bearer), "bulk", (int64_t)time(NULL), &claims,
                              &reason);
    if (rc != 0) {
        refuse(req, rc, reason, "registration");
        return;
    }
    guid = cmg_jwt_str(claims, "jti");
    rc = cmg_store_bulk_get(s->store, guid, &expires, &blocked);
    if (rc != 0 || blocked) {
        refuse(req, rc ? 401 : 403, rc ? "CMGService_Invalid_Token" : "CMGService_Token_Blocked",
               "registration");
        goto out;
    }
    if (!valid_thumb(thumb)) {
        refuse(req, 401, "CMGService_Client_Certificate_Required", "registration");
        goto out;
    }
    device_name(req, name, sizeof(name));
    if (cmg_store_begin(s->store) < 0 ||
        cmg_store_device_upsert(s->store, thumb, name, guid, (int64_t)time(NULL), &r.dev) != 0) {
        cmg_store_rollback(s->store);
        refuse(req, 500, "CMGService_Store_Error", "registration");
        goto out;
    }
    if (r.dev.blocked) {
        cmg_store_rollback(s->store);
        refuse(req, 403, "CMGService_Device_Blocked", "registration");
        goto out;
    }
    /* The token is handed out only once the device is on disk. */
    if (issue(s, &r, thumb) < 0 || cmg_store_commit(s->store) < 0) {
        cmg_store_rollback(s->store);
        refuse(req, 500, "CMGService_Store_Error", "registration");
        goto out;
    }
    cmg_info("device registered id=%s name=%s bulk=%s peer=%s", r.dev.id, r.dev.name, guid,
             req->peer);
    answer(req, &r);
out:
    free(r.token);
    cJSON_Delete(claims);
}

static void do_renew(struct cmg_site_ctx *s, struct cmg_httpd_req *req)
{
    const char *bearer = cmg_httpd_bearer(req), *thumb = cmg_httpd_header(req, THUMB_HEADER);
    const char *reason, *sub, *x5t_claim;
    struct reg_result r = {0};
    cJSON *claims = NULL;
    char x5t[44];
    int rc;

    if (!bearer) {
        refuse(req, 401, "CMGService_Invalid_Token", "renewal");
        return;
    }
    rc = cmg_site_token_check(s, bearer, strlen(bearer), "device", (int64_t)time(NULL), &claims,
                              &reason);
    if (rc != 0) {
        refuse(req, rc, reason, "renewal");
        return;
    }
    sub = cmg_jwt_str(claims, "sub");
    x5t_claim = cJSON_GetStringValue(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(claims, "cnf"),
                                         "x5t#S256"));
    if (!valid_thumb(thumb) || cmg_thumb_hex_to_x5t(thumb, x5t) < 0 || !x5t_claim ||
        strcmp(x5t, x5t_claim)) {
        refuse(req, 401, "CMGService_Token_Certificate_Mismatch", "renewal");
        goto out;
    }
    if (!sub || cmg_store_begin(s->store) < 0) {
        refuse(req, 500, "CMGService_Store_Error", "renewal");
        goto out;
    }
    rc = cmg_store_device_get(s->store, sub, &r.dev);
    if (rc != 0 || r.dev.blocked || strcasecmp(r.dev.thumbprint, thumb)) {
        cmg_store_rollback(s->store);
        refuse(req, rc == 0 && r.dev.blocked ? 403 : 401,
               rc == 0 && r.dev.blocked ? "CMGService_Device_Blocked" : "CMGService_Unknown_Device",
               "renewal");
        goto out;
    }
    if (issue(s, &r, thumb) < 0 || cmg_store_commit(s->store) < 0) {
        cmg_store_rollback(s->store);
        refuse(req, 500, "CMGService_Store_Error", "renewal");
        goto out;
    }
    cmg_info("device token renewed id=%s peer=%s", r.dev.id, req->peer);
    answer(req, &r);
out:
    free(r.token);
    cJSON_Delete(claims);
}

void cmg_site_on_register(void *user, struct cmg_httpd_req *req)
{
    struct cmg_site_server *srv = user;
    size_t plen = strcspn(req->target, "?");

    if (strcmp(req->method, "POST")) {
        static const char body[] = "{\"error\":\"CMGService_Method_Not_Allowed\"}\n";
        cmg_httpd_respond(req, 405, "application/json", body, sizeof(body) - 1,
                          "Allow: POST\r\n");
        return;
    }
    if (plen == 9 && !strncmp(req->target, "/register", 9))
        do_register(srv->ctx, req);
    else if (plen == 6 && !strncmp(req->target, "/renew", 6))
        do_renew(srv->ctx, req);
    else
        cmg_httpd_error(req, 404, "CMGService_No_Such_Endpoint");
}
