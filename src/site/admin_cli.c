/* The site's admin commands: cmg site mapping|token|device|cert|oidc ... They act
 * on the site directory directly (SQLite allows it while 'cmg site serve' runs; the
 * server notices the change and publishes a new policy within a second). Each
 * command turns its flags into the JSON arguments of an operation in ops.c. */
#include "site/admin_cli.h"

#include "client/fetch.h"
#include "site/alerts.h"
#include "site/oidc_refresh.h"
#include "site/ops.h"
#include "site/pki.h"
#include "site/serve.h"
#include "site/status.h"

#include <openssl/crypto.h>

#include <getopt.h>
#include <openssl/bn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>


struct cli {
    const char *prog;          /* "cmg site mapping add" */
    const char *dir;
    const char *api;           /* the admin API of a running site, instead of DIR */
    const char *token_file;
    const char *ca_file;       /* --ca: the site CA, for --api */
    const char *subject;       /* the positional argument that is not the site */
    const char *subject2;      /* a second one ('cert renew connector NAME') */
    bool json;
    cJSON *args;
};

static const char usage[] =
    "usage: cmg site <area> <command> [DIR] [options]\n"
    "\n"
    "Administration of the site in DIR (default: $CMG_SITE_DIR, else the current\n"
    "directory). Changes are published to every gateway within seconds when\n"
    "'cmg site serve DIR' runs; one made while it does not run (no service holds\n"
    "DIR/serve.lock) says 'recorded; published when the site service runs (it is not\n"
    "running now)' instead of 'done'. Add --json to any command for JSON output.\n"
    "With --api https://HOST:PORT the command goes to the admin API of a running\n"
    "site instead (its certificate checked against DIR/ca.crt or --ca FILE),\n"
    "authenticated by DIR/admin.token or --admin-token FILE.\n"
    "\n"
    "  mapping add --type mp|sup|site --url URL [--role ID] [--auth cert,token,oidc]\n"
    "              [--max-body BYTES] [--forward-authorization | --no-forward-authorization]\n"
    "                                     publish an internal server (a new role id\n"
    "                                     unless --role; auth default: cert,token,oidc,\n"
    "                                     or token for type site; max body default\n"
    "                                     1 GiB); the device's Authorization header\n"
    "                                     reaches it only with --forward-authorization\n"
    "                                     (the default for type site only)\n"
    "  mapping list                       the published mappings\n"
    "  mapping remove ROLE                stop publishing a role\n"
    "  token bulk create [--lifetime 3d] [--description TEXT]\n"
    "                                     a bulk registration token (3 days by default,\n"
    "                                     7 at most; d, h, m or s); prints its GUID, its\n"
    "                                     expiry, and the token on the last line\n"
    "  token bulk list                    bulk tokens by GUID and lifetime (the tokens\n"
    "                                     themselves are not kept)\n"
    "  token bulk block|unblock GUID      refuse / accept a bulk token again\n"
    "  device list                        registered devices\n"
    "  device block|unblock ID            refuse / accept a device: a registered\n"
    "                                     device id, a certificate device by name or\n"
    "                                     SHA-256 thumbprint, or oidc:ID (an OIDC oid,\n"
    "                                     deviceid or user name)\n"
    "  cert issue --device NAME [--out DIR]\n"
    "                                     a client certificate from the site CA (for\n"
    "                                     labs), written to DIR/devices/NAME.crt, .key\n"
    "  cert revoke SERIAL | --serial HEX | --cert FILE | --device NAME\n"
    "                                     (SERIAL as 'openssl x509 -serial' prints it)\n"
    "                                     put a certificate of this site into the CRL\n"
    "                                     (a connector's: that connector is revoked)\n"
    "  cert list [--revoked]              everything the site issued or holds, with\n"
    "                                     its end: CA, site channel, gateway, each\n"
    "                                     connector, devices, signing keys, and when a\n"
    "                                     renewal replaced one (--revoked: the revoked\n"
    "                                     certificates)\n"
    "  cert renew gateway [NAME] | connector NAME [--out DIR] | site\n"
    "                                     a new pair from the site CA (same subject,\n"
    "                                     names and usages, a new key and validity)\n"
    "                                     written over the files the role reads:\n"
    "                                     DIR/gateway.crt, .key (NAME, if given, is the\n"
    "                                     service name), DIR/connectors/NAME.crt, .key\n"
    "                                     (DIR/connector.crt for the first connector;\n"
    "                                     --out DIR if 'connector add' had it),\n"
    "                                     DIR/site.crt, .key; the previous pair is kept\n"
    "                                     as *.crt.old, *.key.old and stays valid, shown\n"
    "                                     replaced by 'cert list', until it expires or\n"
    "                                     is revoked; the role takes the new pair on\n"
    "                                     SIGHUP (systemctl reload), no connection lost\n"
    "  cert check-revocation [on|off]     show or set whether gateways check the CRL\n"
    "                                     (also: cert revocation [on|off])\n"
    "  oidc set --discovery URL | --issuer URL --jwks FILE|URL\n"
    "           --audience AUD [--audience AUD]... [--tenant ID] [--ca FILE]\n"
    "                                     accept Entra ID / OIDC tokens of this issuer:\n"
    "                                     its keys from its discovery document\n"
    "                                     (.../.well-known/openid-configuration, which\n"
    "                                     names the issuer and jwks_uri) or a JWKS URL,\n"
    "                                     refreshed by 'site serve' (site.conf\n"
    "                                     oidc_refresh), or a JWKS file, never refreshed;\n"
    "                                     --ca: the CA of a private provider's HTTPS\n"
    "                                     (with --api, the site is checked against\n"
    "                                     DIR/ca.crt then)\n"
    "  oidc show | oidc clear\n"
    "  connector add NAME [--out DIR]     a certificate for one more connector, for the\n"
    "                                     tunnels and the site feed only, written to\n"
    "                                     DIR/connectors/NAME.crt, .key (put them in its\n"
    "                                     connector.conf as cert and key)\n"
    "  connector list                     connectors by name, serial, expiry, revocation\n"
    "  connector revoke NAME              refuse a connector: gateways close its tunnels\n"
    "                                     and refuse its handshakes once the policy\n"
    "                                     arrives; the site refuses it at once\n"
    "  key rotate                         a new signing key (with a new kid), announced\n"
    "                                     by the current one in every policy: gateways\n"
    "                                     and connectors pinning an older key follow\n"
    "                                     the announcements; device tokens signed by\n"
    "                                     the old key stay valid until they expire.\n"
    "                                     'site serve' rotates by itself when the key\n"
    "                                     is older than key_rotation (site.conf,\n"
    "                                     default 180d; 0: never)\n"
    "  alert list                         thresholds, the webhook and the open alerts\n"
    "  alert set egress-monthly SIZE [--warning PCT] [--critical PCT]\n"
    "  alert set egress-daily SIZE [--warning PCT] [--critical PCT]\n"
    "                                     the egress allowance of a calendar month / a\n"
    "                                     day (UTC), all gateway instances together:\n"
    "                                     100GiB, 500GB, bytes (B, KB/MB/GB/TB by 1000,\n"
    "                                     KiB/MiB/GiB/TiB by 1024); a warning at PCT %\n"
    "                                     (default 50), critical at PCT % (default 90),\n"
    "                                     both shared by the two allowances\n"
    "  alert set cert-expiry DAYS         warn of certificates ending within DAYS\n"
    "                                     (default 30; critical within 7; 0: off)\n"
    "  alert set no-tunnel DURATION       a connector or gateway instance with no tunnel\n"
    "                                     up for longer: 30s, 10m, 1h, a bare number of\n"
    "                                     minutes (default 10m; 0: off)\n"
    "  alert unset NAME                   back to the default (egress: no allowance)\n"
    "  alert webhook URL [--ca FILE] | alert webhook --off\n"
    "                                     POST each alert opened, raised or resolved as\n"
    "                                     JSON to URL (http:// or https://, checked\n"
    "                                     against the system's roots or --ca FILE)\n";

