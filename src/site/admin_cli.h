/* cmg site mapping|token|device|cert|oidc ...: the site's admin commands. */
#ifndef CMG_SITE_ADMIN_CLI_H
#define CMG_SITE_ADMIN_CLI_H

#include <stdbool.h>

/* True if word names an area of admin commands. */
bool cmg_site_admin_area(const char *word);
/* argv[0] is the area ("mapping", "token", ...). Returns the exit status. */
int cmg_site_admin_main(int argc, char **argv);

#endif
