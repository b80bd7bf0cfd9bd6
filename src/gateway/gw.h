/* The gateway's internal types: the process state, device connections, tunnels
 * to connectors, and the exchanges that relay one request between the two. */
#ifndef CMG_GW_H
#define CMG_GW_H

#include "auth/keychain.h"
#include "core/addrcount.h"
#include "core/conn.h"
#include "core/log.h"
#include "core/loop.h"
#include "core/metrics.h"
#include "gateway/config.h"
#include "http/headers.h"
#include "http/path.h"
#include "tls/ticket.h"
#include "tls/tls.h"

#include <llhttp.h>
#include <nghttp2/nghttp2.h>
#include <stdbool.h>
#include <stdint.h>

#define CMG_TUNNEL_ALPN "cmg-tunnel/1"
#define CMG_CONTROL_PATH "/.cmg/control"
/* A report up the tunnels: a device showed an OIDC token of the policy's issuer signed
 * with a key id the policy lacks (field cmg-kid); the connector passes it to the site,
 * which then refreshes the issuer's keys at once. */
#define CMG_UNKNOWN_KID_PATH "/.cmg/oidc-unknown-kid"
#define CMG_UNKNOWN_KID_GAP_MS 60000   /* at most one report per gateway this often */
#define CMG_TUNNEL_MAX_ROLES 4096
/* Request bytes buffered per exchange before the device is paused. (A response's are
 * bounded by the tunnel's stream window, CMG_TUNNEL_STREAM_WINDOW.) */
#define CMG_EX_BUFFER (256 * 1024)
/* The connection window a tunnel gives its connector. Its credit goes back as soon as
 * the data is buffered (exchange.c), so it need not cover stalled streams, only what is
 * in flight: several stream windows (CMG_TUNNEL_STREAM_WINDOW). It is also what may still
 * arrive on a tunnel once the buffer budget is spent. */
#define CMG_GW_TUNNEL_WINDOW (16 << 20)
/* Output queued on a connection before producers wait for it to drain. */
#define CMG_OUT_HIGH (256 * 1024)

struct cmg_gateway;
struct cmg_device;
struct cmg_tunnel;
struct cmg_exchange;

struct cmg_listener {
    struct cmg_io io;       /* io.fd is -1 until the socket listens */
    struct cmg_gateway *gw;
    int fd;                 /* the bound socket; -1 once closed */
    bool tunnel;            /* connectors, not devices */
    char addr[300];
};

/* Where an instance is in its life: what a readiness probe reports. */
enum cmg_gw_state {
    CMG_GW_STARTING,   /* the device port is bound, not joined: waiting for a tunnel */
    CMG_GW_SERVING,    /* listening on the device port */
    CMG_GW_DRAINING,   /* SIGTERM: the device port is left, requests in flight finish */
};

/* ---- metrics (metrics_gw.c): plain counters on the loop, shown on metrics_listen ---- */

#define CMG_GW_AUTH_METHODS CMG_METRICS_AUTHS   /* enum cmg_auth_method */
#define CMG_GW_MAX_REASONS 64        /* refusal reason tokens counted apart (then "other") */

struct cmg_gw_metrics {
    uint64_t device_connections[2];  /* TLS set up, by protocol: HTTP/1.1, HTTP/2 */
    struct cmg_metrics_roles roles;  /* relayed requests (auth: enum cmg_auth_method) */
    struct {
        const char *reason;          /* the token (a string of the code, never of a peer) */
        uint64_t n;
    } refusals[CMG_GW_MAX_REASONS];
    size_t nrefusals;
    uint64_t refusals_other;
    uint64_t tunnels_up;             /* tunnels that came up (connectors' hellos) */
    uint64_t handshakes[2];          /* device TLS handshakes done: [0] full, [1] resumed */
    uint64_t rate_pauses;            /* times handshake_rate paused the device listeners */
    struct cmg_metrics_server *server;
};

/* ---- reports to the site (report_gw.c) ---- */

