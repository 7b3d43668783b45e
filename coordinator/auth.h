/* API keys of the front ends (--api-key-file): who may call, and who may change the cluster.
 * The same key works on both front ends: HTTP `Authorization: Bearer KEY`, gRPC metadata
 * `authorization: Bearer KEY`. Read-only after loading: thread-safe.
 *
 * File format: one key per line, `NAME KEY [OPTION...]` separated by blanks; `#` starts a
 * comment. NAME labels logs (a key itself is never logged); KEY is 16 to 256 printable ASCII
 * bytes. Options: `admin` (may also call Drain and anything else that changes the cluster),
 * `priority` (may ask priorities above the default, i.e. < 0; others get PERMISSION_DENIED),
 * `max-requests=N` (open generations at once, more get RESOURCE_EXHAUSTED), `max-tokens=N`
 * (prompt + max_new_tokens summed over its open generations). Limits are per key: one client
 * cannot take every slot of the server. */
#ifndef MOE_COORDINATOR_AUTH_H
#define MOE_COORDINATOR_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
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
 * time independent of where a wrong key differs. *key (may be NULL): the key's index, -1 none. */
moe_auth_role moe_auth_check(const moe_auth *a, const char *value, size_t len, int *key);
const char *moe_auth_name(const moe_auth *a, int key); /* "-" for -1 */

/* Takes room for one generation of key `key` (a no-op for a NULL table or key -1): `tokens`
 * (prompt + max_new_tokens) and one open request under its limits, `priority` allowed for it.
 * MOE_ERR_FULL (a limit, named with the key's NAME) or MOE_ERR_PERMISSION (priority < 0 without
 * the `priority` option); nothing taken then. Thread-safe. */
moe_status moe_auth_acquire(const moe_auth *a, int key, uint64_t tokens, int32_t priority);
/* Gives back what one successful acquire took (once, with the same tokens). */
void moe_auth_release(const moe_auth *a, int key, uint64_t tokens);

#endif
