/* The chain of site signing keys; see keychain.h and docs/policy.md. */
#include "auth/keychain.h"

#include "core/log.h"
#include "site/pki.h"

#include <limits.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEYS_FILE_MAX (CMG_KEYCHAIN_MAX * CMG_JWS_MAX + 4096)

int cmg_keychain_init(struct cmg_keychain *kc, const struct cmg_jwk *pinned)
{
    memset(kc, 0, sizeof(*kc));
    if (!pinned->pkey || !pinned->kid[0] || !EVP_PKEY_up_ref(pinned->pkey))
        return -1;
    kc->keys[0] = *pinned;
    kc->n = 1;
    return 0;
}

void cmg_keychain_free(struct cmg_keychain *kc)
{
    for (size_t i = 0; i < kc->n; i++)
        EVP_PKEY_free(kc->keys[i].pkey);
    for (size_t i = 0; i + 1 < kc->n; i++)
        free(kc->links[i]);
    memset(kc, 0, sizeof(*kc));
}

const struct cmg_jwk *cmg_keychain_newest(const struct cmg_keychain *kc)
{
    return kc->n ? &kc->keys[kc->n - 1] : NULL;
}

static bool known(const struct cmg_keychain *kc, const char *kid)
{
    for (size_t i = 0; i < kc->n; i++)
        if (!strcmp(kc->keys[i].kid, kid))
            return true;
    return false;
}

void cmg_keychain_kids(const struct cmg_keychain *kc, char *out, size_t outlen)
{
    size_t o = 0;

    out[0] = 0;
    for (size_t i = 0; i < kc->n && o < outlen; i++) {
        int w = snprintf(out + o, outlen - o, "%s%s", i ? ", " : "", kc->keys[i].kid);
        o += w > 0 ? (size_t)w : 0;
    }
}

/* The key an announcement names, if it is signed by the newest key and names a P-256
 * key whose thumbprint is the kid it gives; NULL-pkey otherwise. */
static struct cmg_jwk announced_key(const struct cmg_keychain *kc, const struct cmg_jws *j)
{
    const struct cmg_jwk *newest = cmg_keychain_newest(kc);
    const char *typ = cmg_jws_header_str(j, "typ"), *signer = cmg_jws_header_str(j, "kid");
    const char *kid = cmg_jwt_str(j->payload, "kid");
    struct cmg_jwk out = {0};
    struct cmg_jwks set = {0};
    char thumb[44], err[128];

    if (!typ || strcmp(typ, CMG_KEY_ANNOUNCE_TYP) || !signer || strcmp(signer, newest->kid) ||
        !kid || !cmg_jwk_kid_plain(kid) || known(kc, kid) || cmg_jws_verify(j, newest) < 0 ||
        cmg_jwks_from_json(cJSON_GetObjectItemCaseSensitive(j->payload, "jwk"), &set, err,
                           sizeof(err)) < 0)
        return out;
    if (set.n == 1 && set.keys[0].alg == CMG_ALG_ES256 &&
        cmg_jwk_thumbprint(set.keys[0].pkey, thumb) == 0 && !strcmp(thumb, kid) &&
        EVP_PKEY_up_ref(set.keys[0].pkey)) {
        out.pkey = set.keys[0].pkey;
        out.alg = CMG_ALG_ES256;
        snprintf(out.kid, sizeof(out.kid), "%s", kid);
    }
    cmg_jwks_free(&set);
    return out;
}

int cmg_keychain_follow(struct cmg_keychain *kc, const cJSON *links, char *err, size_t errlen)
{
    const cJSON *link;
    int learned = 0;

    if (!links)
        return 0;
    if (!cJSON_IsArray(links) || cJSON_GetArraySize(links) > CMG_KEYCHAIN_MAX) {
        snprintf(err, errlen, "the key chain is not an array of at most %d announcements",
                 CMG_KEYCHAIN_MAX);
        return -1;
    }
    cJSON_ArrayForEach(link, links) {
        struct cmg_jws j;
        struct cmg_jwk next;
        char *copy;

        if (!cJSON_IsString(link) ||
            cmg_jws_parse(link->valuestring, strlen(link->valuestring), &j) < 0)
            continue;
        next = announced_key(kc, &j);
        cmg_jws_free(&j);
        if (!next.pkey)
            continue;
        if (kc->n > CMG_KEYCHAIN_MAX || !(copy = strdup(link->valuestring))) {
            EVP_PKEY_free(next.pkey);
            snprintf(err, errlen, "more than %d site keys to follow from the pinned one "
                     "(kid %s): pin the site's current key (site-signing.pub)",
                     CMG_KEYCHAIN_MAX, kc->keys[0].kid);
            return -1;
        }
        kc->links[kc->n - 1] = copy;
        kc->keys[kc->n++] = next;
        learned++;
    }
    return learned;
}

