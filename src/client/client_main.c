/* cmg client <command>: dispatch, and the small helpers the subcommands share. */
#include "client/analyze.h"
#include "client/client.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cjson/cJSON.h>

#define CLIENT_TIMEOUT_MAX_S 86400

static void client_usage(FILE *out)
{
    fputs("usage: cmg client <command> [options]\n"
          "\n"
          "The reference device agent: registers a device with a bulk registration token\n"
          "and makes requests through the gateway with the device's certificate and\n"
          "token.\n"
          "\n"
          "commands:\n"
          "  register --gateway HOST:PORT --ca FILE --bulk-token TOKEN [--state DIR] ...\n"
          "            create the device key and certificate (once), register with the\n"
          "            gateway and keep the device token in the state directory\n"
          "  get PATH [--state DIR] [-o FILE] [-i] [-X METHOD] [-d DATA] [-H HEADER]...\n"
          "            send a request through the gateway; the body goes to standard output\n"
          "            (renews the device token first when it is due)\n"
          "  get PATH --gateway HOST:PORT --cert FILE --key FILE [--ca FILE] ...\n"
          "            the same for a device with a PKI certificate, without registration\n"
          "  renew [--state DIR]\n"
          "            renew the device token now\n"
          "  listen [--state DIR | --gateway HOST:PORT --cert FILE --key FILE [--ca FILE]]\n"
          "         [--token FILE] [--exec CMD] [--once] [--max-events N]\n"
          "            hold the device's notification channel (GET /CCM_Notify): print each\n"
          "            event as a JSON line, reconnect with back-off and Last-Event-ID\n"
          "  analyze --gateway HOST:PORT [--ca FILE] [--cert FILE --key FILE | --state DIR |\n"
          "          --token TOKEN] [--path PATH] [--json]\n"
          "            check each step from this device to the internal service (name,\n"
          "            TCP, TLS, credential, clock, mapping, connector, service)\n"
          "\n"
          "The state directory is --state DIR if given; else $" CMG_CLIENT_STATE_ENV " if set;\n"
          "else the directory of the last successful register (recorded in\n"
          "$HOME/.config/opencmg/client-state); else $HOME/.config/opencmg/client.\n"
          "\n"
          "Exit status: 0 success, 1 refused or a non-2xx answer (or a local problem),\n"
          "2 bad usage, 3 no connection (network, TLS, timeout).\n"
          "\n"
          "Run 'cmg client <command> --help' for the options of a command.\n",
          out);
}

int cmg_client_main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : NULL;

    if (!cmd) {
        client_usage(stderr);
        return CMG_CLIENT_EXIT_USAGE;
    }
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        client_usage(stdout);
        return CMG_CLIENT_EXIT_OK;
    }
    if (!strcmp(cmd, "register"))
        return cmg_client_register_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "get"))
        return cmg_client_get_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "listen"))
        return cmg_client_listen_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "analyze"))
        return cmg_client_analyze_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "renew"))
        return cmg_client_renew_main(argc - 1, argv + 1);
    fprintf(stderr, "cmg client: unknown command '%s'\n", cmd);
    client_usage(stderr);
    return CMG_CLIENT_EXIT_USAGE;
}

/* ---- shared by the subcommands ---- */

int cmg_client_opt(int argc, char **argv, int *i, const char *opt, const char **val)
{
    const char *a = argv[*i];
    size_t n = strlen(opt);

    if (strncmp(a, opt, n))
        return 0;
    if (a[n] == '=' && opt[1] == '-') { /* --long=VALUE */
        *val = a + n + 1;
        return 1;
    }
    if (a[n])
        return 0;
    if (*i + 1 >= argc)
        return -1;
    *val = argv[++*i];
    return 1;
}

int cmg_client_parse_timeout(const char *s, int *ms)
{
    char *end;
    double v;

    if (!*s || isspace((unsigned char)*s))
        return -1;
    errno = 0;
    v = strtod(s, &end);
    if (errno || *end || !(v > 0) || v > CLIENT_TIMEOUT_MAX_S)
        return -1;
    *ms = (int)(v * 1000);
    if (*ms < 1)
        *ms = 1;
    return 0;
}

int cmg_client_fetch_exit(int result)
{
    switch (result) {
    case CMG_FETCH_OK:
        return CMG_CLIENT_EXIT_OK;
    case CMG_FETCH_EINVAL:
        return CMG_CLIENT_EXIT_USAGE;
    case CMG_FETCH_ELOCAL:
        return CMG_CLIENT_EXIT_FAIL;
    default:
        return CMG_CLIENT_EXIT_NET;
    }
}

/* Copies at most one line of s (n bytes), trimmed, with anything unprintable as '?'. */
static void printable_line(const char *s, size_t n, char *out, size_t outlen)
{
    size_t i = 0, j = 0;

    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r' || s[i] == '\n'))
        i++;
    for (; i < n && s[i] != '\r' && s[i] != '\n' && j + 1 < outlen; i++)
        out[j++] = (unsigned char)s[i] >= 0x20 && (unsigned char)s[i] < 0x7f ? s[i] : '?';
    while (j > 0 && (out[j - 1] == ' ' || out[j - 1] == '\t'))
        j--;
    out[j] = 0;
}

void cmg_client_reason(const struct cmg_fetch_resp *resp, char *out, size_t outlen)
{
    cJSON *root = NULL;
    const cJSON *e;
    const char *line;

    out[0] = 0;
    if (resp->body && resp->body_len) {
        root = cJSON_ParseWithLength(resp->body, resp->body_len);
        e = cJSON_GetObjectItemCaseSensitive(root, "error");
        if (cJSON_IsString(e))
            printable_line(e->valuestring, strlen(e->valuestring), out, outlen);
        else if (!root && (!resp->content_type ||
                           !strncasecmp(resp->content_type, "text/plain", 10)))
            printable_line(resp->body, resp->body_len, out, outlen);
        cJSON_Delete(root);
    }
    if (!out[0] && resp->head && (line = strchr(resp->head, ' ')) && (line = strchr(line + 1, ' ')))
        printable_line(line + 1, strcspn(line + 1, "\r\n"), out, outlen);
    if (!out[0])
        snprintf(out, outlen, "(no reason given)");
}

const char *cmg_client_stored_server_name(const char *gateway, const struct cmg_client_state *s)
{
    char host[256];
    int port;

    if (!s->server_name || !*s->server_name)
        return NULL;
    if (gateway && cmg_fetch_split_addr(s->gateway, 0, host, sizeof(host), &port) == 0 &&
        !strcmp(host, s->server_name))
        return NULL;
    return s->server_name;
}
