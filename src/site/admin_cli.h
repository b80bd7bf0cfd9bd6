/* cmg site mapping|token|device|cert|oidc ...: the site's admin commands. */
#ifndef CMG_SITE_ADMIN_CLI_H
#define CMG_SITE_ADMIN_CLI_H

#include <cjson/cJSON.h>
#include <stdbool.h>

/* True if word names an area of admin commands. */
bool cmg_site_admin_area(const char *word);
/* argv[0] is the area ("mapping", "token", ...). Returns the exit status. */
int cmg_site_admin_main(int argc, char **argv);

/* Where an admin operation runs: the site directory, or the admin API of a running site
 * (--api URL, its token and CA files). */
struct cmg_site_admin_target {
    const char *prog;          /* "cmg site notify", for messages */
    const char *dir;           /* NULL: $CMG_SITE_DIR, else "." */
    const char *api, *token_file, *ca_file;
};
/* Runs op with args there: 0 with *result, or an exit status (2 usage, 1 refusal or
 * error) with the reason on stderr. */
int cmg_site_admin_run(const struct cmg_site_admin_target *t, const char *op, cJSON *args,
                       cJSON **result);
/* Whether d is a site directory (it holds site.conf). */
bool cmg_site_admin_is_site_dir(const char *d);
/* cmg site notify ... (notify_cli.c); argv[0] is "notify". Returns the exit status. */
int cmg_site_notify_main(int argc, char **argv);

#endif
