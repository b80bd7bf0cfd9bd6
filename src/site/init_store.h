/* The part of 'cmg site init' that makes the site service's own files: site.conf,
 * the signing key and secrets, and the store with the first mappings. */
#ifndef CMG_SITE_INIT_STORE_H
#define CMG_SITE_INIT_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct cmg_connector_cert;

struct cmg_init_store {
    const char *dir;
    const char *service_name;
    uint64_t site_role;
    const char *admin, *service, *feed; /* listen addresses */
    const char *crl_url;                /* named by the certificates the site issues */
    const char *address;                /* the host connectors reach the site at, or NULL */
    const char *connector_name;         /* the first connector's certificate */
    const struct cmg_connector_cert *connector;
    const char **mp_urls;
    const uint64_t *role_ids;
    size_t n_mp;
    bool force;                         /* replace what an earlier site left */
};

int cmg_site_init_store(const struct cmg_init_store *o, char *err, size_t errlen);

#endif
