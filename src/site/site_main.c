/* cmg site <command>: dispatch of the site's subcommands. */
#include "site/site.h"

#include "site/admin_cli.h"
#include "site/init.h"
#include "site/serve.h"

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
          "            create a site directory: site CA, signing key, gateway, connector and\n"
          "            sample device certificates, site.conf, gateway.conf, connector.conf\n"
          "  serve DIR  run the site service: admin API, device registration, and the\n"
          "            connectors' feed of the signed policy they carry to every gateway\n"
          "  mapping add|list|remove          published URL mappings\n"
          "  token bulk create|list|block|unblock   bulk registration tokens\n"
          "  device list|block|unblock        devices: registered, seen on a channel\n"
          "  cert issue|revoke|list|check-revocation   client certificates and the CRL\n"
          "  oidc set|show|clear              accepted Entra ID / OIDC tokens\n"
          "  connector add|list|revoke        connector certificates, one per connector\n"
          "  key rotate                       a new signing key, announced to gateways\n"
          "  status [DIR] [--json]            what the deployment is doing: tunnels,\n"
          "                                   reports, traffic, egress, certificates\n"
          "                                   ending, open alerts\n"
          "  alert list|set|unset|webhook     egress, certificate and tunnel alerts\n"
          "  notify [--device ID|--devices FILE|--all] --type TYPE | status ID | list\n"
          "                                   notifications to devices' channels, their\n"
          "                                   delivered/waiting/expired counts, --resend\n"
          "                                   ID --missed\n"
          "\n"
          "Run 'cmg site <command> --help' for the options of a command.\n",
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
    if (!strcmp(cmd, "serve"))
        return cmg_site_serve_main(argc - 1, argv + 1);
    if (cmg_site_admin_area(cmd))
        return cmg_site_admin_main(argc - 1, argv + 1);
    fprintf(stderr, "cmg site: unknown command '%s'\n", cmd);
    site_usage(stderr);
    return 2;
}