static const char status_usage[] =
    "usage: cmg site status [DIR] [--json] [--api https://HOST:PORT [--admin-token FILE]\n"
    "                       [--ca FILE]]\n"
    "\n"
    "What the deployment of the site in DIR (default: $CMG_SITE_DIR, else the current\n"
    "directory) is doing, from the reports gateways send through their connectors to\n"
    "'cmg site serve' every report_interval (300 s by default), on one screen:\n"
    "  - the tunnels: each gateway instance x each connector, its state (the\n"
    "    connector's view; the gateway's when that is newer and disagrees, or when\n"
    "    the connector's report is stale;\n"
    "    unknown when neither reports), since when, and the round-trip time;\n"
    "  - each gateway instance's state, policy version, last report's age (STALE when\n"
    "    older than 2 of its report intervals), devices connected, and each\n"
    "    connector's last report;\n"
    "  - requests and bytes today and this month (UTC), and egress (bytes sent to\n"
    "    devices) against the limits of 'cmg site alert' (\"no monthly limit set\"\n"
    "    when none);\n"
    "  - certificates ending within cert_expiry_days (30 by default; expired ones too);\n"
    "  - open alerts.\n"
    "\"no report yet\" says that nothing has reported, and what to check.\n"
    "--json prints the same as a JSON document (docs/site.md names its fields).\n"
    "With --api the document comes from the admin API of a running site (its\n"
    "certificate checked against DIR/ca.crt or --ca FILE, authenticated by\n"
    "DIR/admin.token or --admin-token FILE).\n"
    "Exit status: 0 when the document was made, whatever it says; 1 on an error (the\n"
    "reason on stderr); 2 on a usage error.\n";

static int usage_error(const struct cli *c, const char *msg)
{
    fprintf(stderr, "%s: %s\n\n%s", c->prog, msg, usage);
    return 2;
}

bool cmg_site_admin_is_site_dir(const char *d)
{
    char path[4096];
    struct stat st;

    snprintf(path, sizeof(path), "%s/site.conf", d);
    return stat(path, &st) == 0;
}

static void iso_time(double t, char *out, size_t len)
{
    time_t tt = (time_t)t;
    struct tm tm;

    gmtime_r(&tt, &tm);
    strftime(out, len, "%Y-%m-%dT%H:%M:%SZ", &tm);
}

