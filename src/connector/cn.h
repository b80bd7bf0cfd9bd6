/* The connector's internal types: its configuration, the tunnels it dials to
 * every gateway instance, the streams the gateways open on them, and the
 * kept-alive connections to internal services. */
#ifndef CMG_CN_H
#define CMG_CN_H

#include "core/conn.h"
#include "core/loop.h"
#include "core/metrics.h"
#include "core/net.h"
#include "http/h2.h"
#include "http/h1_head.h"
#include "http/headers.h"
#include "http/path.h"
#include "auth/jwk.h"
#include "auth/keychain.h"
#include "tls/tls.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <llhttp.h>
#include <nghttp2/nghttp2.h>
#include <stdbool.h>
#include <stdint.h>

#define CMG_CN_MAX_GATEWAYS 16
#define CMG_CN_BUFFER (256 * 1024)

struct cmg_connector;
struct cmg_cn_stream;
struct cmg_upstream;
struct cmg_cn_lookup;
struct cmg_notify_feed;

struct cmg_cn_mapping {
    char role[CMG_ROLE_ID_MAX + 1];
    char internal_url[1024];
    bool tls;
    char host[256];          /* for Host, SNI and certificate checks */
    char authority[300];     /* host[:port] as the Host header */
    char base_path[512];     /* without a trailing '/' */
    int port;
    struct cmg_addr addr;
    char ca[PATH_MAX], client_cert[PATH_MAX], client_key[PATH_MAX];
    SSL_CTX *ctx;
    /* a host name that did not resolve: its requests fail with the reason, and it
     * is looked up again, off the loop, at most once per CMG_CN_RESOLVE_RETRY_MS */
    bool unresolved;
    uint64_t resolved_ms;
    char resolve_error[600];
    struct cmg_cn_lookup *lookup;   /* the lookup under way, or NULL */
    struct cmg_upstream *idle;   /* kept-alive connections, most recent first */
    unsigned nidle;
    /* routes from the site: kept until exit once made (streams may point here) */
    bool retired;
    bool site_service;       /* the site's registration service: this connector's certificate */
    struct cmg_cn_mapping *next;
};

struct cmg_cn_config {
    char file[PATH_MAX];
    char name[64];
    char gateways[CMG_CN_MAX_GATEWAYS][300];
    int ngateways;
    char server_name[256];
    char cert[PATH_MAX], key[PATH_MAX], ca[PATH_MAX];
    char site[300];                  /* https://host:port of the site's feed */
    char site_ca[PATH_MAX];          /* CA of the site's certificate (default: ca) */
    char site_key[PATH_MAX];         /* site-signing.pub: verifies policy and routes */
    char policy_cache[PATH_MAX];     /* last good signed policy and routes */
    uint32_t max_policy_age_ms;
    uint32_t ping_interval_ms, ping_timeout_ms, reconnect_max_ms, upstream_timeout_ms;
    uint32_t drain_timeout_ms;       /* SIGTERM: requests in flight get this long */
    uint32_t report_interval_s;      /* reports to the site (site_report.c) */
    int log_level;
    int log_format;                  /* enum cmg_log_format */
    struct cmg_metrics_conf metrics; /* metrics_listen */
    struct cmg_cn_mapping *mappings;
    size_t nmappings;
};

int cmg_cn_config_load(struct cmg_cn_config *c, const char *file, char *err, size_t errlen);
/* The same without looking the mappings' hosts up (a reload, on the loop, keeps the
 * mappings in force). */
int cmg_cn_config_read(struct cmg_cn_config *c, const char *file, char *err, size_t errlen);
void cmg_cn_config_free(struct cmg_cn_config *c);
struct cmg_cn_mapping *cmg_cn_config_mapping(struct cmg_cn_config *c, const char *role,
                                             size_t len);
