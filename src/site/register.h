/* The device registration service (SPEC.md §4): bulk token → device token, and the
 * renewal of device tokens. Reached only through a connector, which forwards the
 * gateway's CMG-Client-Cert-Thumbprint: the certificate the device proved it holds. */
#ifndef CMG_SITE_REGISTER_H
#define CMG_SITE_REGISTER_H

struct cmg_httpd_req;

/* The httpd handler of the service listener; user is the cmg_site_server. */
void cmg_site_on_register(void *user, struct cmg_httpd_req *req);

#endif