/* Prints an array of objects as a table of the given columns. */
static void print_table(const cJSON *arr, const char *const *cols, size_t ncols)
{
    const cJSON *row;

    for (size_t i = 0; i < ncols; i++)
        printf("%s%s", i ? "\t" : "", cols[i]);
    putchar('\n');
    cJSON_ArrayForEach(row, arr) {
        for (size_t i = 0; i < ncols; i++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(row, cols[i]);
            char t[64];
            fputs(i ? "\t" : "", stdout);
            if (cJSON_IsString(v))
                fputs(v->valuestring, stdout);
            else if (cJSON_IsNumber(v) && v->valuedouble > 1e9 && v->valuedouble < 1e11 &&
                     (strstr(cols[i], "expires") || strstr(cols[i], "created") ||
                      strstr(cols[i], "registered") || strstr(cols[i], "issued") ||
                      !strcmp(cols[i], "revoked") || !strcmp(cols[i], "replaced") ||
                      !strcmp(cols[i], "opened") || !strcmp(cols[i], "last_seen"))) {
                iso_time(v->valuedouble, t, sizeof(t));
                fputs(t, stdout);
            } else if (cJSON_IsNumber(v))
                printf("%.0f", v->valuedouble);
            else if (cJSON_IsBool(v))
                fputs(cJSON_IsTrue(v) ? "yes" : "no", stdout);
            else
                fputs("-", stdout);
        }
        putchar('\n');
    }
}

/* The operation through the admin API of a running site (--api URL). */
static int run_remote(struct cli *c, const char *op, cJSON **result)
{
    char url[1024], auth[256], path[4096], err[600], ca[4096];
    const char *headers[] = {auth, "Content-Type: application/json"};
    struct cmg_fetch_req req = {0};
    struct cmg_fetch_resp resp = {0};
    unsigned char *tok = NULL;
    size_t toklen = 0;
    char *body = cJSON_PrintUnformatted(c->args);
    cJSON *doc = NULL;
    int rc = 1;

    if (c->token_file)
        snprintf(path, sizeof(path), "%s", c->token_file);
    else
        snprintf(path, sizeof(path), "%s/%s", c->dir ? c->dir : ".", CMG_SITE_ADMIN_TOKEN);
    if (cmg_pki_read_file(path, 1024, &tok, &toklen) < 0) {
        fprintf(stderr, "%s: the admin token: cannot read %s (--admin-token FILE)\n", c->prog,
                path);
        goto out;
    }
    while (toklen && (tok[toklen - 1] == '\n' || tok[toklen - 1] == '\r'))
        toklen--;
    snprintf(auth, sizeof(auth), "Authorization: Bearer %.*s", (int)toklen, (const char *)tok);
    snprintf(url, sizeof(url), "%s/v1/ops/%s", c->api, op);
    if (c->ca_file)
        snprintf(ca, sizeof(ca), "%s", c->ca_file);
    else
        snprintf(ca, sizeof(ca), "%s/ca.crt", c->dir ? c->dir : ".");
    req.url = url;
    req.ca_file = ca;
    req.method = "POST";
    req.headers = headers;
    req.n_headers = 2;
    req.body = body;
    req.body_len = body ? strlen(body) : 0;
    if (cmg_fetch(&req, &resp, err, sizeof(err)) != CMG_FETCH_OK) {
        fprintf(stderr, "%s: %s\n", c->prog, err);
        goto out;
    }
    doc = resp.body ? cJSON_ParseWithLength(resp.body, resp.body_len) : NULL;
    if (resp.status != 200) {
        const char *why = cJSON_GetStringValue(cJSON_GetObjectItem(doc, "error"));
        fprintf(stderr, "%s: %d %s\n", c->prog, resp.status, why ? why : "from the admin API");
        rc = resp.status == 400 ? 2 : 1;
        goto out;
    }
    *result = doc;
    doc = NULL;
    rc = 0;
out:
    cJSON_Delete(doc);
    cmg_fetch_resp_free(&resp);
    if (tok)
        OPENSSL_cleanse(tok, toklen);
    free(tok);
    free(body);
    return rc;
}

