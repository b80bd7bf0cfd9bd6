/* Dropping root: a process started as root that has bound its privileged ports goes on
 * as an unprivileged user. */
#ifndef CMG_PRIVDROP_H
#define CMG_PRIVDROP_H

#include <stddef.h>

/* Started as root: switches to `user` (its uid, its primary group, its supplementary groups)
 * and checks that root cannot be regained. `user` empty: warns that the process stays root.
 * Not started as root: nothing to drop (logged when `user` names someone else).
 * Returns 0, or -1 with a message in err: the caller must not go on (it would stay root). */
int cmg_drop_privileges(const char *user, char *err, size_t errlen);

#endif
