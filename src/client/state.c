/* The client's state directory; see state.h. */
#include "client/state.h"

#include "site/pki.h"

#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <openssl/crypto.h>

#define STATE_JSON "device.json"
#define STATE_JSON_MAX (64 * 1024)
#define STATE_KEY "device.key"
#define STATE_CERT "device.crt"
#define STATE_CERT_DAYS 3650
#define STATE_CONFIG_DIR ".config/opencmg"
#define STATE_RECORD ".config/opencmg/client-state"
#define STATE_DEFAULT ".config/opencmg/client"

static const char *home_dir(void)
{
    const char *home = getenv("HOME");
    struct passwd *pw;

    if (home && *home)
        return home;
    pw = getpwuid(getuid());
    return pw && pw->pw_dir && *pw->pw_dir ? pw->pw_dir : NULL;
}

static int copy_path(char *out, size_t outlen, const char *a, const char *b)
{
    int n = b ? snprintf(out, outlen, "%s/%s", a, b) : snprintf(out, outlen, "%s", a);

    if (n < 0 || (size_t)n >= outlen) {
        fprintf(stderr, "cmg client: path too long: %s%s%s\n", a, b ? "/" : "", b ? b : "");
        return -1;
    }
    return 0;
}

int cmg_client_state_path(const char *dir, const char *name, char *out, size_t outlen)
{
    return copy_path(out, outlen, dir, name);
}

static int is_dir(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The directory recorded by the last register, or "" if none (or no longer there). */
static void recorded_dir(const char *home, char *dir, size_t dirlen)
{
    char path[PATH_MAX];
    FILE *fp;

    dir[0] = 0;
    if (copy_path(path, sizeof(path), home, STATE_RECORD) < 0)
        return;
    fp = fopen(path, "r");
    if (!fp)
        return;
    if (fgets(dir, (int)dirlen, fp)) {
        dir[strcspn(dir, "\r\n")] = 0;
        if (dir[0] != '/' || !is_dir(dir))
            dir[0] = 0;
    } else {
        dir[0] = 0;
    }
    fclose(fp);
}

int cmg_client_state_dir(const char *opt, char *dir, size_t dirlen)
{
    const char *env = getenv(CMG_CLIENT_STATE_ENV), *home;

    if (opt) {
        if (!*opt) {
            fputs("cmg client: --state: empty directory name\n", stderr);
            return -1;
        }
        return copy_path(dir, dirlen, opt, NULL);
    }
    if (env && *env)
        return copy_path(dir, dirlen, env, NULL);
    home = home_dir();
    if (!home) {
        fputs("cmg client: no state directory: give --state DIR or set " CMG_CLIENT_STATE_ENV
              " (HOME is not set)\n",
              stderr);
        return -1;
    }
    recorded_dir(home, dir, dirlen);
    if (dir[0])
        return 0;
    return copy_path(dir, dirlen, home, STATE_DEFAULT);
}

/* mkdir -p, mode 0700 for what it creates. */
static int mkdir_p(const char *dir)
{
    char path[PATH_MAX];
    size_t i, n = strlen(dir);

    if (n >= sizeof(path)) {
        fprintf(stderr, "cmg client: path too long: %s\n", dir);
        return -1;
    }
    memcpy(path, dir, n + 1);
    for (i = 1; i <= n; i++) {
        if (path[i] != '/' && path[i] != 0)
            continue;
        path[i] = 0;
        if (mkdir(path, 0700) < 0 && errno != EEXIST) {
            fprintf(stderr, "cmg client: cannot create %s: %s\n", path, strerror(errno));
            return -1;
        }
        path[i] = i < n ? '/' : 0;
    }
    if (!is_dir(dir)) {
        fprintf(stderr, "cmg client: %s: not a directory\n", dir);
        return -1;
    }
    return 0;
}

int cmg_client_state_mkdir(char *dir, size_t dirlen)
{
    char abs[PATH_MAX];

    if (mkdir_p(dir) < 0)
        return -1;
    if (!realpath(dir, abs)) {
        fprintf(stderr, "cmg client: %s: %s\n", dir, strerror(errno));
        return -1;
    }
    return copy_path(dir, dirlen, abs, NULL);
}

int cmg_client_state_remember(const char *dir)
{
    const char *home = home_dir();
    char conf[PATH_MAX], path[PATH_MAX], line[PATH_MAX + 1];
    int n;

    if (!home || copy_path(conf, sizeof(conf), home, STATE_CONFIG_DIR) < 0 ||
        copy_path(path, sizeof(path), home, STATE_RECORD) < 0 || mkdir_p(conf) < 0)
        goto fail;
    n = snprintf(line, sizeof(line), "%s\n", dir);
    if (n < 0 || (size_t)n >= sizeof(line) || cmg_pki_write_file(path, line, (size_t)n, 0600) < 0)
        goto fail;
    return 0;
fail:
    fprintf(stderr, "cmg client: warning: could not record %s as the default state "
                    "directory; give --state DIR next time\n", dir);
    return -1;
}

int cmg_client_read_file(const char *path, size_t max, unsigned char **data, size_t *len)
{
    int is_stdin = !strcmp(path, "-");
    FILE *fp = is_stdin ? stdin : fopen(path, "rb");
    unsigned char *buf = NULL;
    size_t got = 0, cap = 0;
    int ret = -1;

    *data = NULL;
    *len = 0;
    if (!fp) {
        fprintf(stderr, "cmg client: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    for (;;) {
        size_t n;

        if (got == cap) {
            size_t ncap = cap ? cap * 2 : 4096;
            unsigned char *nb;

            if (ncap > max + 1)
                ncap = max + 1;
            if (ncap <= got) {
                fprintf(stderr, "cmg client: %s: too large (more than %zu bytes)\n",
                        is_stdin ? "standard input" : path, max);
                goto out;
            }
            nb = realloc(buf, ncap + 1);
            if (!nb) {
                fprintf(stderr, "cmg client: cannot read %s: out of memory\n", path);
                goto out;
            }
            buf = nb;
            cap = ncap;
        }
        n = fread(buf + got, 1, cap - got, fp);
        got += n;
        if (n == 0)
            break;
    }
    if (ferror(fp)) {
        fprintf(stderr, "cmg client: cannot read %s: %s\n", is_stdin ? "standard input" : path,
                strerror(errno));
        goto out;
    }
    if (got > max) {
        fprintf(stderr, "cmg client: %s: too large (more than %zu bytes)\n",
                is_stdin ? "standard input" : path, max);
        goto out;
    }
    if (!buf && !(buf = malloc(1))) {
        fprintf(stderr, "cmg client: cannot read %s: out of memory\n", path);
        goto out;
    }
    buf[got] = 0;
    *data = buf;
    *len = got;
    buf = NULL;
    ret = 0;
out:
    if (buf) {
        OPENSSL_cleanse(buf, cap);
        free(buf);
    }
    if (!is_stdin)
        fclose(fp);
    return ret;
}

/* ---- device.json ---- */

int cmg_client_token_ok(const char *t)
{
    size_t n = strlen(t);

    if (n == 0 || n > CMG_CLIENT_TOKEN_MAX)
        return 0;
    return strspn(t, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.") == n;
}

void cmg_client_iso_time(int64_t t, char *out, size_t outlen)
{
    time_t tt = (time_t)t;
    struct tm tm;

    if (!gmtime_r(&tt, &tm) || !strftime(out, outlen, "%Y-%m-%dT%H:%M:%SZ", &tm))
        snprintf(out, outlen, "%lld", (long long)t);
}

static char *json_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    return cJSON_IsString(v) && v->valuestring[0] ? strdup(v->valuestring) : NULL;
}

static int64_t json_time(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);

    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble > 1e15)
        return -1;
    return (int64_t)v->valuedouble;
}

