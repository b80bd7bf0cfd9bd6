/* The dashboard's files, built into the binary (the build writes the table from
 * src/site/ui and the chart library: cmake/embed_assets.cmake). */
#ifndef CMG_SITE_DASHBOARD_ASSETS_H
#define CMG_SITE_DASHBOARD_ASSETS_H

#include <stddef.h>

struct cmg_dashboard_asset {
    const char *name;             /* "app.js": served as /ui/app.js */
    const unsigned char *data;
    size_t len;
};

/* Ends with a NULL name. */
extern const struct cmg_dashboard_asset cmg_dashboard_assets[];

#endif
