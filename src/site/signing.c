/* The site's signing keys and their rotation; see signing.h and docs/policy.md. */
#include "site/signing.h"

#include "auth/keychain.h"
#include "core/log.h"
#include "site/pki.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A retired key verifies tokens this long after it was retired: the longest lifetime
 * of a token the site signs (a device token), and a day for clocks and renewals. */
#define TOKEN_KEY_KEPT_S ((int64_t)CMG_DEVICE_TOKEN_DAYS * 86400 + 86400)

static int path_of(char *out, size_t len, const char *dir, const char *name, const char *kid)
{
    return snprintf(out, len, "%s/%s%s%s", dir, name, kid ? "-" : "", kid ? kid : "") <
                   (int)len ? 0 : -1;
}

/* A private key and its kid (RFC 7638 thumbprint); NULL if missing or not P-256. */
static EVP_PKEY *load_key(const char *path, char kid[44])
{
    struct stat st;
    EVP_PKEY *key = stat(path, &st) == 0 ? cmg_pki_load_key(path) : NULL;

    if (key && cmg_jwk_thumbprint(key, kid) < 0) {
        EVP_PKEY_free(key);
        key = NULL;
    }
    return key;
}

static void set_current(struct cmg_site_ctx *s, EVP_PKEY *key, const char *kid,
                        int64_t created)
{
    EVP_PKEY_free(s->sign_key);
    s->sign_key = key;
    s->sign_pub.pkey = key;
    s->sign_pub.alg = CMG_ALG_ES256;
    snprintf(s->sign_pub.kid, sizeof(s->sign_pub.kid), "%s", kid);
    s->sign_created = created;
}

/* The key of a committed rotation becomes DIR/site-signing.key and .pub. Another
 * process may have done it already: then there is nothing to rename. */
static int put_in_place(const char *dir, const char *kid, EVP_PKEY *key)
{
    char next[PATH_MAX], cur[PATH_MAX];

    if (path_of(next, sizeof(next), dir, CMG_SITE_SIGNING_NEXT, kid) < 0 ||
        path_of(cur, sizeof(cur), dir, CMG_SITE_SIGNING_KEY, NULL) < 0 ||
        (rename(next, cur) < 0 && errno != ENOENT))
        return -1;
    return cmg_site_write_signing_pub(dir, key);
}

static char *public_jwk_text(EVP_PKEY *key, const char *kid)
{
    cJSON *jwk = cmg_jwk_public(key, kid);
    char *text = jwk ? cJSON_PrintUnformatted(jwk) : NULL;

    cJSON_Delete(jwk);
    return text;
}

/* A key file of a site made before rotations: recorded as the first key, made when
 * the file was. */
static int record_first(struct cmg_site_ctx *s, const char *path, EVP_PKEY *key,
                        const char *kid, int64_t *created)
{
    char *jwk = public_jwk_text(key, kid);
    struct stat st;
    int rc;

    *created = stat(path, &st) == 0 ? (int64_t)st.st_mtime : (int64_t)time(NULL);
    rc = jwk ? cmg_store_signing_key_add(s->store, kid, jwk, *created, NULL) : -1;
    free(jwk);
    return rc;
}

int cmg_site_signing_load(struct cmg_site_ctx *s, char *err, size_t errlen)
{
    char path[PATH_MAX], next[PATH_MAX], kid[128], thumb[44];
    int64_t created = 0;
    int have = cmg_store_signing_key_current(s->store, kid, sizeof(kid), &created);
    EVP_PKEY *key;

    if (have < 0 || path_of(path, sizeof(path), s->dir, CMG_SITE_SIGNING_KEY, NULL) < 0) {
        snprintf(err, errlen, "store: %s", cmg_store_error(s->store));
        return -1;
    }
    if (!(key = load_key(path, thumb))) {
        snprintf(err, errlen, "cannot load the signing key %s (a P-256 private key)", path);
        return -1;
    }
    if (have == 0) {
        snprintf(kid, sizeof(kid), "%s", thumb);
        if (record_first(s, path, key, thumb, &created) < 0) {
            snprintf(err, errlen, "store: %s", cmg_store_error(s->store));
            EVP_PKEY_free(key);
            return -1;
        }
    } else if (strcmp(thumb, kid)) {   /* a rotation committed, its key not yet in place */
        EVP_PKEY_free(key);
        key = path_of(next, sizeof(next), s->dir, CMG_SITE_SIGNING_NEXT, kid) == 0
                  ? load_key(next, thumb) : NULL;
        if (!key || strcmp(thumb, kid)) {
            snprintf(err, errlen, "%s does not hold the site's current signing key (key id "
                     "%s, the store says), nor does %s: restore that key file", path, kid, next);
            EVP_PKEY_free(key);
            return -1;
        }
        if (put_in_place(s->dir, kid, key) < 0)
            cmg_warn("cannot put the signing key %s in place of %s: %s", next, path,
                     strerror(errno));
    }
    set_current(s, key, kid, created);
    return 0;
}