/* Sets the internal URL (and resolves its host: blocking). */
int cmg_cn_mapping_set_url(struct cmg_cn_mapping *m, const char *url, char *err, size_t errlen);
/* Resolves the mapping's host (blocking); a failure is kept in the mapping, not fatal. */
#define CMG_CN_RESOLVE_RETRY_MS 5000
void cmg_cn_mapping_resolve(struct cmg_cn_mapping *m, uint64_t now_ms);
/* lookup.c: the name of m again without blocking the loop (none if one is under way). */
void cmg_cn_lookup_start(struct cmg_loop *loop, struct cmg_cn_mapping *m);
/* Before m is freed. */
void cmg_cn_lookup_cancel(struct cmg_cn_mapping *m);

/* One tunnel per gateway instance, redialled whenever it falls. */
struct cmg_cn_tunnel {
    struct cmg_connector *cn;
    char target[300];
    struct cmg_addr addr;
    struct cmg_conn conn;
    nghttp2_session *h2;
    bool active;             /* connection (being) set up */
    bool up;                 /* the gateway opened the control stream */
    uint32_t backoff_ms;
    unsigned failures;
    struct cmg_timer retry_timer, hs_timer, ping_timer, pong_timer;
    struct cmg_task send_task;
    struct cmg_cn_stream *streams;
    bool drain_heard;        /* the gateway answered the drain's PING: it saw the GOAWAY */
    /* The drain's end: the last GOAWAY, then close_notify and FIN, and the gateway's
     * input dropped until it closes too (so that input left unread does not reset the
     * connection, and the responses' last bytes with it). */
    bool closing, close_notify_sent, half_closed;
    int32_t ctl_stream;
    struct cmg_buf ctl_out;
    /* notifications (notify_feed.c): taken from the feed's backlog one at a time as the
     * control stream drains, so that no tunnel holds a copy of the backlog */
    bool notify_synced;      /* notify-sync sent on this control stream */
    uint64_t notify_next;    /* the lowest seq still to send (0: whatever comes first) */
    /* for the metrics */
    uint64_t ups;            /* times it came up: more than once is a reconnect */
    uint64_t ping_sent_us;   /* the health ping in flight (cmg_metrics_now_us), 0: none */
    uint64_t rtt_us;         /* its last round trip */
    /* for the reports to the site (site_report.c) */
    int64_t since;           /* unix seconds: when it last came up or went down */
    char instance[CMG_REPORT_MAX_STR + 1];   /* the gateway's, from its last report */
    char *gw_report;         /* that report, verbatim (one per tunnel at most) */
    char gw_boot[17];
    uint64_t gw_seq;
    bool gw_report_sent;     /* the site took it */
    uint64_t report_ms;      /* loop time the next report is due by the rate (tunnel.c) */
};

/* SIGTERM/SIGINT (drain.c): gateways are told, requests in flight finish, then exit. */
struct cmg_cn_drain {
    uint64_t started_ms;
    unsigned finished, refused, reset;   /* request streams ended while draining */
    bool closing;                        /* the end: the tunnels' last GOAWAYs are on their way */
    struct cmg_timer timer;              /* drain_timeout */
    struct cmg_timer close_timer;        /* how long those GOAWAYs get to leave */
    struct cmg_task check_task;
};

/* The connector's metrics (metrics_cn.c): plain counters on the loop. */
struct cmg_cn_metrics {
    struct cmg_metrics_roles roles;   /* requests by role and status class ([class][0]) */
    struct cmg_metrics_server *server;
};

struct cmg_connector {
    struct cmg_loop *loop;
    struct cmg_cn_config cfg;
    SSL_CTX *tunnel_ctx;
    struct cmg_cn_tunnel tunnels[CMG_CN_MAX_GATEWAYS];
    int ntunnels;
    struct cmg_upstream *busy;   /* upstream connections in use */
    struct cmg_site_feed *feed;  /* NULL without 'site =' */
    char *policy;                /* the signed policy to carry to every gateway */
    int64_t policy_version;
    int64_t policy_iat;          /* when the site signed it */
    struct cmg_keychain site_keys;   /* verify what the feed and the cache hold */
    struct cmg_timer age_timer;  /* max_policy_age */
    struct cmg_cn_mapping *routes;   /* from the site, newest first */
    struct cmg_tls_watch cert_watch; /* its certificate and CAs, for their end */
    struct cmg_cn_drain drain;
    struct cmg_cn_metrics metrics;
    struct cmg_site_report *report;   /* NULL without 'site =' */
    struct cmg_notify_feed *notify;   /* NULL without 'site =' */
    bool relay_failing;               /* a notify report relay failed: logged once */
};