static int run(struct cli *c, const char *op, cJSON **result)
{
    struct cmg_site_ctx s;
    char err[600], msg[600];
    int rc;

    if (c->api)
        return run_remote(c, op, result);
    if (!c->dir)
        c->dir = getenv("CMG_SITE_DIR") ? getenv("CMG_SITE_DIR") : ".";
    if (cmg_site_open(c->dir, &s, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s: %s\n", c->prog, err);
        return 1;
    }
    rc = cmg_site_op_run(&s, op, c->args, result, msg, sizeof(msg));
    cmg_site_close(&s);
    if (rc != 0) {
        fprintf(stderr, "%s: %s\n", c->prog, msg);
        return rc == 400 ? 2 : 1;
    }
    return 0;
}

int cmg_site_admin_run(const struct cmg_site_admin_target *t, const char *op, cJSON *args,
                       cJSON **result)
{
    struct cli c = {.prog = t->prog, .dir = t->dir, .api = t->api, .token_file = t->token_file,
                    .ca_file = t->ca_file, .args = args};

    return run(&c, op, result);
}

#define NOT_PUBLISHED "recorded; published when the site service runs (it is not running now)"

static void show_done(const cJSON *r);

/* "WORD: {result}", and the note the result may carry. */
static void print_done(const cJSON *r, const char *word)
{
    char *s = cJSON_PrintUnformatted(r);
    const char *note = cJSON_GetStringValue(cJSON_GetObjectItem(r, "note"));
    printf("%s: %s\n", word, s ? s : "");
    if (note)
        printf("note: %s\n", note);
    free(s);
}

/* Whether op may change the store (what is not a listing is taken to). */
static bool changes_store(const struct cli *c, const char *op)
{
    size_t n = strlen(op);

    if ((n > 5 && !strcmp(op + n - 5, ".list")) || !strcmp(op, "oidc.show") ||
        !strcmp(op, "status") || !strcmp(op, "traffic") ||
        !strncmp(op, "alert.", 6) ||   /* read by 'site serve' as they are: no policy */
        !strcmp(op, "cert.renew"))   /* files and a record: nothing to publish */
        return false;
    return strcmp(op, "cert.revocation") || cJSON_GetObjectItem(c->args, "check_revocation");
}

/* Runs op and prints its result: JSON with --json, else as show() says. A change
 * made in the store while no 'site serve' runs on it (its lock is free) is said to
 * be recorded, not done: nothing publishes it until the service starts. */
static int run_print(struct cli *c, const char *op, void (*show)(const cJSON *r))
{
    cJSON *r = NULL;
    int rc = run(c, op, &r);
    bool unpublished = rc == 0 && !c->api && changes_store(c, op) &&
                       !cmg_site_serve_running(c->dir);

    if (rc == 0) {
        if (c->json) {
            char *s = cJSON_Print(r);
            puts(s ? s : "null");
            free(s);
            if (unpublished)
                fprintf(stderr, "%s\n", NOT_PUBLISHED);
        } else if (unpublished && show == show_done) {
            print_done(r, NOT_PUBLISHED);
        } else {
            if (unpublished)   /* first: what a script reads last stays where it was */
                puts(NOT_PUBLISHED);
            show(r);
        }
    }
    cJSON_Delete(r);
    return rc;
}

static void show_mappings(const cJSON *r)
{
    static const char *const cols[] = {"role", "type", "auth", "max_body",
                                       "forward_authorization", "url"};
    print_table(r, cols, 6);
}

static void show_mapping(const cJSON *r)
{
    printf("mapped role %s (%s, auth %s, max body %.0f, Authorization %s) to %s\n",
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "role")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "type")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "auth")),
           cJSON_GetNumberValue(cJSON_GetObjectItem(r, "max_body")),
           cJSON_IsTrue(cJSON_GetObjectItem(r, "forward_authorization")) ? "forwarded"
                                                                         : "not forwarded",
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "url")));
}

static void show_bulk(const cJSON *r)
{
    char t[64];
    iso_time(cJSON_GetNumberValue(cJSON_GetObjectItem(r, "expires")), t, sizeof(t));
    printf("GUID: %s\nExpires: %s\n%s\n", cJSON_GetStringValue(cJSON_GetObjectItem(r, "guid")),
           t, cJSON_GetStringValue(cJSON_GetObjectItem(r, "token")));
}

static void show_bulk_list(const cJSON *r)
{
    static const char *const cols[] = {"guid", "created", "expires", "blocked", "description"};
    print_table(r, cols, 5);
}

static void show_devices(const cJSON *r)
{
    static const char *const cols[] = {"id",        "name",    "registered", "token_expires",
                                       "blocked",   "last_seen", "channel", "thumbprint"};
    print_table(r, cols, 8);
}

static void show_key_rotated(const cJSON *r)
{
    printf("signing key rotated: key id %s, announced by key id %s (retired; tokens it "
           "signed stay valid until they expire)\n",
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "kid")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "previous")));
}

static void show_certs(const cJSON *r)
{
    static const char *const cols[] = {"kind",    "name",    "serial",  "issued",
                                       "expires", "revoked", "replaced"};
    const cJSON *row;
    size_t ncols = 6;

    cJSON_ArrayForEach(row, r)   /* the 'replaced' column once a renewal replaced one */
        if (cJSON_IsNumber(cJSON_GetObjectItemCaseSensitive(row, "replaced")))
            ncols = 7;
    print_table(r, cols, ncols);
}

static void show_done(const cJSON *r)
{
    print_done(r, "done");
}

static void show_cert(const cJSON *r)
{
    printf("issued certificate serial %s\n  certificate: %s\n  key:         %s\n",
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "serial")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "cert")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "key")));
}

static void show_renewed(const cJSON *r)
{
    char was[64];

    iso_time(cJSON_GetNumberValue(cJSON_GetObjectItem(r, "replaced_expires")), was, sizeof(was));
    printf("renewed the %s certificate of %s: serial %s, not after %s\n"
           "  certificate: %s\n  key:         %s\n"
           "the previous pair (serial %s, not after %s) is kept as\n  %s\n  %s\n"
           "and stays valid until it expires ('cmg site cert revoke %s' once every role "
           "has reloaded)\n"
           "next: %s\n",
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "kind")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "name")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "serial")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "not_after")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "cert")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "key")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "replaced_serial")), was,
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "previous_cert")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "previous_key")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "replaced_serial")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "next")));
}

static void show_connectors(const cJSON *r)
{
    static const char *const cols[] = {"name", "serial", "issued", "expires", "revoked"};
    print_table(r, cols, 5);
}

static void show_status(const cJSON *r)
{
    cmg_site_status_print(r, stdout);
}