int cmg_site_signing_reload(struct cmg_site_ctx *s, char *err, size_t errlen)
{
    char kid[128];
    int64_t created;
    int have = cmg_store_signing_key_current(s->store, kid, sizeof(kid), &created);

    if (have < 0) {
        snprintf(err, errlen, "store: %s", cmg_store_error(s->store));
        return -1;
    }
    if (have == 0 || !strcmp(kid, s->sign_pub.kid))
        return 0;
    return cmg_site_signing_load(s, err, errlen) < 0 ? -1 : 1;
}

static int rotate_fail(char *msg, size_t len, int status, const char *what, const char *why)
{
    snprintf(msg, len, "%s%s", what, why);
    return status;
}

/* Within a write transaction: the next key, its announcement, the store's record. */
static int rotate_tx(struct cmg_site_ctx *s, EVP_PKEY *next, const char *kid, int64_t now,
                     char *msg, size_t len)
{
    char path[PATH_MAX], err[400];
    char *announcement = NULL, *jwk = NULL;
    int rc = 500;

    if (cmg_site_signing_reload(s, err, sizeof(err)) < 0)
        return rotate_fail(msg, len, 500, "", err);
    if (!(announcement = cmg_keychain_announce(s->sign_key, s->sign_pub.kid, next, kid, now)) ||
        !(jwk = public_jwk_text(next, kid))) {
        rc = rotate_fail(msg, len, 500, "cannot sign the announcement of the next key", "");
    } else if (path_of(path, sizeof(path), s->dir, CMG_SITE_SIGNING_NEXT, kid) < 0 ||
               cmg_pki_write_key(path, next) < 0) {
        rc = rotate_fail(msg, len, 500, "cannot write the next signing key in ", s->dir);
    } else if (cmg_store_signing_key_retire(s->store, s->sign_pub.kid, now) < 0 ||
               cmg_store_signing_key_add(s->store, kid, jwk, now, announcement) < 0 ||
               cmg_store_bump(s->store) < 0) {
        rc = rotate_fail(msg, len, 500, "store: ", cmg_store_error(s->store));
        unlink(path);
    } else {
        rc = 0;
    }
    free(announcement);
    free(jwk);
    return rc;
}

int cmg_site_key_rotate(struct cmg_site_ctx *s, cJSON **result, char *msg, size_t len)
{
    EVP_PKEY *next = cmg_pki_new_key();
    int64_t now = (int64_t)time(NULL);
    char kid[44], previous[128], path[PATH_MAX];
    int rc;

    if (!next || cmg_jwk_thumbprint(next, kid) < 0) {
        EVP_PKEY_free(next);
        return rotate_fail(msg, len, 500, "cannot make a P-256 key", "");
    }
    if (cmg_store_begin(s->store) < 0) {
        EVP_PKEY_free(next);
        return rotate_fail(msg, len, 500, "store busy: ", cmg_store_error(s->store));
    }
    rc = rotate_tx(s, next, kid, now, msg, len);
    if (rc == 0 && cmg_store_commit(s->store) < 0) {
        rc = rotate_fail(msg, len, 500, "store: ", cmg_store_error(s->store));
        if (path_of(path, sizeof(path), s->dir, CMG_SITE_SIGNING_NEXT, kid) == 0)
            unlink(path);
    }
    if (rc != 0) {
        cmg_store_rollback(s->store);
        EVP_PKEY_free(next);
        return rc;
    }
    if (put_in_place(s->dir, kid, next) < 0)   /* the next load finishes it */
        cmg_warn("cannot put the new signing key in place in %s: %s", s->dir, strerror(errno));
    snprintf(previous, sizeof(previous), "%s", s->sign_pub.kid);
    set_current(s, next, kid, now);
    *result = cJSON_CreateObject();
    cJSON_AddStringToObject(*result, "kid", kid);
    cJSON_AddStringToObject(*result, "previous", previous);
    cJSON_AddNumberToObject(*result, "created", (double)now);
    return 0;
}

bool cmg_site_key_rotation_due(const struct cmg_site_ctx *s, int64_t now)
{
    return s->key_rotation_s > 0 && now - s->sign_created >= s->key_rotation_s;
}

