/* cmg site notify: send a notification to devices, re-send it to those that missed it,
 * show its counts, list the newest (docs/site.md, "Notifications"). The operations are
 * notify_ops.c's, run on the site directory or through the admin API. */
#include "site/admin_cli.h"

#include "site/notify.h"
#include "site/pki.h"
#include "site/serve.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEVICES_FILE_MAX (16u << 20)

static const char usage[] =
    "usage: cmg site notify [DIR] (--device ID [--device ID]... | --devices FILE | --all)\n"
    "                       --type TYPE [--data JSON] [--ttl DURATION] [--json]\n"
    "       cmg site notify [DIR] --resend ID --missed [--ttl DURATION] [--json]\n"
    "       cmg site notify status ID [DIR] [--json]\n"
    "       cmg site notify list [DIR] [--json]\n"
    "  each with [--api https://HOST:PORT [--admin-token FILE] [--ca FILE]]\n"
    "\n"
    "Sends a notification to devices through every connector to every gateway instance;\n"
    "a device with its channel open (GET /CCM_Notify) gets it at once, one that connects\n"
    "before it expires gets it then. It prints 'notification ID: N device(s)'.\n"
    "  --device ID      a device as gateways name it: cert:<SHA-256 thumbprint> (a\n"
    "                   certificate), the site device id (a site device token), the\n"
    "                   OIDC deviceid/oid; repeatable\n"
    "  --devices FILE   one device id per line ('#' comments and blank lines ignored;\n"
    "                   '-': standard input); at most 100000 ids and 4 MiB in all\n"
    "  --all            every device; the targets counted are the devices the site knew\n"
    "                   when it was sent (registered, issued a certificate, or seen on\n"
    "                   a channel)\n"
    "  --type TYPE      1..64 of A-Z a-z 0-9 _ . - (policy, script, ...; not 'reset')\n"
    "  --data JSON      any JSON value, at most 16 KiB compact (default null)\n"
    "  --ttl DURATION   how long it waits for devices: 90s, 30m, 2h, or seconds;\n"
    "                   1s to 24h (default 1h)\n"
    "  --resend ID --missed\n"
    "                   a new notification, same type and data, to the targets of ID\n"
    "                   that have no delivery of it (of --all: the devices the site knew\n"
    "                   then); 'nothing to resend: every target has it' when none\n"
    "status ID: 'notification ID (TYPE): D delivered, W waiting, X expired of N device(s)':\n"
    "  delivered, a gateway reported it written to the device; waiting, not yet and not\n"
    "  expired; expired, not delivered before it expired. Gateways report within seconds.\n"
    "list: the newest notifications with those counts.\n"
    "--json prints the result as JSON. With --api the operation goes to the admin API of\n"
    "a running site (its certificate checked against DIR/ca.crt or --ca FILE, with\n"
    "DIR/admin.token or --admin-token FILE); an API request body is at most 1 MiB, so\n"
    "long --devices lists are sent from the site's host.\n"
    "Exit status: 0 done; 1 refused or failed (the reason on stderr); 2 usage error.\n";

struct notify_cli {
    struct cmg_site_admin_target t;
    const char *verb;          /* NULL (send or resend), "status" or "list" */
    const char *id;            /* status ID */
    const char *devices_file;
    bool json, help;
    cJSON *args;
};

static int usage_error(const char *msg)
{
    fprintf(stderr, "cmg site notify: %s\n\n%s", msg, usage);
    return 2;
}

/* Adds id to args.devices. */
static void add_device(cJSON *args, const char *id)
{
    cJSON *list = cJSON_GetObjectItemCaseSensitive(args, "devices");

    if (!list)
        list = cJSON_AddArrayToObject(args, "devices");
    cJSON_AddItemToArray(list, cJSON_CreateString(id));
}