/* site_report.c: the connector's report to the site (POST /v1/connector/report on the
 * feed's address, its own connection): the gateways' latest reports and this
 * connector's view of each tunnel, at most a second after a gateway's report came and
 * every report_interval. */
int cmg_site_report_start(struct cmg_connector *cn);
void cmg_site_report_stop(struct cmg_connector *cn);
/* A gateway's report came up tunnel t: body (len bytes). 0 kept (or older than the one
 * kept: ignored), or -1 if it is not a gateway's report (why says what is wrong). */
int cmg_site_report_gateway(struct cmg_cn_tunnel *t, const char *body, size_t len,
                            const char **why);
/* What the site feed knows of the site: address, TLS context (the feed's, current),
 * host for SNI, authority and path prefix. false without 'site ='. */
bool cmg_site_feed_target(const struct cmg_connector *cn, const struct cmg_addr **addr,
                          SSL_CTX **tls, const char **host, const char **authority,
                          const char **prefix);

/* site_call.c: one HTTP/1.1 exchange with the site's feed listener (its address and
 * TLS context, mutual TLS), on a short connection of its own, bounded by a deadline.
 * done hears once: status > 0 the site's answer (its body in answer, at most
 * max_answer bytes: more fails the call, or is cut with cut_answer), 0 unreachable or
 * a broken answer, -1 no answer by the deadline; why says what went wrong. */
struct cmg_site_call {
    struct cmg_connector *cn;
    void (*done)(struct cmg_site_call *c, int status, const char *why);
    struct cmg_conn conn;
    llhttp_t parser;
    struct cmg_timer timer;
    struct cmg_buf request, answer;
    size_t max_answer;
    bool cut_answer;
    void *arg;                 /* the owner's */
    int status;
    bool busy, complete;
};
void cmg_site_call_init(struct cmg_site_call *c, struct cmg_connector *cn,
                        void (*done)(struct cmg_site_call *c, int status, const char *why),
                        size_t max_answer);
/* headers: extra "Name: value\r\n" lines or NULL; body NULL: none. done may be heard
 * before this returns (no site, no socket). -1 if a call is under way. */
int cmg_site_call_start(struct cmg_site_call *c, const char *method, const char *target,
                        const char *headers, const void *body, size_t len, uint32_t timeout_ms);
/* The site's host:port, for messages. */
const char *cmg_site_call_authority(const struct cmg_site_call *c);
/* Drops the call under way (done is not heard). */
void cmg_site_call_cancel(struct cmg_site_call *c);
void cmg_site_call_free(struct cmg_site_call *c);

/* notify_feed.c: long-polls the site's notify feed (GET /v1/connector/notify?after=E-S)
 * and carries each notification to every ready tunnel as a control message, keeping a
 * backlog (newest 1024, at most 24 h old, 64 MiB) for tunnels that come up later. */
int cmg_notify_feed_start(struct cmg_connector *cn);
void cmg_notify_feed_stop(struct cmg_connector *cn);
/* A tunnel's control stream is open (hello and policy queued): notify-sync and the
 * backlog follow, once the site's epoch is known. */
void cmg_notify_feed_tunnel_ready(struct cmg_cn_tunnel *t);
/* The control stream has sent all it had: the next notification for t goes into its
 * ctl_out. true if one did. */
bool cmg_notify_feed_fill(struct cmg_cn_tunnel *t);
/* tunnel.c: queues one control line (no newline) on t's control stream if it is
 * open; 0, or -1 if it is not. */
int cmg_cn_tunnel_control(struct cmg_cn_tunnel *t, const char *line, size_t len);
/* tunnel.c: the control stream has more to send (cmg_notify_feed_fill has it). */
void cmg_cn_tunnel_control_more(struct cmg_cn_tunnel *t);

