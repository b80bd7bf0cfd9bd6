/* The chain of site signing keys: what a verifier follows from its pinned key, and what it
 * refuses (a key nobody announced, a retired key, a fork, an announcement posing as a
 * document, a chain too long). */
#include "auth/jwk.h"
#include "auth/jws.h"
#include "auth/keychain.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define NKEYS (CMG_KEYCHAIN_MAX + 3)

static EVP_PKEY *keys[NKEYS];
static char kids[NKEYS][44];

static int keys_setup(void **state)
{
    (void)state;
    for (int i = 0; i < NKEYS; i++)
        if (!(keys[i] = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")) ||
            cmg_jwk_thumbprint(keys[i], kids[i]) < 0)
            return -1;
    return 0;
}

static int keys_teardown(void **state)
{
    (void)state;
    for (int i = 0; i < NKEYS; i++)
        EVP_PKEY_free(keys[i]);
    return 0;
}

static void pin(struct cmg_keychain *kc, int i)
{
    struct cmg_jwk root = {.alg = CMG_ALG_ES256, .pkey = keys[i]};

    snprintf(root.kid, sizeof(root.kid), "%s", kids[i]);
    assert_int_equal(cmg_keychain_init(kc, &root), 0);
}

/* The announcement of key `to` signed by key `by`. */
static cJSON *link_of(int by, int to)
{
    char *a = cmg_keychain_announce(keys[by], kids[by], keys[to], kids[to], 1800000000);
    cJSON *s;

    assert_non_null(a);
    s = cJSON_CreateString(a);
    free(a);
    return s;
}

/* A chain of announcements: pairs[i] = {by, to}. */
static cJSON *chain(const int (*pairs)[2], size_t n)
{
    cJSON *arr = cJSON_CreateArray();

    for (size_t i = 0; i < n; i++)
        cJSON_AddItemToArray(arr, link_of(pairs[i][0], pairs[i][1]));
    return arr;
}

/* A policy-like document signed by key `by`, carrying `links` (taken). */
static int verify_doc(struct cmg_keychain *kc, int by, cJSON *links, const char *typ,
                      char *err, size_t errlen)
{
    char *jws = cmg_jws_sign_es256_with(keys[by], kids[by], typ, CMG_KEYCHAIN_HEADER, links,
                                        "{\"version\":2}");
    struct cmg_jws j;
    int rc;

    assert_non_null(jws);
    assert_int_equal(cmg_jws_parse_limit(jws, strlen(jws), 1 << 20, &j), 0);
    rc = cmg_keychain_verify(kc, &j, NULL, err, errlen);
    cmg_jws_free(&j);
    free(jws);
    cJSON_Delete(links);
    return rc;
}

static void follows_announcements_from_the_pinned_key(void **state)
{
    static const int pairs[][2] = {{0, 1}, {1, 2}, {2, 3}};
    struct cmg_keychain kc;
    char err[1024];

    (void)state;
    pin(&kc, 1);   /* pinned mid-chain: the link before it is skipped */
    assert_int_equal(verify_doc(&kc, 3, chain(pairs, 3), "cmg-policy+jwt", err, sizeof(err)), 0);
    assert_int_equal(kc.n, 3);
    assert_string_equal(cmg_keychain_newest(&kc)->kid, kids[3]);
    /* The old key signs nothing any more, with the chain or without. */
    assert_int_equal(verify_doc(&kc, 1, NULL, "cmg-policy+jwt", err, sizeof(err)), -1);
    assert_non_null(strstr(err, "retired since key id"));
    cmg_keychain_free(&kc);
}

static void a_key_nobody_announced_is_refused(void **state)
{
    static const int pairs[][2] = {{0, 1}};
    struct cmg_keychain kc;
    char err[1024], want[256];

    (void)state;
    pin(&kc, 0);
    assert_int_equal(verify_doc(&kc, 5, chain(pairs, 1), "cmg-policy+jwt", err, sizeof(err)), -1);
    snprintf(want, sizeof(want), "site key id %s, which no trusted key announced (trusted key "
             "ids: %s, %s;", kids[5], kids[0], kids[1]);
    assert_non_null(strstr(err, want));
    cmg_keychain_free(&kc);
}

static void an_announcement_by_a_retired_or_unknown_key_is_skipped(void **state)
{
    /* 0 -> 1, then a fork by the retired 0 (0 -> 4), and 5 -> 6 by a stranger. */
    static const int pairs[][2] = {{0, 1}, {0, 4}, {5, 6}};
    struct cmg_keychain kc;
    char err[1024];

    (void)state;
    pin(&kc, 0);
    assert_int_equal(verify_doc(&kc, 4, chain(pairs, 3), "cmg-policy+jwt", err, sizeof(err)), -1);
    assert_int_equal(verify_doc(&kc, 6, NULL, "cmg-policy+jwt", err, sizeof(err)), -1);
    assert_int_equal(kc.n, 2);
    assert_int_equal(verify_doc(&kc, 1, NULL, "cmg-policy+jwt", err, sizeof(err)), 0);
    cmg_keychain_free(&kc);
}

static void an_announcement_is_not_a_document_nor_a_document_a_link(void **state)
{
    struct cmg_keychain kc;
    cJSON *links = cJSON_CreateArray();
    char *policy = cmg_jws_sign_es256(keys[0], kids[0], "cmg-policy+jwt", "{\"kid\":\"x\"}");
    char err[1024];
    int n;

    (void)state;
    pin(&kc, 0);
    /* A policy of the trusted key, posing as a link: not followed. */
    cJSON_AddItemToArray(links, cJSON_CreateString(policy));
    n = cmg_keychain_follow(&kc, links, err, sizeof(err));
    assert_int_equal(n, 0);
    cJSON_Delete(links);
    free(policy);
    /* An announcement has its own typ: cmg_policy_from_jws checks the policy's. */
    assert_string_not_equal(CMG_KEY_ANNOUNCE_TYP, "cmg-policy+jwt");
    cmg_keychain_free(&kc);
}

static void an_announcement_must_name_the_key_it_carries(void **state)
{
    struct cmg_keychain kc;
    cJSON *p = cJSON_CreateObject(), *links = cJSON_CreateArray();
    char *json, *jws, err[256];

    (void)state;
    /* kid of key 2 but the JWK of key 3 */
    cJSON_AddStringToObject(p, "kid", kids[2]);
    cJSON_AddItemToObject(p, "jwk", cmg_jwk_public(keys[3], kids[2]));
    json = cJSON_PrintUnformatted(p);
    jws = cmg_jws_sign_es256(keys[0], kids[0], CMG_KEY_ANNOUNCE_TYP, json);
    cJSON_AddItemToArray(links, cJSON_CreateString(jws));
    pin(&kc, 0);
    assert_int_equal(cmg_keychain_follow(&kc, links, err, sizeof(err)), 0);
    assert_int_equal(kc.n, 1);
    cmg_keychain_free(&kc);
    cJSON_Delete(links);
    cJSON_Delete(p);
    free(json);
    free(jws);
}

static void chains_are_bounded(void **state)
{
    int pairs[CMG_KEYCHAIN_MAX + 1][2];
    struct cmg_keychain kc;
    cJSON *links;
    char err[256];

    (void)state;
    for (int i = 0; i <= CMG_KEYCHAIN_MAX; i++) {
        pairs[i][0] = i;
        pairs[i][1] = i + 1;
    }
    pin(&kc, 0);
    links = chain((const int (*)[2])pairs, CMG_KEYCHAIN_MAX + 1);   /* one too many */
    assert_int_equal(cmg_keychain_follow(&kc, links, err, sizeof(err)), -1);
    assert_int_equal(kc.n, 1);
    cJSON_Delete(links);
    links = chain((const int (*)[2])pairs, CMG_KEYCHAIN_MAX);
    assert_int_equal(cmg_keychain_follow(&kc, links, err, sizeof(err)), CMG_KEYCHAIN_MAX);
    cJSON_Delete(links);
    links = chain((const int (*)[2])pairs + CMG_KEYCHAIN_MAX, 1);   /* full: one more refused */
    assert_int_equal(cmg_keychain_follow(&kc, links, err, sizeof(err)), -1);
    assert_non_null(strstr(err, "pin the site's current key"));
    assert_int_equal(kc.n, CMG_KEYCHAIN_MAX + 1);
    cJSON_Delete(links);
    /* What it learned, followed again from the pinned key, reaches the same key. */
    links = cmg_keychain_links(&kc);
    cmg_keychain_free(&kc);
    pin(&kc, 0);
    assert_int_equal(cmg_keychain_follow(&kc, links, err, sizeof(err)), CMG_KEYCHAIN_MAX);
    assert_string_equal(cmg_keychain_newest(&kc)->kid, kids[CMG_KEYCHAIN_MAX]);
    cJSON_Delete(links);
    cmg_keychain_free(&kc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(follows_announcements_from_the_pinned_key),
        cmocka_unit_test(a_key_nobody_announced_is_refused),
        cmocka_unit_test(an_announcement_by_a_retired_or_unknown_key_is_skipped),
        cmocka_unit_test(an_announcement_is_not_a_document_nor_a_document_a_link),
        cmocka_unit_test(an_announcement_must_name_the_key_it_carries),
        cmocka_unit_test(chains_are_bounded),
    };
    return cmocka_run_group_tests(tests, keys_setup, keys_teardown);
}