int cmg_client_state_load(const char *dir, struct cmg_client_state *s)
{
    char path[PATH_MAX];
    unsigned char *data = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    struct stat st;
    int ret = -1;

    memset(s, 0, sizeof(*s));
    if (copy_path(s->dir, sizeof(s->dir), dir, NULL) < 0 ||
        copy_path(path, sizeof(path), dir, STATE_JSON) < 0)
        goto out;
    if (stat(path, &st) < 0 && errno == ENOENT) {
        fprintf(stderr, "cmg client: this device is not registered: no %s (run 'cmg client "
                        "register', or give --state DIR)\n", path);
        goto out;
    }
    if (cmg_client_read_file(path, STATE_JSON_MAX, &data, &len) < 0)
        goto out;
    root = cJSON_ParseWithLength((const char *)data, len);
    if (!cJSON_IsObject(root)) {
        fprintf(stderr, "cmg client: %s: not a JSON object\n", path);
        goto out;
    }
    s->gateway = json_str(root, "gateway");
    s->server_name = json_str(root, "server_name");
    s->prefix = json_str(root, "prefix");
    s->device_id = json_str(root, "device_id");
    s->token = json_str(root, "token");
    s->expires = json_time(root, "expires");
    s->renew_after = json_time(root, "renew_after");
    if (!s->gateway || !s->prefix || !s->device_id || !s->token || s->expires < 0) {
        fprintf(stderr, "cmg client: %s: incomplete (needs gateway, prefix, device_id, token, "
                        "expires); register again\n", path);
        goto out;
    }
    if (!cmg_client_token_ok(s->token)) {
        fprintf(stderr, "cmg client: %s: the token is malformed; register again\n", path);
        goto out;
    }
    if (s->renew_after < 0)
        s->renew_after = s->expires;
    ret = 0;
out:
    if (data) {
        OPENSSL_cleanse(data, len);
        free(data);
    }
    cJSON_Delete(root);
    if (ret < 0)
        cmg_client_state_free(s);
    return ret;
}

