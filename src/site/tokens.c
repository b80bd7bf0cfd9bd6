/* Site tokens; see tokens.h. */
#include "site/tokens.h"

#include "site/signing.h"

#include "auth/b64url.h"
#include "auth/jws.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CLOCK_SKEW 60

static void new_id(char out[64], const char *prefix)
{
    unsigned char r[16];

    RAND_bytes(r, sizeof(r));
    r[6] = (unsigned char)((r[6] & 0x0f) | 0x40);
    r[8] = (unsigned char)((r[8] & 0x3f) | 0x80);
    snprintf(out, 64, "%s%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             prefix, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11],
             r[12], r[13], r[14], r[15]);
}

/* The claims every site token has. */
static cJSON *base_claims(struct cmg_site_ctx *s, const char *use, const char *jti, int64_t now,
                          int64_t exp)
{
    char reg[128];
    cJSON *c = cJSON_CreateObject();

    snprintf(reg, sizeof(reg), "/CCM_Proxy_ServerAuth/%s", s->site_role);
    if (!c || !cJSON_AddStringToObject(c, "iss", s->issuer) ||
        !cJSON_AddStringToObject(c, "aud", s->service_name) ||
        !cJSON_AddStringToObject(c, "jti", jti) ||
        !cJSON_AddNumberToObject(c, "iat", (double)now) ||
        !cJSON_AddNumberToObject(c, "exp", (double)exp) ||
        !cJSON_AddStringToObject(c, "cmg_use", use) ||
        !cJSON_AddStringToObject(c, "cmg_reg", reg)) {
        cJSON_Delete(c);
        return NULL;
    }
    return c;
}

static char *sign(struct cmg_site_ctx *s, cJSON *claims)
{
    char *json = claims ? cJSON_PrintUnformatted(claims) : NULL;
    char *tok = json ? cmg_jws_sign_es256(s->sign_key, s->sign_pub.kid, "JWT", json) : NULL;

    free(json);
    cJSON_Delete(claims);
    return tok;
}

char *cmg_site_bulk_token(struct cmg_site_ctx *s, int64_t now, int64_t lifetime,
                          const char *description, char guid[64], int64_t *expires)
{
    char *tok;

    new_id(guid, "");
    *expires = now + lifetime;
    tok = sign(s, base_claims(s, "bulk", guid, now, *expires));
    if (tok && cmg_store_bulk_add(s->store, guid, now, *expires, description) < 0) {
        free(tok);
        return NULL;
    }
    return tok;
}

int cmg_thumb_hex_to_x5t(const char *hex, char out[44])
{
    unsigned char raw[32];

    if (strlen(hex) != 64)
        return -1;
    for (int i = 0; i < 32; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        raw[i] = (unsigned char)v;
    }
    return cmg_b64url_encode(raw, sizeof(raw), out, 44) == 43 ? 0 : -1;
}

char *cmg_site_device_token(struct cmg_site_ctx *s, const char *device_id,
                            const char *thumb_hex, int64_t now, char jti[64], int64_t *expires)
{
    char x5t[44];
    cJSON *c, *cnf;

    if (cmg_thumb_hex_to_x5t(thumb_hex, x5t) < 0)
        return NULL;
    new_id(jti, "");
    *expires = now + (int64_t)CMG_DEVICE_TOKEN_DAYS * 86400;
    c = base_claims(s, "device", jti, now, *expires);
    if (!c || !cJSON_AddStringToObject(c, "sub", device_id) ||
        !(cnf = cJSON_AddObjectToObject(c, "cnf")) ||
        !cJSON_AddStringToObject(cnf, "x5t#S256", x5t)) {
        cJSON_Delete(c);
        return NULL;
    }
    return sign(s, c);
}

int cmg_site_token_check(struct cmg_site_ctx *s, const char *token, size_t len,
                         const char *use, int64_t now, cJSON **payload, const char **reason)
{
    struct cmg_jws j;
    const char *u, *iss;
    int rc = 401;

    *payload = NULL;
    *reason = "CMGService_Invalid_Token";
    if (cmg_jws_parse(token, len, &j) < 0)
        return 401;
    iss = cmg_jwt_str(j.payload, "iss");
    u = cmg_jwt_str(j.payload, "cmg_use");
    if (cmg_site_token_verify(s, &j, now) < 0 || !iss || strcmp(iss, s->issuer) ||
        !cmg_jwt_aud_has(j.payload, s->service_name))
        goto out;
    if (!u || strcmp(u, use)) {
        *reason = "CMGService_Token_Not_Allowed_Here";
        rc = 403;
        goto out;
    }
    if (cmg_jwt_check_time(j.payload, now, CLOCK_SKEW) != CMG_JWT_TIME_OK) {
        *reason = "CMGService_Token_Expired";
        goto out;
    }
    if (!cmg_jwt_str(j.payload, "jti"))
        goto out;
    *payload = j.payload;
    j.payload = NULL;
    rc = 0;
out:
    cmg_jws_free(&j);
    return rc;
}