int cmg_keychain_verify(struct cmg_keychain *kc, const struct cmg_jws *j, int *learned,
                        char *err, size_t errlen)
{
    const cJSON *chain = cJSON_GetObjectItemCaseSensitive(j->header, CMG_KEYCHAIN_HEADER);
    const char *kid = cmg_jws_header_str(j, "kid");
    const struct cmg_jwk *newest;
    char kids[CMG_KEYCHAIN_MAX * 50];
    int n = cmg_keychain_follow(kc, chain, err, errlen);

    if (learned)
        *learned = n > 0 ? n : 0;
    if (n < 0)
        return -1;
    newest = cmg_keychain_newest(kc);
    cmg_keychain_kids(kc, kids, sizeof(kids));
    if (kid && strcmp(kid, newest->kid)) {
        if (known(kc, kid))
            snprintf(err, errlen, "the signature does not verify: it is by site key id %s, "
                     "retired since key id %s was announced (a site restored from an older "
                     "backup? pin its current site-signing.pub as site_key and restart)",
                     kid, newest->kid);
        else
            snprintf(err, errlen, "the signature does not verify: it is by site key id %s, "
                     "which no trusted key announced (trusted key ids: %s; if it is your "
                     "site's, pin its current site-signing.pub as site_key and restart)",
                     cmg_jwk_kid_plain(kid) ? kid : "(not a plain key id)", kids);
        return -1;
    }
    if (cmg_jws_verify(j, newest) < 0) {
        snprintf(err, errlen, "the signature does not verify with site key id %s (trusted "
                 "key ids: %s)", newest->kid, kids);
        return -1;
    }
    return 0;
}

cJSON *cmg_keychain_links(const struct cmg_keychain *kc)
{
    cJSON *arr = cJSON_CreateArray();

    for (size_t i = 0; arr && i + 1 < kc->n; i++)
        cJSON_AddItemToArray(arr, cJSON_CreateString(kc->links[i]));
    return arr;
}

char *cmg_keychain_announce(EVP_PKEY *current, const char *current_kid, EVP_PKEY *next,
                            const char *next_kid, int64_t now)
{
    cJSON *p = cJSON_CreateObject();
    char *json = NULL, *jws = NULL;

    if (p && cJSON_AddStringToObject(p, "kid", next_kid) &&
        cJSON_AddItemToObject(p, "jwk", cmg_jwk_public(next, next_kid)) &&
        cJSON_AddStringToObject(p, "prev", current_kid) &&
        cJSON_AddNumberToObject(p, "iat", (double)now) && (json = cJSON_PrintUnformatted(p)))
        jws = cmg_jws_sign_es256(current, current_kid, CMG_KEY_ANNOUNCE_TYP, json);
    cJSON_Delete(p);
    free(json);
    return jws;
}

static void keys_file(const char *policy_cache, char *out, size_t outlen)
{
    if (!policy_cache[0] || snprintf(out, outlen, "%s.keys", policy_cache) >= (int)outlen)
        out[0] = 0;
}

static int load(struct cmg_keychain *kc, const char *file, char *err, size_t errlen)
{
    unsigned char *data = NULL;
    size_t len = 0;
    cJSON *doc;
    int rc;

    if (cmg_pki_read_file(file, KEYS_FILE_MAX, &data, &len) < 0) {
        snprintf(err, errlen, "cannot read it (or longer than %d bytes)", KEYS_FILE_MAX);
        return -1;
    }
    doc = cJSON_ParseWithLength((const char *)data, len);
    rc = doc ? cmg_keychain_follow(kc, doc, err, errlen) : -1;
    if (!doc)
        snprintf(err, errlen, "not JSON");
    cJSON_Delete(doc);
    free(data);
    return rc;
}

void cmg_keychain_restore(struct cmg_keychain *kc, const char *policy_cache)
{
    char file[PATH_MAX + 8], err[300];
    size_t before = kc->n;

    keys_file(policy_cache, file, sizeof(file));
    if (!file[0] || access(file, F_OK) != 0)
        return;
    if (load(kc, file, err, sizeof(err)) < 0)
        cmg_warn("site keys kept in %s ignored: %s", file, err);
    for (size_t i = before; i < kc->n; i++)
        cmg_info("site key id %s trusted (kept in %s; announced by site key id %s)",
                 kc->keys[i].kid, file, kc->keys[i - 1].kid);
}

void cmg_keychain_remember(const struct cmg_keychain *kc, size_t before,
                           const char *policy_cache)
{
    char file[PATH_MAX + 8], *text;
    cJSON *links;

    for (size_t i = before; i < kc->n; i++)
        cmg_info("site key id %s learned: announced by site key id %s", kc->keys[i].kid,
                 kc->keys[i - 1].kid);
    keys_file(policy_cache, file, sizeof(file));
    if (before == kc->n || !file[0])
        return;
    links = cmg_keychain_links(kc);
    text = links ? cJSON_PrintUnformatted(links) : NULL;
    if (!text || cmg_pki_write_file(file, text, strlen(text), 0644) < 0)
        cmg_warn("cannot keep the site keys learned in %s: a restart follows the chain the "
                 "policy carries", file);
    free(text);
    cJSON_Delete(links);
}
