/* 'cmg site init': the site service's files; see init_store.h. */
#include "site/init_store.h"

#include "site/connectors.h"
#include "site/ctx.h"
#include "site/pki.h"
#include "site/store.h"

#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int write_site_conf(const struct cmg_init_store *o, char *err, size_t errlen)
{
    char path[PATH_MAX], text[2400];
    int n = snprintf(text, sizeof(text),
                     "; OpenCMG site, written by 'cmg site init' (see docs/site.md).\n"
                     "[site]\n"
                     "service_name = %s\n"
                     "; role id under which devices reach the registration service\n"
                     "site_role = %" PRIu64 "\n"
                     "; admin API, TLS with site.crt (keep it on loopback)\n"
                     "admin_listen = %s\n"
                     "; registration service, reached by connectors (mutual TLS)\n"
                     "service_listen = %s\n"
                     "; the connectors' policy feed (mutual TLS: connector certificates)\n"
                     "feed_listen = %s\n"
                     "; CRL distribution point named by the certificates the site issues\n"
                     "; (the gateway serves the CRL there)\n"
                     "crl_url = %s\n"
                     "%s%s%s"
                     "log_level = info\n"
                     "; text, or json: one object a line\n"
                     "log_format = text\n",
                     o->service_name, o->site_role, o->admin, o->service, o->feed,
                     o->crl_url,
                     o->address ? "; the host connectors reach the feed and the registration "
                                  "service at\nconnector_address = " : "",
                     o->address ? o->address : "", o->address ? "\n" : "");

    if (snprintf(path, sizeof(path), "%s/%s", o->dir, CMG_SITE_CONF) >= (int)sizeof(path) ||
        cmg_pki_write_file(path, text, (size_t)n, 0644) < 0) {
        snprintf(err, errlen, "cannot write %s/%s", o->dir, CMG_SITE_CONF);
        return -1;
    }
    return 0;
}

/* With --force: a new site gets new keys, secrets and an empty store. */
static void remove_old(const char *dir)
{
    static const char *const names[] = {CMG_STORE_FILE, CMG_STORE_FILE "-wal",
                                        CMG_STORE_FILE "-shm", CMG_SITE_SIGNING_KEY,
                                        CMG_SITE_SIGNING_PUB, CMG_SITE_ADMIN_TOKEN,
                                        CMG_SITE_CHANNEL_CERT, CMG_SITE_CHANNEL_KEY,
                                        "connector.secret" /* of older sites */};
    char path[PATH_MAX];

    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (snprintf(path, sizeof(path), "%s/%s", dir, names[i]) < (int)sizeof(path))
            unlink(path);
}

static int add_mapping(struct cmg_store *st, uint64_t role, const char *type, const char *url,
                       unsigned auth)
{
    struct cmg_site_mapping m = {0};

    snprintf(m.role, sizeof(m.role), "%" PRIu64, role);
    snprintf(m.type, sizeof(m.type), "%s", type);
    snprintf(m.url, sizeof(m.url), "%s", url);
    m.auth = auth;
    m.max_body = !strcmp(type, "site") ? 65536 : UINT64_C(1073741824);
    m.forward_authorization = !strcmp(type, "site");   /* it checks the bulk token again */
    return cmg_store_mapping_add(st, &m) < 0 ? -1 : 0;
}

int cmg_site_init_store(const struct cmg_init_store *o, char *err, size_t errlen)
{
    struct cmg_store *st = NULL;
    char url[512], reach[300];
    int rc = -1;

    if (o->force)
        remove_old(o->dir);
    if (write_site_conf(o, err, errlen) < 0 || cmg_site_ensure_secrets(o->dir, err, errlen) < 0 ||
        cmg_store_open(o->dir, &st, err, errlen) < 0)
        return -1;
    /* The registration service takes connectors only (mutual TLS): the thumbprint
     * headers it trusts come from a gateway through an authenticated connector. */
    cmg_site_reach(o->service, o->address, reach, sizeof(reach));
    snprintf(url, sizeof(url), "https://%s", reach);
    if (cmg_store_begin(st) < 0 ||
        add_mapping(st, o->site_role, "site", url, CMG_MAP_AUTH_TOKEN) < 0)
        goto out;
    for (size_t i = 0; i < o->n_mp; i++)
        if (add_mapping(st, o->role_ids[i], "mp", o->mp_urls[i],
                        CMG_MAP_AUTH_CERT | CMG_MAP_AUTH_TOKEN | CMG_MAP_AUTH_OIDC) < 0)
            goto out;
    if (cmg_store_connector_add(st, o->connector_name, o->connector->serial,
                                o->connector->issued, o->connector->expires) != 0)
        goto out;
    if (cmg_store_commit(st) < 0)
        goto out;
    rc = 0;
out:
    if (rc < 0) {
        snprintf(err, errlen, "store: %s", cmg_store_error(st));
        cmg_store_rollback(st);
    }
    cmg_store_close(st);
    return rc;
}