struct cmg_gw_report_body;
struct cmg_gw_report {
    char instance[CMG_REPORT_MAX_STR + 1];
    char boot[17];                  /* random per process start; "" until started */
    uint64_t seq;
    int64_t started;                /* unix seconds */
    struct cmg_timer timer;         /* every report_interval */
    struct cmg_timer soon_timer;    /* a tunnel changed */
    uint64_t soon_ms;               /* loop time of the last unscheduled report */
    struct cmg_timer last_timer;    /* the drain is over: the last report's time to go up */
    uint64_t last_deadline_ms;
    /* bytes of device connections that are gone (live ones are read from their BIOs) */
    uint64_t closed_ingress, closed_egress;
};

struct cmg_gateway {
    struct cmg_loop *loop;
    enum cmg_gw_state state;
    bool failed;                    /* a failure after start: the exit status says so */
    struct cmg_timer ready_timer;   /* ready_timeout */
    struct cmg_task join_task;      /* looks whether the instance can join the device port */
    /* the drain (drain.c) */
    struct cmg_timer drain_timer;   /* drain_timeout */
    struct cmg_task drain_task;     /* looks whether anything is left */
    uint64_t drain_start_ms;
    uint32_t nexchanges;            /* requests relayed now (started, not yet ended) */
    uint64_t drain_finished;        /* requests that ended during the drain */
    struct cmg_gw_config cfg;
    SSL_CTX *device_ctx, *tunnel_ctx;
    struct cmg_listener listeners[CMG_GW_MAX_LISTEN + 1];
    int nlisteners;
    bool accept_paused;             /* out of descriptors: every listener waits */
    struct cmg_timer accept_timer;
    /* handshake_rate (listen.c): a bucket of full device handshakes, one second's worth;
     * while it is empty full handshakes wait in a FIFO (rate_timer), an episode logged once */
    double hs_tokens;
    uint64_t hs_refilled_ms;
    bool rate_episode;
    struct cmg_timer rate_timer;
    struct cmg_device *hs_wait_head, *hs_wait_tail;
    struct cmg_tickets tickets;     /* TLS session ticket keys shared by the instances */
    uint32_t ndevices;
    uint32_t max_devices;           /* max_connections, or less if descriptors are fewer */
    struct cmg_addrcount dev_sources;   /* device connections per source address */
    uint32_t nhandshakes;           /* tunnel connections not yet authenticated */
    struct cmg_addrcount hs_sources;    /* those per source address */
    struct cmg_tunnel *tunnels;     /* every tunnel, ready or not */
    struct cmg_device *devices;
    struct cmg_policy *policy;      /* in force for new requests */
    uint64_t policy_gen;            /* + 1 each time another policy takes over */
    struct cmg_keychain site_keys;  /* verify signed policies; n == 0 if no site_key */
    char policy_cache[PATH_MAX];
    struct cmg_timer policy_age_timer;   /* max_policy_age */
    /* The buffer budget (max_buffer_memory): bytes the exchanges hold, and whether
     * window credit was held back because they reached it. */
    uint64_t buffered;
    bool budget_spent;
    struct cmg_task budget_task;    /* pays the credit back once below the low mark */
    uint64_t budget_warned_ms;      /* at most one warning per BUDGET_WARN_MS ... */
    uint32_t budget_unlogged;       /* ... and how many times it was spent in between */
    bool budget_logged;             /* this time was logged: so is its end */
    /* Of gw->buffered, the copies of request bodies kept for a retry (req_sent): at
     * most an eighth of the budget, so that uploads to a slow service cannot spend it. */
    uint64_t kept;
    struct cmg_tls_watch cert_watch;    /* its certificate and CAs, for their end */
    uint64_t kid_reported_ms;       /* the last unknown-kid report, loop time; 0: none */
    struct cmg_gw_metrics metrics;
    struct cmg_gw_report report;
    /* client notifications (notify.c, notify_report.c) */
    struct cmg_notify_hub *notify;
    struct cmg_notify_reports *notify_reports;
};

/* ---- exchanges: one request relayed from a device to a connector ---- */

struct cmg_exchange_dev_ops {
    void (*on_response)(struct cmg_exchange *ex);      /* status and headers arrived */
    void (*on_response_body)(struct cmg_exchange *ex); /* more body, or its end */
    void (*on_request_room)(struct cmg_exchange *ex, size_t n); /* n body bytes were taken */
    /* The relay failed: before the response, answer status; after it, abort. */
    void (*on_fail)(struct cmg_exchange *ex, int status, const char *why);
};

