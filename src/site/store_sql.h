/* The store's statement helper (cmg_store_db is in store.h), for the store's other files (alerts):
 * everything else goes through store.h. */
#ifndef CMG_SITE_STORE_SQL_H
#define CMG_SITE_STORE_SQL_H

#include "site/store.h"

#include <sqlite3.h>

/* Prepares sql and binds the arguments described by fmt: 's' text, 'i' int64, 'n' null;
 * NULL on an error (cmg_store_error says which). */
sqlite3_stmt *cmg_store_prepare(struct cmg_store *s, const char *sql, const char *fmt, ...);

#endif
