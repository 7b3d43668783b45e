/* API keys of the front ends (--api-key-file): who may call, and who may change the cluster.
 * The same key works on both front ends: HTTP `Authorization: Bearer KEY`, gRPC metadata
 * `authorization: Bearer KEY`. Read-only after loading: thread-safe.
 *
 * File format: one key per line, `NAME KEY [admin]` separated by blanks; `#` starts a comment.
 * NAME labels logs (a key itself is never logged); KEY is 16 to 256 printable ASCII bytes;
 * `admin` keys may also call Drain and anything else that changes the cluster. */
#ifndef MOE_COORDINATOR_AUTH_H
#define MOE_COORDINATOR_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include "common/status.h"

typedef struct moe_auth moe_auth;

typedef enum {
    MOE_AUTH_NONE = 0, /* no or wrong key */
    MOE_AUTH_USER,
    MOE_AUTH_ADMIN,
} moe_auth_role;

/* Loads the key file. MOE_ERR_IO (cannot read), MOE_ERR_FORMAT naming the line (a malformed
 * line, a short key, a duplicate key or name, no key at all). */
moe_status moe_auth_load(const char *path, moe_auth **out);
void moe_auth_free(moe_auth *a); /* NULL: no-op */
int moe_auth_count(const moe_auth *a);

/* The role of the credential in an Authorization value ("Bearer KEY"; the scheme is matched
 * without regard to case). `value` may be NULL or not NUL-terminated (len bytes). Compares in
 * time independent of where a wrong key differs. *name (may be NULL): the key's NAME. */
moe_auth_role moe_auth_check(const moe_auth *a, const char *value, size_t len, const char **name);

#endif