struct cmg_exchange {
    struct cmg_gateway *gw;
    struct cmg_policy *policy;      /* held: the mapping lives in it */
    struct cmg_policy_mapping *mapping;
    /* request, as it goes to the connector */
    char method[32];
    char *target;
    struct cmg_headers req;
    bool req_body_expected;
    struct cmg_buf req_body;
    bool req_eof;
    uint64_t req_bytes;
    /* Body bytes already sent on the stream, kept (at most CMG_EX_BUFFER, within the
     * buffer budget) until the response begins, so that a request whose stream was
     * refused or whose tunnel was lost can be sent again whole; req_body_lost: some
     * were not kept. After a retry, what is kept goes first on the new stream. */
    struct cmg_buf req_sent;
    size_t kept;                    /* req_sent.len as counted in gw->kept */
    bool req_body_lost;
    /* response, as it comes back */
    int status;
    struct cmg_headers resp;
    bool resp_headers;
    /* The device side has the head: it is held back until the first body byte or the
     * end, so that a tunnel lost in between leaves a request that can still be retried. */
    bool resp_told;
    struct cmg_buf resp_body;
    bool resp_eof;
    uint64_t resp_bytes;
    /* the buffer budget: bytes counted in gw->buffered, and what was held back while
     * it was spent (stream credit to the connector, room to the device) */
    size_t held;
    size_t credit_owed, room_owed;
    bool room_wanted;               /* the device paused its upload for the budget */
    /* send_timeout: armed while response bytes wait for the device */
    struct cmg_timer send_timer;
    uint64_t progress_ms;           /* when the device last took response bytes */
    /* the device side */
    const struct cmg_exchange_dev_ops *dev_ops;
    void *dev;
    /* the tunnel side */
    struct cmg_tunnel *tun;
    int32_t stream_id;
    bool stream_closed;
    bool retried;                   /* started again once after its tunnel failed */
    bool counted;                   /* in gw->nexchanges */
    uint8_t auth_method;            /* enum cmg_auth_method, for the metrics */
    struct cmg_exchange *tun_prev, *tun_next;
    /* for the access log */
    uint64_t start_ms;
    char peer[64];
    char identity[160];
    char connector[64];
    char device_id[128];
};

struct cmg_exchange *cmg_exchange_new(struct cmg_gateway *gw, const struct cmg_exchange_dev_ops *ops,
                                      void *dev);
/* Picks a tunnel and opens the stream. 0, or an HTTP status (503) to answer. */
int cmg_exchange_start(struct cmg_exchange *ex);
/* Its tunnel (to connector `failed`) is lost, or that connector refused its stream
 * (never_started: REFUSED_STREAM, nothing reached the internal service): started once
 * more on another tunnel if that is safe (see exchange.c). true if it was; else it is
 * still to be failed. */
bool cmg_exchange_retry(struct cmg_exchange *ex, const char *failed, bool never_started);
/* Device side: request body bytes and end. */
int cmg_exchange_req_write(struct cmg_exchange *ex, const void *p, size_t n);
void cmg_exchange_req_end(struct cmg_exchange *ex);
/* Device side: n response body bytes were passed on to the device. */
/* Tunnel side: body arrived, or the end: the device side is told (the head first). */
void cmg_exchange_resp_news(struct cmg_exchange *ex);
void cmg_exchange_resp_consumed(struct cmg_exchange *ex, size_t n);
/* Tunnel side: response body arrived. 0, or -1 if out of memory. */
int cmg_exchange_resp_data(struct cmg_exchange *ex, const uint8_t *data, size_t len);
/* Device side: whether to stop reading the request body for now (this exchange holds
 * its share, or the buffer budget is spent); on_request_room says when to go on. */
bool cmg_exchange_req_full(struct cmg_exchange *ex);
/* Tunnel side: n request body bytes left for the connector. */
void cmg_exchange_req_taken(struct cmg_exchange *ex, size_t n);
/* Tunnel side: the n bytes at p are about to leave for the connector: a copy is kept
 * while it can be (req_sent). */
void cmg_exchange_req_keep(struct cmg_exchange *ex, const void *p, size_t n);
/* Tunnel side: the bytes just kept did not leave after all; nothing is kept from now on,
 * so the request is no longer sent again. */
