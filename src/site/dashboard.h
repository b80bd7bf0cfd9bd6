/* The web dashboard on the admin listener of 'cmg site serve': GET / redirects to /ui/;
 * the pages and their files are built into the binary; sign-in with the admin token
 * gives a session cookie (in memory only) that also opens GET /v1/status and
 * /v1/traffic, and GET /ui/api/NAME for a few read-only admin operations. */
#ifndef CMG_SITE_DASHBOARD_H
#define CMG_SITE_DASHBOARD_H

#include <stdbool.h>

struct cmg_dashboard;
struct cmg_httpd_req;
struct cmg_site_server;

/* NULL when out of memory. */
struct cmg_dashboard *cmg_dashboard_new(struct cmg_site_server *srv);
void cmg_dashboard_free(struct cmg_dashboard *d);
/* Answers req if it is the dashboard's (/, /ui, /ui/...): true if it did. */
bool cmg_dashboard_handle(struct cmg_dashboard *d, struct cmg_httpd_req *req);
/* Whether req may read the admin API with a session instead of the bearer token: a GET
 * of /v1/status or /v1/traffic with a valid session cookie. */
bool cmg_dashboard_admits(struct cmg_dashboard *d, const struct cmg_httpd_req *req);
/* The sign-in limit, for the admin API's bearer too: whether req's address may try a
 * credential now, and charging it a wrong one. */
bool cmg_dashboard_may_guess(struct cmg_dashboard *d, const struct cmg_httpd_req *req);
void cmg_dashboard_guessed_wrong(struct cmg_dashboard *d, const struct cmg_httpd_req *req);

#endif