/* metrics_cn.c: serves metrics_listen; 0, or -1 (logged). */
int cmg_cn_metrics_start(struct cmg_connector *cn);
void cmg_cn_metrics_free(struct cmg_connector *cn);
struct cmg_cn_stream;
/* A request stream is over. */
void cmg_cn_metrics_stream(struct cmg_connector *cn, const struct cmg_cn_stream *st);

/* The loop's drain hook (cmg_loop_on_drain): arg is the connector. */
void cmg_cn_drain(void *arg);
bool cmg_cn_draining(const struct cmg_connector *cn);
/* How a request stream ended while draining. */
enum cmg_cn_drain_end { CMG_CN_DRAIN_FINISHED, CMG_CN_DRAIN_REFUSED, CMG_CN_DRAIN_RESET };
void cmg_cn_drain_stream_ended(struct cmg_connector *cn, enum cmg_cn_drain_end how);
/* A tunnel closed, or its gateway heard of the drain: the drain may be over. */
void cmg_cn_drain_check(struct cmg_connector *cn);

/* The mapping that serves a role: the site's route, else the configuration's. */
struct cmg_cn_mapping *cmg_cn_mapping_find(struct cmg_connector *cn, const char *role,
                                           size_t len);
/* Applies the site's routes (verified: signed by the site key); true if anything
 * changed. */
bool cmg_cn_routes_apply(struct cmg_connector *cn, const cJSON *routes);
/* The TLS context of a route from the site, with c's certificates. */
SSL_CTX *cmg_cn_route_ctx(struct cmg_cn_config *c, const struct cmg_cn_mapping *m, char *err,
                          size_t errlen);
void cmg_cn_routes_free(struct cmg_connector *cn);
/* The roles this connector serves, as a JSON array. */
cJSON *cmg_cn_roles_json(struct cmg_connector *cn);
/* Queues the connector's policy and roles for one tunnel's control stream. */
void cmg_cn_tunnel_announce(struct cmg_cn_tunnel *t);

/* The site feed (site_feed.c): long-polls the site for the policy and routes. */
int cmg_site_feed_start(struct cmg_connector *cn, char *err, size_t errlen);
/* The feed's TLS context for c (its certificate shown, the site's required); the feed
 * takes a new one for its next request. */
SSL_CTX *cmg_site_feed_tls(const struct cmg_cn_config *c, char *err, size_t errlen);
void cmg_site_feed_set_tls(struct cmg_connector *cn, SSL_CTX *tls);

/* reload.c: the TLS contexts of the tunnels and of a mapping's internal service; the
 * connector's certificate checked and watched for its end (at start and after a
 * reload); SIGHUP (a cmg_loop_on_hup hook, arg the connector). */
SSL_CTX *cmg_cn_tunnel_ctx(const struct cmg_cn_config *c, char *err, size_t errlen);
SSL_CTX *cmg_cn_mapping_ctx(const struct cmg_cn_mapping *m, char *err, size_t errlen);
void cmg_cn_check_certs(struct cmg_connector *cn);
void cmg_cn_reload(void *cn);
void cmg_site_feed_stop(struct cmg_connector *cn);
/* A gateway saw an OIDC token signed with a key id the policy lacks: tell the site (the
 * feed asks again at once with the report; at most once a minute). */
void cmg_site_feed_unknown_kid(struct cmg_connector *cn, const char *kid);