void cmg_exchange_req_unkeep(struct cmg_exchange *ex);
/* Tunnel side: bytes of a retried request's replay (req_sent) left. */
void cmg_exchange_req_replayed(struct cmg_exchange *ex);
/* Takes the exchange off its tunnel (its stream is over or abandoned). */
void cmg_exchange_unlink(struct cmg_exchange *ex);
/* Device side is finished with the exchange (done or gone). */
void cmg_exchange_dev_done(struct cmg_exchange *ex);
/* The exchange is discarded before it was started. */
void cmg_exchange_free(struct cmg_exchange *ex);

/* ---- tunnels (gateway side): HTTP/2 client over a connection the connector dialled ---- */

struct cmg_tunnel {
    struct cmg_gateway *gw;
    struct cmg_conn conn;
    nghttp2_session *h2;
    char name[64];           /* the connector's name, from its hello */
    char **roles;
    size_t nroles;
    bool ready, dead;
    bool draining;           /* the connector said so: no new requests, those in flight finish */
    const char *failure;     /* why, when a callback decided the tunnel must go */
    int32_t ctl_stream;
    struct cmg_buf ctl_in;
    struct cmg_timer hs_timer, ping_timer, pong_timer;
    /* stall_timeout: loop time of the last frame received (or of the first request
     * sent after a quiet spell); the timer runs while requests are outstanding */
    uint64_t heard_ms;
    struct cmg_timer stall_timer;
    struct cmg_addr_key src;
    bool handshaking;        /* counted in gw->nhandshakes until authenticated or gone */
    struct cmg_task send_task;
    struct cmg_exchange *exchanges;
    uint64_t credit_owed;    /* connection-window credit held back: the budget was spent */
    uint64_t ping_sent_us;   /* the health ping in flight (cmg_metrics_now_us), 0: none */
    uint64_t rtt_us;         /* its last round trip */
    int64_t since;           /* unix seconds: when it came up or began to drain */
    int32_t report_stream;   /* the report on its way up (report_body), if any */
    struct cmg_gw_report_body *report_body;
    bool report_owed;        /* a report was due while report_body was on its way */
    struct cmg_tunnel *prev, *next;
};

/* Takes fd (closed on failure). 0, or -1 when out of memory. */
int cmg_tunnel_accept(struct cmg_gateway *gw, int fd, const struct cmg_addr_key *src);
/* A ready tunnel serving the role, round-robin; NULL if none. */
struct cmg_tunnel *cmg_tunnel_pick(struct cmg_gateway *gw, struct cmg_policy_mapping *m);
int cmg_tunnel_submit(struct cmg_tunnel *t, struct cmg_exchange *ex);
/* How many ready tunnels serve the role (what cmg_tunnel_pick chooses among). */
size_t cmg_tunnel_serving(struct cmg_gateway *gw, const struct cmg_policy_mapping *m);
void cmg_tunnel_kick(struct cmg_tunnel *t);          /* send what nghttp2 has queued */
void cmg_tunnel_close_all(struct cmg_gateway *gw);
/* Reports an OIDC key id the policy lacks up every ready tunnel, at most once per
 * CMG_UNKNOWN_KID_GAP_MS; kid must be a plain token (checked here). */
void cmg_tunnel_report_unknown_kid(struct cmg_gateway *gw, const char *kid);
/* Closes the tunnels of connectors that the policy in force revoked (from the loop). */
void cmg_tunnel_close_revoked(struct cmg_gateway *gw);

/* ---- devices ---- */

enum cmg_cert_state { CMG_CERT_UNKNOWN, CMG_CERT_OK, CMG_CERT_NONE, CMG_CERT_INVALID };

struct cmg_h1;
struct cmg_h2dev;

