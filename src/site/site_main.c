/* cmg site <command>: dispatch of the site's subcommands. */
#include "site/site.h"

#include "site/init.h"

#include <stdio.h>
#include <string.h>

static void site_usage(FILE *out)
{
    fputs("usage: cmg site <command> [options]\n"
          "\n"
          "The site is the authority of a deployment: its CA issues the gateway, connector\n"
          "and device certificates, and it publishes the URL mappings.\n"
          "\n"
          "commands:\n"
          "  init DIR --service-name NAME [options]\n"
          "            create a site directory: site CA, gateway, connector and sample device\n"
          "            certificates, gateway.conf and connector.conf\n"
          "\n"
          "Run 'cmg site init --help' for its options.\n",
          out);
}

int cmg_site_main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : NULL;

    if (!cmd) {
        site_usage(stderr);
        return 2;
    }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        site_usage(stdout);
        return 0;
    }
    if (!strcmp(cmd, "init"))
        return cmg_site_init_main(argc - 1, argv + 1);
    fprintf(stderr, "cmg site: unknown command '%s'\n", cmd);
    site_usage(stderr);
    return 2;
}