/* The whole of standard input, at most max bytes. 0, or -1. */
static int read_stdin(size_t max, unsigned char **out, size_t *len)
{
    size_t cap = 65536, n = 0, got;
    unsigned char *buf = malloc(cap + 1);

    while (buf && (got = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += got;
        if (n == cap && cap <= max) {
            unsigned char *more = realloc(buf, 2 * cap + 1);
            if (!more)
                break;
            buf = more;
            cap *= 2;
        }
    }
    if (!buf || n > max || ferror(stdin)) {
        free(buf);
        return -1;
    }
    buf[n] = 0;
    *out = buf;
    *len = n;
    return 0;
}

/* --devices FILE: one id per line into args.devices. 0, or an exit status. */
static int read_devices(struct notify_cli *c)
{
    unsigned char *data = NULL;
    size_t len = 0;
    char *line, *save = NULL;
    int rc = !strcmp(c->devices_file, "-") ? read_stdin(DEVICES_FILE_MAX, &data, &len)
                                            : cmg_pki_read_file(c->devices_file,
                                                                DEVICES_FILE_MAX, &data, &len);

    if (rc < 0) {
        fprintf(stderr, "cmg site notify: --devices: cannot read %s (at most %u bytes)\n",
                c->devices_file, DEVICES_FILE_MAX);
        return 1;
    }
    if (!cJSON_GetObjectItemCaseSensitive(c->args, "devices"))
        cJSON_AddArrayToObject(c->args, "devices");
    for (line = strtok_r((char *)data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        size_t n;
        while (*line == ' ' || *line == '\t')
            line++;
        n = strlen(line);
        while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
            line[--n] = 0;
        if (n && *line != '#')
            add_device(c->args, line);
    }
    free(data);
    return 0;
}

enum { O_DEVICE = 256, O_DEVICES, O_ALL, O_TYPE, O_DATA, O_TTL, O_RESEND, O_MISSED, O_JSON,
       O_API, O_TOKEN, O_CA, O_SITE, O_HELP };

static const struct option opts[] = {
    {"device", required_argument, NULL, O_DEVICE}, {"devices", required_argument, NULL, O_DEVICES},
    {"all", no_argument, NULL, O_ALL},             {"type", required_argument, NULL, O_TYPE},
    {"data", required_argument, NULL, O_DATA},     {"ttl", required_argument, NULL, O_TTL},
    {"resend", required_argument, NULL, O_RESEND}, {"missed", no_argument, NULL, O_MISSED},
    {"json", no_argument, NULL, O_JSON},           {"api", required_argument, NULL, O_API},
    {"admin-token", required_argument, NULL, O_TOKEN},
    {"token", required_argument, NULL, O_TOKEN},   {"ca", required_argument, NULL, O_CA},
    {"site", required_argument, NULL, O_SITE},     {"dir", required_argument, NULL, O_SITE},
    {"help", no_argument, NULL, O_HELP},           {NULL, 0, NULL, 0}};

static int option(struct notify_cli *c, int ch)
{
    cJSON *data;

    switch (ch) {
    case O_DEVICE: add_device(c->args, optarg); break;
    case O_DEVICES: c->devices_file = optarg; break;
    case O_ALL: cJSON_AddTrueToObject(c->args, "all"); break;
    case O_TYPE: cJSON_AddStringToObject(c->args, "type", optarg); break;
    case O_DATA:
        if (!(data = cJSON_Parse(optarg)))
            return usage_error("--data: a JSON value expected ('{\"k\":1}', '\"text\"', 3, ...)");
        cJSON_AddItemToObject(c->args, "data", data);
        break;
    case O_TTL: cJSON_AddStringToObject(c->args, "ttl", optarg); break;
    case O_RESEND: cJSON_AddStringToObject(c->args, "id", optarg); break;
    case O_MISSED: cJSON_AddTrueToObject(c->args, "missed"); break;
    case O_JSON: c->json = true; break;
    case O_API: c->t.api = optarg; break;
    case O_TOKEN: c->t.token_file = optarg; break;
    case O_CA: c->t.ca_file = optarg; break;
    case O_SITE: c->t.dir = optarg; break;
    case O_HELP: case 'h': c->help = true; break;
    default: return 2;
    }
    return 0;
}

/* The positional words: DIR, the verb (status, list) and status's ID. */
static int positional(struct notify_cli *c, const char *w)
{
    if (!c->t.dir && cmg_site_admin_is_site_dir(w))
        c->t.dir = w;
    else if (!c->verb && (!strcmp(w, "status") || !strcmp(w, "list")))
        c->verb = w;
    else if (c->verb && !strcmp(c->verb, "status") && !c->id)
        c->id = w;
    else
        return usage_error("unexpected argument (is the site directory right?)");
    return 0;
}

static int parse(struct notify_cli *c, int argc, char **argv)
{
    int ch, rc;

    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1)
        if ((rc = option(c, ch)) != 0)
            return rc;
    for (int i = optind; i < argc; i++)
        if ((rc = positional(c, argv[i])) != 0)
            return rc;
    return 0;
}

static const char *str(const cJSON *r, const char *name)
{
    const char *s = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(r, name));
    return s ? s : "";
}