struct cmg_device {
    struct cmg_gateway *gw;
    struct cmg_conn conn;
    struct cmg_timer timer;
    struct cmg_addr_key src;
    enum cmg_cert_state cert;
    long cert_error;
    uint64_t cert_gen;       /* policy generation the verdict was made under */
    uint64_t cert_trust;     /* and that policy's trust_digest */
    bool has_cert;           /* presented one, valid or not */
    char thumbprint[65];     /* SHA-256 of the presented certificate, hex */
    char x5t[44];            /* the same, base64url (RFC 8705 cnf) */
    char subject[256];
    char issuer[256];        /* of the presented certificate, and its serial: for the log */
    char serial[80];
    struct cmg_token_cache *tok;   /* the last bearer token accepted here */
    struct cmg_h1 *h1;
    struct cmg_h2dev *h2;
    bool closing;
    /* the lingering close (cmg_device_linger) */
    bool close_notify_sent;
    bool linger_due;         /* once the output is written */
    bool lingering;          /* input is read and dropped until the device closes */
    uint32_t linger_ms;
    const char *linger_why;
    size_t linger_bytes;     /* dropped so far */
    /* handshake_rate (listen.c) */
    bool hs_waiting;         /* its handshake waits for a token, in the FIFO */
    bool hs_charged;         /* it took a token */
    bool hs_maybe_resumed;   /* it offered a session: charged only if it did not resume */
    struct cmg_device *hs_wait_prev, *hs_wait_next;
    struct cmg_device *prev, *next;
};

/* The info line of each request the gateway refuses (any client can cause them): at
 * most 100 a second, then counted. */
extern struct cmg_log_limit cmg_refused_requests;

void cmg_device_accept(struct cmg_gateway *gw, int fd, const struct cmg_addr_key *src);
void cmg_device_close_all(struct cmg_gateway *gw);
/* The gateway drains: HTTP/2 devices get GOAWAY, HTTP/1.1 ones Connection: close on
 * their next answer, and those idle between requests are closed now. */
void cmg_device_drain(struct cmg_device *d);
/* Closes the connection now and frees the device after this loop round. */
void cmg_device_close(struct cmg_device *d, const char *why);
/* The last answer is out (or queued): close_notify, the end of our side once the output
 * is written, then what the device still sends is read and dropped until it closes, or
 * for `ms` at most, so that its unread input does not reset the connection (and the
 * answer with it, still in the socket's buffer) at close, as nginx's lingering close
 * does. The protocol (h1, h2) is not called again. */
void cmg_device_linger(struct cmg_device *d, uint32_t ms, const char *why);
/* Judges the TLS client certificate against the policy in force (once per
 * connection and policy). */
enum cmg_cert_state cmg_device_cert(struct cmg_device *d);

/* ---- listeners (listen.c) ---- */

/* Binds the device port and opens the tunnel listener, within the descriptor limit. */
int cmg_gw_listen(struct cmg_gateway *gw);
/* Joins the device port: its bound sockets listen. 0, or -1 (logged). */
int cmg_gw_listen_devices(struct cmg_gateway *gw);
/* Leaves the device port: what its queues hold is accepted, then they close. Returns
 * how many device connections that accepted. */
unsigned cmg_gw_listen_leave_devices(struct cmg_gateway *gw);
void cmg_gw_listen_close(struct cmg_gateway *gw);
/* Fits max_connections and the handshake limits into the descriptor limit. */
int cmg_gw_fit_limits(struct cmg_gateway *gw);
/* The same after a reload changed the limits; listeners follow the new ones. */
void cmg_gw_listen_refit(struct cmg_gateway *gw);
/* A device connection is gone: its source may connect again. */
void cmg_gw_device_gone(struct cmg_gateway *gw, const struct cmg_addr_key *src);
/* handshake_rate decides at each device ClientHello of dev (listen.c). 0 or -1. */
int cmg_gw_admission_attach(struct cmg_gateway *gw, SSL_CTX *dev);
/* A device closed: out of the handshake FIFO if it waited there. */
void cmg_gw_admission_forget(struct cmg_gateway *gw, struct cmg_device *d);
/* A device's TLS handshake is done: counted; a full one that took no token is charged,
 * a resumed one that took one gives it back. */
void cmg_gw_handshake_done(struct cmg_device *d, bool resumed);
/* A tunnel's handshake is over (authenticated, or the tunnel is gone): frees its slot. */
void cmg_gw_handshake_over(struct cmg_gateway *gw, struct cmg_tunnel *t);

/* ---- readiness and drain (drain.c) ---- */

/* At start, before the drop from root: net.ipv4.tcp_migrate_req set to 1 if it can be
 * (connections queued at an instance that closes its listener move to the others). */
void cmg_gw_migrate_setup(struct cmg_gateway *gw);
/* Joins the device port at once (ready_timeout 0), or once a policy is in force and a
 * tunnel is ready, or after ready_timeout. 0, or -1 if it cannot listen. */