cJSON *cmg_site_signing_chain(struct cmg_site_ctx *s)
{
    cJSON *rows = cmg_store_signing_keys_json(s->store), *chain = cJSON_CreateArray(), *row;

    cJSON_ArrayForEach(row, rows) {
        const char *a = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(row,
                                                                             "announcement"));
        if (a && chain)
            cJSON_AddItemToArray(chain, cJSON_CreateString(a));
    }
    while (chain && cJSON_GetArraySize(chain) > CMG_KEYCHAIN_MAX)
        cJSON_DeleteItemFromArray(chain, 0);
    cJSON_Delete(rows);
    if (chain && cJSON_GetArraySize(chain) == 0) {
        cJSON_Delete(chain);
        chain = NULL;
    }
    return chain;
}

static bool verifies_tokens(const cJSON *row, int64_t now)
{
    const cJSON *retired = cJSON_GetObjectItemCaseSensitive(row, "retired");

    return !cJSON_IsNumber(retired) || (int64_t)retired->valuedouble + TOKEN_KEY_KEPT_S > now;
}

cJSON *cmg_site_token_keys(struct cmg_site_ctx *s, int64_t now)
{
    cJSON *rows = cmg_store_signing_keys_json(s->store), *doc = cJSON_CreateObject(), *row;
    cJSON *keys = doc ? cJSON_AddArrayToObject(doc, "keys") : NULL;

    if (!rows || !keys) {
        cJSON_Delete(rows);
        cJSON_Delete(doc);
        return NULL;
    }
    cJSON_ArrayForEach(row, rows) {
        const char *jwk = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(row, "jwk"));
        cJSON *key = jwk && verifies_tokens(row, now) ? cJSON_Parse(jwk) : NULL;
        if (key)
            cJSON_AddItemToArray(keys, key);
    }
    cJSON_Delete(rows);
    return doc;
}

int cmg_site_token_verify(struct cmg_site_ctx *s, const struct cmg_jws *j, int64_t now)
{
    const char *kid = cmg_jws_header_str(j, "kid");
    struct cmg_jwks set = {0};
    const struct cmg_jwk *key;
    cJSON *doc;
    char err[128];
    int rc = -1;

    if (!kid || !strcmp(kid, s->sign_pub.kid))
        return cmg_jws_verify(j, &s->sign_pub);
    doc = cmg_site_token_keys(s, now);
    if (doc && cmg_jwks_from_json(doc, &set, err, sizeof(err)) == 0 &&
        (key = cmg_jwks_find(&set, kid)) && key->kid[0])
        rc = cmg_jws_verify(j, key);
    cmg_jwks_free(&set);
    cJSON_Delete(doc);
    return rc;
}

void cmg_site_signing_list(struct cmg_site_ctx *s, cJSON *list)
{
    cJSON *rows = cmg_store_signing_keys_json(s->store), *row;
    char pub[PATH_MAX];

    cJSON_ArrayForEach(row, rows) {
        const cJSON *created = cJSON_GetObjectItemCaseSensitive(row, "created");
        const cJSON *retired = cJSON_GetObjectItemCaseSensitive(row, "retired");
        const char *kid = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(row, "kid"));
        bool current = !cJSON_IsNumber(retired);
        cJSON *out = cJSON_CreateObject();
        if (!out || !kid || !cJSON_IsNumber(created)) {
            cJSON_Delete(out);
            continue;
        }
        cJSON_AddStringToObject(out, "kind", "signing key");
        if (current) {
            cJSON_AddStringToObject(out, "name", CMG_SITE_SIGNING_PUB);
        } else {   /* the table has no column of its own for it */
            time_t t = (time_t)retired->valuedouble;
            struct tm tm;
            char name[64] = "retired";
            if (gmtime_r(&t, &tm))
                strftime(name, sizeof(name), "retired %Y-%m-%dT%H:%M:%SZ", &tm);
            cJSON_AddStringToObject(out, "name", name);
        }
        cJSON_AddStringToObject(out, "kid", kid);
        cJSON_AddStringToObject(out, "serial", kid);   /* the key's identity, as a serial */
        cJSON_AddNumberToObject(out, "created", created->valuedouble);
        cJSON_AddNumberToObject(out, "issued", created->valuedouble);
        /* Its end: the next automatic rotation, or the end of the tokens it signed. */
        if (current && s->key_rotation_s > 0)
            cJSON_AddNumberToObject(out, "expires",
                                    created->valuedouble + (double)s->key_rotation_s);
        else if (!current)
            cJSON_AddNumberToObject(out, "expires",
                                    retired->valuedouble + (double)TOKEN_KEY_KEPT_S);
        else
            cJSON_AddNullToObject(out, "expires");
        if (current)
            cJSON_AddNullToObject(out, "retired");
        else
            cJSON_AddNumberToObject(out, "retired", retired->valuedouble);
        if (current && path_of(pub, sizeof(pub), s->dir, CMG_SITE_SIGNING_PUB, NULL) == 0)
            cJSON_AddStringToObject(out, "file", pub);
        cJSON_AddItemToArray(list, out);
    }
    cJSON_Delete(rows);
}
