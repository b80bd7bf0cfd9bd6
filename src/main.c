/* cmg: one binary, one subcommand per role. */
#include "client/client.h"
#include "connector/connector.h"
#include "gateway/gateway.h"
#include "site/site.h"

#include <stdio.h>
#include <string.h>

static const char usage[] =
    "usage: cmg <command> [options]\n"
    "\n"
    "OpenCMG " CMG_VERSION ", a cloud management gateway: managed devices on the internet\n"
    "reach on-premises management services through a gateway, while the internal\n"
    "network opens no inbound port.\n"
    "\n"
    "commands:\n"
    "  gateway -c FILE [--instance I]\n"
    "                        run a gateway instance (internet-facing; devices and tunnels)\n"
    "  connector -c FILE     run a connector (on-premises; dials out to every gateway)\n"
    "  connector analyze -c FILE [--json]\n"
    "                        check each gateway, the site feed and each route of FILE\n"
    "  site init DIR --service-name NAME [options]\n"
    "                        create a site: CA, signing key, certificates, site.conf,\n"
    "                        gateway.conf, connector.conf\n"
    "  site serve DIR        run the site service: admin API, device registration,\n"
    "                        the connectors' policy feed\n"
    "  site mapping|token|device|cert|oidc|connector <command> [DIR]\n"
    "                        administer the site: mappings, tokens, devices, certificates\n"
    "  client register|get|renew|analyze [options]\n"
    "                        device agent: register with a bulk token, get through the\n"
    "                        gateway, analyze each step from the device to the service\n"
    "  version               print the version (also --version)\n"
    "  help                  print this help (also -h, --help)\n"
    "\n"
    "The manual page cmg(1) describes every role; docs/configuration.md every key.\n"
    "Run 'cmg <command> --help' for the options of a command.\n";

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : NULL;

    if (!cmd || !strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        fputs(usage, cmd ? stdout : stderr);
        return cmd ? 0 : 2;
    }
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("cmg %s\n", CMG_VERSION);
        return 0;
    }
    if (!strcmp(cmd, "gateway"))
        return cmg_gateway_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "connector"))
        return cmg_connector_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "site"))
        return cmg_site_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "client"))
        return cmg_client_main(argc - 1, argv + 1);
    fprintf(stderr, "cmg: unknown command '%s'\n%s", cmd, usage);
    return 2;
}