static void show_connector(const cJSON *r)
{
    printf("issued connector %s, certificate serial %s\n  certificate: %s\n  key:         %s\n"
           "Put them in its connector.conf as 'cert =' and 'key ='.\n",
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "name")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "serial")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "cert")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "key")));
}

static void show_revocation(const cJSON *r)
{
    printf("client certificate revocation checking: %s\n",
           cJSON_IsTrue(cJSON_GetObjectItem(r, "check_revocation")) ? "on" : "off");
}

static void show_oidc(const cJSON *r)
{
    char *aud = cJSON_PrintUnformatted(cJSON_GetObjectItem(r, "audiences"));
    char *kids = cJSON_PrintUnformatted(cJSON_GetObjectItem(r, "kids"));
    const char *discovery = cJSON_GetStringValue(cJSON_GetObjectItem(r, "discovery"));
    const char *uri = cJSON_GetStringValue(cJSON_GetObjectItem(r, "jwks_uri"));

    if (!cJSON_GetObjectItem(r, "issuer"))
        puts("OIDC tokens: not accepted (no issuer set)");
    else
        printf("issuer: %s\ntenant: %s\naudiences: %s\n",
               cJSON_GetStringValue(cJSON_GetObjectItem(r, "issuer")),
               cJSON_GetStringValue(cJSON_GetObjectItem(r, "tenant")), aud ? aud : "[]");
    if (discovery && *discovery)
        printf("discovery: %s\n", discovery);
    if (uri)
        printf("keys from: %s\n", *uri ? uri : "a file (not refreshed)");
    if (kids)
        printf("key ids: %s\n", kids);
    free(aud);
    free(kids);
}

/* The serial of a PEM certificate file, in hex. */
static int serial_of(const char *file, char *out, size_t len)
{
    X509 *x = cmg_pki_load_cert(file);
    BIGNUM *bn = x ? ASN1_INTEGER_to_BN(X509_get_serialNumber(x), NULL) : NULL;
    char *hex = bn ? BN_bn2hex(bn) : NULL;
    int rc = hex ? 0 : -1;

    if (hex)
        snprintf(out, len, "%s", hex);
    OPENSSL_free(hex);
    BN_free(bn);
    X509_free(x);
    return rc;
}

/* The JWKS of a file, parsed. */
static cJSON *load_jwks_file(const struct cli *c, const char *src)
{
    unsigned char *data = NULL;
    size_t len = 0;
    cJSON *doc;

    if (cmg_pki_read_file(src, CMG_OIDC_DOC_MAX, &data, &len) < 0) {
        fprintf(stderr, "%s: cannot read %s (at most %d bytes)\n", c->prog, src,
                CMG_OIDC_DOC_MAX);
        return NULL;
    }
    doc = cJSON_ParseWithLength((const char *)data, len);
    free(data);
    if (!cJSON_IsObject(doc)) {
        fprintf(stderr, "%s: %s is not a JSON Web Key Set\n", c->prog, src);
        cJSON_Delete(doc);
        return NULL;
    }
    return doc;
}

/* oidc set: the keys, from a file, a JWKS URL or a discovery document (then the issuer
 * too), and where 'site serve' refreshes them from, into c->args. 0, or an exit status. */
static int oidc_keys_args(struct cli *c, const char *jwks, const char *discovery)
{
    struct cmg_oidc_source src = {.discovery = discovery, .jwks_uri = jwks};
    struct cmg_oidc_fetched f;
    unsigned char *ca = NULL;
    size_t ca_len = 0;
    char err[768];
    int rc = 1;

    if (!jwks == !discovery)
        return usage_error(c, "--discovery URL or --jwks FILE|URL is required (one of them)");
    if (c->ca_file && cmg_pki_read_file(c->ca_file, 1 << 20, &ca, &ca_len) < 0) {
        fprintf(stderr, "%s: --ca: cannot read %s\n", c->prog, c->ca_file);
        return 1;
    }
    src.ca_pem = (const char *)ca;
    src.issuer = cJSON_GetStringValue(cJSON_GetObjectItem(c->args, "issuer"));
    if (jwks && strncmp(jwks, "http://", 7) && strncmp(jwks, "https://", 8)) {
        cJSON *doc = ca ? NULL : load_jwks_file(c, jwks);
        if (ca)
            rc = usage_error(c, "--ca names the CA of a provider's HTTPS: --jwks is a file");
        else if (doc) {
            cJSON_AddItemToObject(c->args, "jwks", doc);
            cJSON_AddStringToObject(c->args, "source", jwks);
            rc = 0;
        }
        goto out;
    }
    if (cmg_oidc_fetch_keys(&src, &f, err, sizeof(err)) < 0) {
        fprintf(stderr, "%s: %s\n", c->prog, err);
        goto out;
    }
    if (f.issuer && !src.issuer)
        cJSON_AddStringToObject(c->args, "issuer", f.issuer);
    cJSON_AddItemToObject(c->args, "jwks", f.jwks);
    f.jwks = NULL;
    cJSON_AddStringToObject(c->args, "source", discovery ? discovery : jwks);
    cJSON_AddStringToObject(c->args, "jwks_uri", f.jwks_uri);
    if (discovery)
        cJSON_AddStringToObject(c->args, "discovery", discovery);
    if (ca)
        cJSON_AddStringToObject(c->args, "ca", (const char *)ca);
    cmg_oidc_fetched_free(&f);
    rc = 0;
out:
    free(ca);
    c->ca_file = NULL;   /* the provider's, not the site's for --api */
    return rc;
}

