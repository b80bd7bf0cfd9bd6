#include "core/privdrop.h"
#include "core/log.h"

#include <errno.h>
#include <grp.h>
#include <linux/capability.h>
#include <pwd.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The one capability kept: a listener bound later (a reload, a deferred device port) may
 * still take a port below 1024, as the systemd unit allows; nothing else survives. */
#define KEPT_CAPABILITY CAP_NET_BIND_SERVICE

static int set_capabilities(unsigned int mask)
{
    struct __user_cap_header_struct head = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];

    memset(data, 0, sizeof(data));
    data[0].effective = data[0].permitted = mask;
    return (int)syscall(SYS_capset, &head, data);
}

/* Root must be gone for good: real, effective and saved ids all the user's, and no way back. */
static int dropped_for_good(uid_t uid, gid_t gid)
{
    uid_t ruid, euid, suid;
    gid_t rgid, egid, sgid;

    if (getresuid(&ruid, &euid, &suid) < 0 || getresgid(&rgid, &egid, &sgid) < 0)
        return 0;
    if (ruid != uid || euid != uid || suid != uid || rgid != gid || egid != gid || sgid != gid)
        return 0;
    return setuid(0) < 0 && seteuid(0) < 0;
}

static int switch_to(const struct passwd *pw, char *err, size_t errlen)
{
    if (initgroups(pw->pw_name, pw->pw_gid) < 0) {
        snprintf(err, errlen, "user = %s: cannot set its groups: %s", pw->pw_name, strerror(errno));
        return -1;
    }
    /* Capabilities survive setuid only with KEEPCAPS; then all but one are given up. */
    if (prctl(PR_SET_KEEPCAPS, 1L, 0L, 0L, 0L) < 0 || setgid(pw->pw_gid) < 0 ||
        setuid(pw->pw_uid) < 0 || set_capabilities(1u << KEPT_CAPABILITY) < 0 ||
        prctl(PR_SET_KEEPCAPS, 0L, 0L, 0L, 0L) < 0) {
        snprintf(err, errlen, "user = %s: cannot switch to uid %lu gid %lu: %s", pw->pw_name,
                 (unsigned long)pw->pw_uid, (unsigned long)pw->pw_gid, strerror(errno));
        return -1;
    }
    if (!dropped_for_good(pw->pw_uid, pw->pw_gid)) {
        snprintf(err, errlen, "user = %s: the switch to uid %lu did not take: root is still "
                 "reachable", pw->pw_name, (unsigned long)pw->pw_uid);
        return -1;
    }
    return 0;
}

int cmg_drop_privileges(const char *user, char *err, size_t errlen)
{
    struct passwd *pw;

    if (geteuid() != 0) {
        if (user[0] && (!(pw = getpwnam(user)) || pw->pw_uid != geteuid()))
            cmg_info("user = %s: not started as root, so it stays uid %lu", user,
                     (unsigned long)geteuid());
        return 0;
    }
    if (!user[0]) {
        cmg_warn("running as root: set 'user =' to an unprivileged user (e.g. opencmg) to "
                 "drop root once the listeners are bound");
        return 0;
    }
    errno = 0;
    pw = getpwnam(user);
    if (!pw) {
        snprintf(err, errlen, "user = %s: no such user (%s); refusing to go on as root",
                 user, errno ? strerror(errno) : "not in the user database");
        return -1;
    }
    if (pw->pw_uid == 0) {
        snprintf(err, errlen, "user = %s: that is uid 0; name an unprivileged user", user);
        return -1;
    }
    if (switch_to(pw, err, errlen) < 0)
        return -1;
    cmg_info("running as user %s (uid %lu, gid %lu), with no capability but "
             "CAP_NET_BIND_SERVICE", user, (unsigned long)pw->pw_uid, (unsigned long)pw->pw_gid);
    return 0;
}