int cmg_gw_ready_start(struct cmg_gateway *gw);
/* A tunnel became ready, or a policy came into force: maybe time to join. */
void cmg_gw_ready_news(struct cmg_gateway *gw);
/* For a readiness probe: true if serving; else *why says what it waits for. */
bool cmg_gw_ready(const struct cmg_gateway *gw, const char **why);
/* SIGTERM / SIGINT (cmg_loop_on_drain): leave the device port, let what is in flight
 * finish within drain_timeout, then stop the loop. */
void cmg_gw_drain(void *gateway);
/* A device connection or a request ended: during a drain, maybe the end of it. */
void cmg_gw_drain_news(struct cmg_gateway *gw);

/* ---- metrics (metrics_gw.c) ---- */

/* Serves metrics_listen (port + instance). 0, or -1 (logged). */
int cmg_gw_metrics_start(struct cmg_gateway *gw);
void cmg_gw_metrics_free(struct cmg_gateway *gw);
/* A device connection set up its protocol. */
static inline void cmg_gw_metrics_device(struct cmg_gateway *gw, bool h2)
{
    gw->metrics.device_connections[h2]++;
}
/* A request answered here with a reason token (a string of the code). */
void cmg_gw_metrics_refusal(struct cmg_gateway *gw, const char *reason);
/* The notification families (notify.c). */
void cmg_notify_metrics(struct cmg_gateway *gw, struct cmg_buf *b);
/* A relayed request is over (its access-log line). */
void cmg_gw_metrics_exchange(struct cmg_gateway *gw, const struct cmg_exchange *ex);

/* ---- reports to the site (report_gw.c) ---- */

/* Picks the boot id and the instance name; reports every report_interval. 0 or -1. */
int cmg_gw_report_start(struct cmg_gateway *gw);
void cmg_gw_report_stop(struct cmg_gateway *gw);
/* A tunnel came up, went down or drains: a report within a second (rate-limited). */
void cmg_gw_report_news(struct cmg_gateway *gw);
/* The instance starts draining: a report, now. */
void cmg_gw_report_drain(struct cmg_gateway *gw);
/* The drain is over: the last report (what finished during the drain) goes up, then the
 * loop stops, at most wait_ms later. */
void cmg_gw_report_last(struct cmg_gateway *gw, uint64_t wait_ms);
/* A device connection closes: its bytes stay counted. */
void cmg_gw_report_device_gone(struct cmg_gateway *gw, const struct cmg_device *d);
/* A stream of t closed: true if it was t's report (then forgotten). */
bool cmg_gw_report_stream_closed(struct cmg_tunnel *t, int32_t stream_id);
/* t is freed: its report goes with it. */
void cmg_gw_report_tunnel_gone(struct cmg_tunnel *t);

/* ---- the policy (policy_gw.c) ---- */

/* The local policy from gateway.conf, then the cached signed one if there is one. */
int cmg_gw_policy_init(struct cmg_gateway *gw);
void cmg_gw_policy_free(struct cmg_gateway *gw);
/* A signed policy a connector carried: applied if it verifies and is newer. */
void cmg_gw_policy_offer(struct cmg_gateway *gw, const char *jws, size_t len, const char *from);

/* ---- credentials (auth.c) ---- */

enum cmg_auth_method { CMG_ID_CERT, CMG_ID_SITE_TOKEN, CMG_ID_BULK_TOKEN, CMG_ID_OIDC };
/* "cert", "site-token", "bulk-token", "oidc": as devices' requests name it. */
const char *cmg_auth_method_name(enum cmg_auth_method m);

struct cmg_identity {
    enum cmg_auth_method method;
    char device_id[128];
    char subject[256];       /* certificate subject, or the token's sub / upn */
    char tenant[128];
    char jti[128];
    /* A refusal's cause, for its log line: the token claim or check that failed ("aud",
     * "exp", "signature", ...), or that the certificate was judged and failed. */
    const char *failed_claim;
    bool failed_cert;
    const char *check;       /* on a refusal: the check that failed (a literal) */
};

/* The client certificate of the connection as a certificate mapping judges it: 0, or the
 * status to answer with *reason and the failed check in *check (literals). */