static void show_size(const char *label, const cJSON *v)
{
    if (!cJSON_IsNumber(v)) {
        printf("%-16s none\n", label);
        return;
    }
    printf("%-16s %.0f bytes", label, v->valuedouble);
    if (v->valuedouble >= 1024.0 * 1024 * 1024)
        printf(" (%.2f GiB)", v->valuedouble / (1024.0 * 1024 * 1024));
    putchar('\n');
}

static void show_alerts(const cJSON *r)
{
    static const char *const cols[] = {"id", "level", "kind", "subject", "opened", "message"};
    const cJSON *set = cJSON_GetObjectItem(r, "settings");
    const cJSON *open = cJSON_GetObjectItem(r, "alerts");
    const char *hook = cJSON_GetStringValue(cJSON_GetObjectItem(set, "webhook"));
    char origin[300];

    show_size("egress-monthly:", cJSON_GetObjectItem(set, "egress_monthly"));
    show_size("egress-daily:", cJSON_GetObjectItem(set, "egress_daily"));
    printf("%-16s warning at %.0f %%, critical at %.0f %%\n", "egress levels:",
           cJSON_GetNumberValue(cJSON_GetObjectItem(set, "warning_pct")),
           cJSON_GetNumberValue(cJSON_GetObjectItem(set, "critical_pct")));
    printf("%-16s %.0f days\n", "cert-expiry:",
           cJSON_GetNumberValue(cJSON_GetObjectItem(set, "cert_expiry_days")));
    printf("%-16s %.0f s\n", "no-tunnel:",
           cJSON_GetNumberValue(cJSON_GetObjectItem(set, "no_tunnel")));
    if (hook)
        cmg_alerts_url_origin(hook, origin, sizeof(origin));
    printf("%-16s %s%s\n", "webhook:", hook ? origin : "none", hook ? "/... (--json: all of it)"
                                                                   : "");
    if (!cJSON_GetArraySize(open)) {
        puts("open alerts:    none");
        return;
    }
    puts("open alerts:");
    print_table(open, cols, sizeof(cols) / sizeof(cols[0]));
}

/* alert webhook --ca FILE: the roots of the webhook's HTTPS, as PEM text (not the
 * site's CA for --api). 0, or an exit status. */
static int webhook_ca_arg(struct cli *c)
{
    unsigned char *pem = NULL;
    size_t len = 0;

    if (!c->ca_file)
        return 0;
    if (cmg_pki_read_file(c->ca_file, 256 * 1024, &pem, &len) < 0) {
        fprintf(stderr, "%s: --ca: cannot read %s\n", c->prog, c->ca_file);
        return 1;
    }
    cJSON_AddStringToObject(c->args, "ca", (const char *)pem);
    free(pem);
    c->ca_file = NULL;
    return 0;
}

enum {
    O_ROLE = 256, O_TYPE, O_URL, O_AUTH, O_MAX_BODY, O_LIFETIME, O_DESC, O_DEVICE, O_OUT,
    O_SERIAL, O_CERT, O_REVOKED, O_ISSUER, O_TENANT, O_AUDIENCE, O_JWKS, O_JSON, O_SITE, O_HELP,
    O_API, O_ADMIN_TOKEN, O_FORWARD_AUTH, O_NO_FORWARD_AUTH, O_CA, O_DISCOVERY, O_WARNING,
    O_CRITICAL, O_OFF
};

static const struct option long_opts[] = {
    {"role", required_argument, NULL, O_ROLE},       {"type", required_argument, NULL, O_TYPE},
    {"role-id", required_argument, NULL, O_ROLE},
    {"role-type", required_argument, NULL, O_TYPE},
    {"max_body", required_argument, NULL, O_MAX_BODY},
    {"url", required_argument, NULL, O_URL},
    {"internal-url", required_argument, NULL, O_URL},
    {"auth", required_argument, NULL, O_AUTH},
    {"max-body", required_argument, NULL, O_MAX_BODY},
    {"lifetime", required_argument, NULL, O_LIFETIME},
    {"description", required_argument, NULL, O_DESC},
    {"device", required_argument, NULL, O_DEVICE},   {"out", required_argument, NULL, O_OUT},
    {"serial", required_argument, NULL, O_SERIAL},   {"cert", required_argument, NULL, O_CERT},
    {"revoked", no_argument, NULL, O_REVOKED},
    {"issuer", required_argument, NULL, O_ISSUER},
    {"tenant", required_argument, NULL, O_TENANT},
    {"audience", required_argument, NULL, O_AUDIENCE},
    {"jwks", required_argument, NULL, O_JWKS},       {"json", no_argument, NULL, O_JSON},
    {"discovery", required_argument, NULL, O_DISCOVERY},
    {"site", required_argument, NULL, O_SITE},       {"dir", required_argument, NULL, O_SITE},
    {"api", required_argument, NULL, O_API},
    {"admin-token", required_argument, NULL, O_ADMIN_TOKEN},
    {"forward-authorization", no_argument, NULL, O_FORWARD_AUTH},
    {"no-forward-authorization", no_argument, NULL, O_NO_FORWARD_AUTH},
    {"ca", required_argument, NULL, O_CA},
    {"warning", required_argument, NULL, O_WARNING},
    {"critical", required_argument, NULL, O_CRITICAL},
    {"off", no_argument, NULL, O_OFF},
    {"help", no_argument, NULL, O_HELP},             {NULL, 0, NULL, 0}};