static double num(const cJSON *r, const char *name)
{
    return cJSON_GetNumberValue(cJSON_GetObjectItemCaseSensitive(r, name));
}

static void show_sent(const cJSON *r)
{
    const cJSON *targets = cJSON_GetObjectItemCaseSensitive(r, "targets");

    if (cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(r, "id"))) {
        puts(str(r, "note"));
        return;
    }
    if (cJSON_IsString(targets))
        printf("notification %s: all devices", str(r, "id"));
    else
        printf("notification %s: %.0f device(s)", str(r, "id"), cJSON_GetNumberValue(targets));
    if (*str(r, "resend_of"))
        printf(" (resend of %s)", str(r, "resend_of"));
    putchar('\n');
}

static void show_status(const cJSON *r)
{
    printf("notification %s (%s): %.0f delivered, %.0f waiting, %.0f expired of %.0f device(s)\n",
           str(r, "id"), str(r, "type"), num(r, "delivered"), num(r, "waiting"),
           num(r, "expired"), num(r, "targets"));
}

static void show_list(const cJSON *r)
{
    const cJSON *row;

    puts("id\ttype\tcreated\texpires\ttargets\tdelivered\twaiting\texpired");
    cJSON_ArrayForEach(row, r)
        printf("%s\t%s\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\t%.0f\n", str(row, "id"), str(row, "type"),
               num(row, "created"), num(row, "expires"), num(row, "targets"),
               num(row, "delivered"), num(row, "waiting"), num(row, "expired"));
}

/* The operation the words and flags name, or NULL with the exit status in *rc. */
static const char *op_of(struct notify_cli *c, int *rc)
{
    bool resend = cJSON_GetObjectItemCaseSensitive(c->args, "id") != NULL;

    *rc = 0;
    if (c->verb && !strcmp(c->verb, "list"))
        return "notify.list";
    if (c->verb) {
        if (!c->id) {
            *rc = usage_error("status: the notification's ID is needed");
            return NULL;
        }
        cJSON_AddStringToObject(c->args, "id", c->id);
        return "notify.status";
    }
    if (resend && (c->devices_file || cJSON_GetObjectItemCaseSensitive(c->args, "devices") ||
                   cJSON_GetObjectItemCaseSensitive(c->args, "all") ||
                   cJSON_GetObjectItemCaseSensitive(c->args, "type") ||
                   cJSON_GetObjectItemCaseSensitive(c->args, "data"))) {
        *rc = usage_error("--resend ID takes its targets, type and data from ID: no --device, "
                          "--devices, --all, --type or --data with it");
        return NULL;
    }
    if (resend && !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c->args, "missed"))) {
        *rc = usage_error("--resend ID needs --missed (a resend goes to the targets that have "
                          "not had it)");
        return NULL;
    }
    if (c->devices_file && (*rc = read_devices(c)) != 0)
        return NULL;
    return resend ? "notify.resend" : "notify";
}

static void print_result(const struct notify_cli *c, const char *op, const cJSON *r)
{
    if (c->json) {
        char *s = cJSON_PrintUnformatted(r);
        puts(s ? s : "null");
        free(s);
    } else if (!strcmp(op, "notify.status")) {
        show_status(r);
    } else if (!strcmp(op, "notify.list")) {
        show_list(r);
    } else {
        show_sent(r);
    }
}

int cmg_site_notify_main(int argc, char **argv)
{
    struct notify_cli c = {.t.prog = "cmg site notify", .args = cJSON_CreateObject()};
    cJSON *result = NULL;
    const char *op = NULL;
    int rc = parse(&c, argc, argv);

    if (rc != 0 || c.help) {
        if (c.help && rc == 0)
            fputs(usage, stdout);
        goto out;
    }
    if (!(op = op_of(&c, &rc)))
        goto out;
    if (!c.t.api && !c.t.dir)
        c.t.dir = getenv("CMG_SITE_DIR") ? getenv("CMG_SITE_DIR") : ".";
    if ((rc = cmg_site_admin_run(&c.t, op, c.args, &result)) != 0)
        goto out;
    print_result(&c, op, result);
    if (!c.t.api && (!strcmp(op, "notify") || !strcmp(op, "notify.resend")) &&
        !cmg_site_serve_running(c.t.dir))
        fputs("recorded; sent when the site service runs (it is not running now)\n", stderr);
out:
    cJSON_Delete(result);
    cJSON_Delete(c.args);
    return rc;
}