int cmg_device_cert_verdict(struct cmg_device *d, const char **reason, const char **check);
/* The end (unix seconds, clock skew included) of the bearer token the connection's last
 * request was admitted with; 0 if none. */
int64_t cmg_device_token_expiry(const struct cmg_device *d);
/* Authenticates a request for mapping m. 0 with *id filled, or the status to answer
 * with *reason. */
int cmg_authenticate(struct cmg_device *d, struct cmg_policy *p, struct cmg_policy_mapping *m,
                     const struct cmg_path *path, const struct cmg_headers *in,
                     struct cmg_identity *id, const char **reason);

/* An answer the gateway makes itself instead of relaying one: a refusal, whose body
 * is its reason token as text, or a small document of the gateway's own (the CRL at
 * CMG_CRL_PATH), whose body lives in the policy that `hold` keeps referenced. */
struct cmg_answer {
    int status;
    const char *reason;            /* a refusal's token; what the log line names */
    const char *content_type;      /* NULL: a refusal (text/plain, the reason) */
    const unsigned char *body;     /* with content_type: the body ... */
    size_t body_len;
    int64_t max_age;               /* ... and Cache-Control: max-age if >= 0 */
    struct cmg_policy *hold;       /* a reference; cmg_answer_release drops it */
    /* for the refusal's log line (cmg_identity): the claim that failed, or the
     * certificate (its subject, issuer, serial and verification error are named) */
    const char *claim;
    bool cert;
    unsigned char *owned;          /* a body made for this answer alone (the analyser's);
                                      cmg_answer_release frees it */
};

/* A refusal: status and reason token. */
struct cmg_answer cmg_answer_refusal(int status, const char *reason);
void cmg_answer_release(struct cmg_answer *a);

/* Admission of a request head: checks the target, the mapping and the credential,
 * and on success returns an exchange ready to start with the headers to forward.
 * Otherwise returns NULL with *answer set to what the gateway answers itself: a
 * refusal, or its own document (the CRL), which the caller releases once sent. */
struct cmg_exchange *cmg_admit(struct cmg_device *d, const char *method, const char *target,
                               size_t target_len, const struct cmg_headers *in,
                               int64_t content_length, bool has_body,
                               const struct cmg_exchange_dev_ops *ops, void *owner,
                               struct cmg_answer *answer);
/* The line of a request answered at the gateway (refused, or its own document), at a
 * bounded rate: method and target as the device sent them (NULL: "-"), the answer's
 * status and reason token, what failed in the credential, and `error` (a parser's
 * message, or NULL). */
void cmg_refusal_log(struct cmg_device *d, const char *method, const char *target,
                     size_t target_len, const struct cmg_answer *a, const char *error);
/* The analyser's reserved path (analyze.c): what the gateway makes of the request's own
 * credential and of the path in its query. Never forwarded. */
#define CMG_ANALYZE_PATH "/CCM_Analyze"
bool cmg_analyze_names(const char *canon, size_t len);
struct cmg_answer cmg_analyze_answer(struct cmg_device *d, const char *method, const char *canon,
                                     size_t len, const struct cmg_headers *in, bool has_body);

/* The access-log line of a finished exchange. */
void cmg_exchange_log(struct cmg_exchange *ex, const char *outcome);

/* HTTP/1.1 and HTTP/2 device protocols */
int cmg_h1_start(struct cmg_device *d);
void cmg_h1_on_read(struct cmg_device *d);
/* Bytes from the device, as read: parsed, admitted, answered or relayed; then any
 * pipelined input held back. What on_read does with each read (the fuzz target
 * calls it without a socket). */
void cmg_h1_input(struct cmg_device *d, const char *data, size_t len);
void cmg_h1_on_drain(struct cmg_device *d);
void cmg_h1_free(struct cmg_device *d);
void cmg_h1_drain(struct cmg_device *d);
int cmg_h2dev_start(struct cmg_device *d);
void cmg_h2dev_on_read(struct cmg_device *d);
/* Input from memory, as if read from the connection (the fuzz target's way in). */
void cmg_h2dev_feed(struct cmg_device *d, const uint8_t *p, size_t n);
void cmg_h2dev_on_drain(struct cmg_device *d);
void cmg_h2dev_free(struct cmg_device *d);
void cmg_h2dev_drain(struct cmg_device *d);

#endif