/* Parses options into c->args (by name), the site directory and one subject. */
static int parse(struct cli *c, int argc, char **argv, const char **jwks,
                 const char **discovery, bool *help)
{
    cJSON *aud = NULL;
    int ch;

    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", long_opts, NULL)) != -1) {
        switch (ch) {
        case O_ROLE: cJSON_AddStringToObject(c->args, "role", optarg); break;
        case O_TYPE: cJSON_AddStringToObject(c->args, "type", optarg); break;
        case O_URL: cJSON_AddStringToObject(c->args, "url", optarg); break;
        case O_AUTH: cJSON_AddStringToObject(c->args, "auth", optarg); break;
        case O_MAX_BODY: cJSON_AddStringToObject(c->args, "max_body", optarg); break;
        case O_LIFETIME: cJSON_AddStringToObject(c->args, "lifetime", optarg); break;
        case O_DESC: cJSON_AddStringToObject(c->args, "description", optarg); break;
        case O_DEVICE: cJSON_AddStringToObject(c->args, "device", optarg); break;
        case O_OUT: cJSON_AddStringToObject(c->args, "out", optarg); break;
        case O_SERIAL: cJSON_AddStringToObject(c->args, "serial", optarg); break;
        case O_CERT: {
            char serial[256];
            unsigned char *pem = NULL;
            size_t pem_len = 0;
            if (serial_of(optarg, serial, sizeof(serial)) < 0 ||
                cmg_pki_read_file(optarg, 1 << 20, &pem, &pem_len) < 0)
                return usage_error(c, "--cert: not a PEM certificate");
            cJSON_AddStringToObject(c->args, "serial", serial);
            /* the certificate itself: one the site issued but never listed can be revoked */
            cJSON_AddItemToObject(c->args, "pem", cJSON_CreateString((const char *)pem));
            free(pem);
            break;
        }
        case O_FORWARD_AUTH: cJSON_AddTrueToObject(c->args, "forward_authorization"); break;
        case O_NO_FORWARD_AUTH: cJSON_AddFalseToObject(c->args, "forward_authorization"); break;
        case O_REVOKED: cJSON_AddTrueToObject(c->args, "revoked"); break;
        case O_ISSUER: cJSON_AddStringToObject(c->args, "issuer", optarg); break;
        case O_TENANT: cJSON_AddStringToObject(c->args, "tenant", optarg); break;
        case O_AUDIENCE:
            if (!aud)
                aud = cJSON_AddArrayToObject(c->args, "audience");
            cJSON_AddItemToArray(aud, cJSON_CreateString(optarg));
            break;
        case O_JWKS: *jwks = optarg; break;
        case O_DISCOVERY: *discovery = optarg; break;
        case O_JSON: c->json = true; break;
        case O_SITE: c->dir = optarg; break;
        case O_API: c->api = optarg; break;
        case O_ADMIN_TOKEN: c->token_file = optarg; break;
        case O_CA: c->ca_file = optarg; break;
        case O_WARNING: cJSON_AddStringToObject(c->args, "warning", optarg); break;
        case O_CRITICAL: cJSON_AddStringToObject(c->args, "critical", optarg); break;
        case O_OFF: cJSON_AddTrueToObject(c->args, "off"); break;
        case O_HELP: case 'h': *help = true; break;
        default: return 2;
        }
    }
    for (int i = optind; i < argc; i++) {
        if (!c->dir && cmg_site_admin_is_site_dir(argv[i]))
            c->dir = argv[i];
        else if (!c->subject)
            c->subject = argv[i];
        else if (!c->subject2)
            c->subject2 = argv[i];
        else
            return usage_error(c, "too many arguments");
    }
    return 0;
}

/* The table of commands: words, operation, name of the subject argument, printer. */
struct command {
    const char *area, *verb;
    const char *op;
    const char *subject;       /* args key the positional argument fills, or NULL */
    void (*show)(const cJSON *r);
};

/* The args key of a second positional argument, or NULL: 'cert renew connector NAME'. */
static const char *second_subject(const struct command *cmd)
{
    return !strcmp(cmd->op, "cert.renew") ? "name" : !strcmp(cmd->op, "alert.set") ? "value"
                                                                                  : NULL;
}