int cmg_client_state_save(const struct cmg_client_state *s)
{
    char path[PATH_MAX];
    cJSON *o = cJSON_CreateObject();
    char *text = NULL;
    int ret = -1;

    if (copy_path(path, sizeof(path), s->dir, STATE_JSON) < 0)
        goto out;
    if (!o || !cJSON_AddStringToObject(o, "gateway", s->gateway) ||
        !cJSON_AddStringToObject(o, "server_name", s->server_name ? s->server_name : "") ||
        !cJSON_AddStringToObject(o, "prefix", s->prefix) ||
        !cJSON_AddStringToObject(o, "device_id", s->device_id) ||
        !cJSON_AddStringToObject(o, "token", s->token) ||
        !cJSON_AddNumberToObject(o, "expires", (double)s->expires) ||
        !cJSON_AddNumberToObject(o, "renew_after", (double)s->renew_after) ||
        !(text = cJSON_Print(o))) {
        fprintf(stderr, "cmg client: cannot write %s: out of memory\n", path);
        goto out;
    }
    ret = cmg_pki_write_file(path, text, strlen(text), 0600);
out:
    if (text) {
        OPENSSL_cleanse(text, strlen(text));
        cJSON_free(text);
    }
    cJSON_Delete(o);
    return ret;
}

void cmg_client_state_free(struct cmg_client_state *s)
{
    if (s->token)
        OPENSSL_cleanse(s->token, strlen(s->token));
    free(s->gateway);
    free(s->server_name);
    free(s->prefix);
    free(s->device_id);
    free(s->token);
    s->gateway = s->server_name = s->prefix = s->device_id = s->token = NULL;
}

/* ---- the device key and certificate ---- */

static int exists(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0;
}

int cmg_client_state_load_identity(const char *dir, EVP_PKEY **key, X509 **cert)
{
    char kpath[PATH_MAX], cpath[PATH_MAX];

    *key = NULL;
    *cert = NULL;
    if (copy_path(kpath, sizeof(kpath), dir, STATE_KEY) < 0 ||
        copy_path(cpath, sizeof(cpath), dir, STATE_CERT) < 0)
        return -1;
    if (!exists(kpath) || !exists(cpath)) {
        fprintf(stderr, "cmg client: no device key or certificate in %s (run 'cmg client "
                        "register')\n", dir);
        return -1;
    }
    if (!(*key = cmg_pki_load_key(kpath)) || !(*cert = cmg_pki_load_cert(cpath)))
        goto fail;
    if (X509_check_private_key(*cert, *key) != 1) {
        fprintf(stderr, "cmg client: %s does not belong to %s\n", cpath, kpath);
        goto fail;
    }
    return 0;
fail:
    EVP_PKEY_free(*key);
    X509_free(*cert);
    *key = NULL;
    *cert = NULL;
    return -1;
}

int cmg_client_state_identity(const char *dir, const char *name, EVP_PKEY **key, X509 **cert)
{
    char kpath[PATH_MAX], cpath[PATH_MAX];
    struct cmg_cert_req req;
    int new_key = 0;

    *key = NULL;
    *cert = NULL;
    if (copy_path(kpath, sizeof(kpath), dir, STATE_KEY) < 0 ||
        copy_path(cpath, sizeof(cpath), dir, STATE_CERT) < 0)
        return -1;
    if (exists(kpath)) {
        if (!(*key = cmg_pki_load_key(kpath)))
            goto fail;
    } else {
        if (!(*key = cmg_pki_new_key()) || cmg_pki_write_key(kpath, *key) < 0)
            goto fail;
        new_key = 1;
    }
    if (!new_key && exists(cpath)) {
        if (!(*cert = cmg_pki_load_cert(cpath)))
            goto fail;
        /* Kept while it matches the key and is valid; else a new one for the same key. */
        if (X509_check_private_key(*cert, *key) == 1 &&
            X509_cmp_current_time(X509_get0_notAfter(*cert)) > 0)
            return 0;
        X509_free(*cert);
        *cert = NULL;
    }
    memset(&req, 0, sizeof(req));
    req.cn = name;
    req.key = *key;
    req.eku = CMG_PKI_EKU_CLIENT;
    req.days = STATE_CERT_DAYS;
    if (!(*cert = cmg_pki_issue(&req, NULL, *key)) || cmg_pki_write_cert(cpath, *cert) < 0)
        goto fail;
    return 0;
fail:
    EVP_PKEY_free(*key);
    X509_free(*cert);
    *key = NULL;
    *cert = NULL;
    return -1;
}