/* A request that a gateway opened on a tunnel. */
struct cmg_cn_stream {
    struct cmg_cn_tunnel *t;
    int32_t id;
    char method[32];
    char *path;
    struct cmg_headers hdrs;
    size_t head_bytes;
    int64_t content_length;
    bool has_body, req_chunked, req_end;
    size_t unconsumed;        /* request bytes handed on but not yet consumed */
    struct cmg_cn_mapping *m;
    struct cmg_upstream *up;
    bool resp_submitted, resp_eof;
    bool refused;             /* REFUSED_STREAM: the connector drains; never started */
    struct cmg_buf resp_body;
    struct cmg_h2_text text;   /* an answer made here */
    bool report;              /* a gateway's report (CMG_REPORT_PATH): its body in report_in */
    struct cmg_buf report_in;
    /* a gateway's notify report (CMG_NOTIFY_REPORT_PATH), relayed to the site */
    bool notify_report;
    struct cmg_site_call *relay;   /* the relay under way, or NULL */
    /* for the metrics */
    int status;               /* the answer's, 0: none sent */
    uint64_t start_ms;
    uint64_t req_bytes, resp_bytes;
    struct cmg_cn_stream *prev, *next;
};

void cmg_cn_tunnel_start(struct cmg_connector *cn, struct cmg_cn_tunnel *t);
void cmg_cn_tunnel_stop(struct cmg_cn_tunnel *t);
void cmg_cn_tunnel_kick(struct cmg_cn_tunnel *t);
/* Draining: tells the gateway (a control message and HTTP/2's graceful GOAWAY); a
 * tunnel not up is closed, and none is dialled again. */
void cmg_cn_tunnel_drain(struct cmg_cn_tunnel *t);
/* Request streams open on the tunnel (not its control stream). */
unsigned cmg_cn_tunnel_requests(const struct cmg_cn_tunnel *t);
/* Draining, nothing more to wait for: closed, or its gateway heard of the drain (any
 * request it sent before is here, refused) and no request is open. */
bool cmg_cn_tunnel_drained(const struct cmg_cn_tunnel *t);
/* The drain's end: the last GOAWAY, and the tunnel closes once it is sent; requests
 * still open are cut (each logged). Returns how many. */
unsigned cmg_cn_tunnel_close(struct cmg_cn_tunnel *t);
/* Stream side of the upstream: */
void cmg_cn_stream_response(struct cmg_cn_stream *st, int status, const struct cmg_headers *h);
void cmg_cn_stream_body(struct cmg_cn_stream *st);   /* more in resp_body, or resp_eof */
/* Why a request failed here: each cause has its reason token for the device and
 * the gateway's access log (tunnel.c). */
enum cmg_cn_failure {
    CMG_CN_FAIL_OTHER,
    CMG_CN_FAIL_REFUSED,
    CMG_CN_FAIL_TLS,
    CMG_CN_FAIL_DNS,
    CMG_CN_FAIL_TIMEOUT,
};
void cmg_cn_stream_fail(struct cmg_cn_stream *st, int status, enum cmg_cn_failure cause,
                        const char *why);
void cmg_cn_stream_request_written(struct cmg_cn_stream *st);

/* Upstream: an HTTP/1.1 client connection to an internal service. */
struct cmg_upstream {
    struct cmg_connector *cn;
    struct cmg_cn_mapping *m;
    struct cmg_conn conn;
    struct cmg_cn_stream *st;
    llhttp_t parser;
    struct cmg_headers resp;
    struct cmg_h1_head resp_head;   /* collects resp */
    bool informational, headers_done, msg_done, reused, got_bytes, head;
    bool paused;
    bool in_place;   /* the bytes being parsed were read into st->resp_body's spare room */
    struct cmg_timer timer;
    struct cmg_task body_task;   /* writes request body once per loop round */
    struct cmg_upstream *prev, *next;   /* in the mapping's idle list or the busy list */
};

/* Sends the stream's request head to its mapping's internal service, or fails the
 * stream with the reason. */
void cmg_upstream_start(struct cmg_connector *cn, struct cmg_cn_stream *st);
/* Request body bytes; end of the body. */
void cmg_upstream_body(struct cmg_upstream *u, const uint8_t *p, size_t n);
void cmg_upstream_body_end(struct cmg_upstream *u);
/* The stream is gone: drop the connection unless it finished cleanly. */
void cmg_upstream_detach(struct cmg_upstream *u);
/* The stream took response bytes: read more if paused. */
void cmg_upstream_resume(struct cmg_upstream *u);
void cmg_upstream_close_all(struct cmg_connector *cn);

#endif