static const struct command commands[] = {
    {"mapping", "add", "mapping.add", NULL, show_mapping},
    {"mapping", "list", "mapping.list", NULL, show_mappings},
    {"mapping", "remove", "mapping.remove", "role", show_done},
    {"token bulk", "create", "bulk.create", NULL, show_bulk},
    {"token bulk", "list", "bulk.list", NULL, show_bulk_list},
    {"token bulk", "block", "bulk.block", "guid", show_done},
    {"token bulk", "unblock", "bulk.block", "guid", show_done},
    {"device", "list", "device.list", NULL, show_devices},
    {"device", "block", "device.block", "id", show_done},
    {"device", "unblock", "device.block", "id", show_done},
    {"cert", "issue", "cert.issue", "device", show_cert},
    {"cert", "revoke", "cert.revoke", "serial", show_done},
    {"cert", "list", "cert.list", NULL, show_certs},
    {"cert", "renew", "cert.renew", "kind", show_renewed},
    {"cert", "check-revocation", "cert.revocation", "check_revocation", show_revocation},
    {"cert", "revocation-check", "cert.revocation", "check_revocation", show_revocation},
    {"cert", "revocation", "cert.revocation", "check_revocation", show_revocation},
    {"oidc", "set", "oidc.set", NULL, show_oidc},
    {"oidc", "show", "oidc.show", NULL, show_oidc},
    {"oidc", "clear", "oidc.clear", NULL, show_done},
    {"connector", "add", "connector.add", "name", show_connector},
    {"connector", "list", "connector.list", NULL, show_connectors},
    {"connector", "revoke", "connector.revoke", "name", show_done},
    {"key", "rotate", "key.rotate", NULL, show_key_rotated},
    {"alert", "list", "alert.list", NULL, show_alerts},
    {"alert", "set", "alert.set", "name", show_alerts},
    {"alert", "unset", "alert.unset", "name", show_alerts},
    {"alert", "webhook", "alert.webhook", "url", show_alerts},
};

static const struct command status_command = {"status", "", "status", NULL, show_status};

static int run_command(const struct command *cmd, int argc, char **argv)
{
    struct cli c = {0};
    const char *jwks = NULL, *discovery = NULL;
    char prog[128];
    bool help = false;
    int rc;

    snprintf(prog, sizeof(prog), "cmg site %s%s%s", cmd->area, *cmd->verb ? " " : "",
             cmd->verb);
    c.prog = prog;
    c.args = cJSON_CreateObject();
    rc = parse(&c, argc, argv, &jwks, &discovery, &help);
    if (rc != 0 || help) {
        fputs(cmd == &status_command ? status_usage : usage, help && rc == 0 ? stdout : stderr);
        goto out;
    }
    if (cmd == &status_command && c.subject && !c.dir && !c.subject2) {
        c.dir = c.subject;   /* not a site directory: opening it says why */
        c.subject = NULL;
    }
    if ((c.subject && !cmd->subject) || (c.subject2 && !second_subject(cmd))) {
        rc = usage_error(&c, c.subject2 ? "too many arguments"
                                        : "unexpected argument (is the site directory right?)");
        goto out;
    }
    if (c.subject2)
        cJSON_AddStringToObject(c.args, second_subject(cmd), c.subject2);
    if (c.subject && !strcmp(cmd->subject, "check_revocation")) {
        bool on = !strcmp(c.subject, "on") || !strcmp(c.subject, "true") ||
                  !strcmp(c.subject, "yes") || !strcmp(c.subject, "1");
        if (!on && strcmp(c.subject, "off") && strcmp(c.subject, "false") &&
            strcmp(c.subject, "no") && strcmp(c.subject, "0")) {
            rc = usage_error(&c, "on or off");
            goto out;
        }
        cJSON_AddBoolToObject(c.args, "check_revocation", on);
    } else if (c.subject && !cJSON_GetObjectItem(c.args, cmd->subject))
        cJSON_AddStringToObject(c.args, cmd->subject, c.subject);
    if (!strcmp(cmd->verb, "unblock"))
        cJSON_AddFalseToObject(c.args, "blocked");
    if (!strcmp(cmd->op, "oidc.set") && (rc = oidc_keys_args(&c, jwks, discovery)) != 0)
        goto out;
    if (!strcmp(cmd->op, "alert.webhook") && (rc = webhook_ca_arg(&c)) != 0)
        goto out;
    rc = run_print(&c, cmd->op, cmd->show);
out:
    cJSON_Delete(c.args);
    return rc;
}

int cmg_site_admin_main(int argc, char **argv)
{
    bool token = argc > 1 && !strcmp(argv[0], "token");
    const char *area = token ? "token bulk" : argv[0];
    int skip = token ? 2 : 1;

    if (!strcmp(argv[0], "status"))   /* one word: no verb */
        return run_command(&status_command, argc, argv);
    if (!strcmp(argv[0], "notify"))
        return cmg_site_notify_main(argc, argv);
    if (token && strcmp(argv[1], "bulk")) {
        fprintf(stderr, "cmg site token: only 'bulk' tokens are made by hand\n\n%s", usage);
        return 2;
    }
    if (argc <= skip || !strcmp(argv[skip], "--help") || !strcmp(argv[skip], "-h")) {
        fputs(usage, argc <= skip ? stderr : stdout);
        return argc <= skip ? 2 : 0;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(commands[i].area, area) && !strcmp(commands[i].verb, argv[skip]))
            return run_command(&commands[i], argc - skip, argv + skip);
    fprintf(stderr, "cmg site %s: unknown command '%s'\n\n%s", area, argv[skip], usage);
    return 2;
}

bool cmg_site_admin_area(const char *word)
{
    return !strcmp(word, "mapping") || !strcmp(word, "token") || !strcmp(word, "device") ||
           !strcmp(word, "cert") || !strcmp(word, "oidc") || !strcmp(word, "connector") ||
           !strcmp(word, "key") || !strcmp(word, "status") || !strcmp(word, "alert") ||
           !strcmp(word, "notify");
}
