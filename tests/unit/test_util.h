/* Helpers shared by the unit tests (each test file is its own binary, so these are static). */
#ifndef MOE_TESTS_TEST_UTIL_H
#define MOE_TESTS_TEST_UTIL_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Removes a file or a directory tree (test scratch only). */
static inline void moe_test_rm_rf(const char *path)
{
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        char p[4096 + 256 + 2];
        if (snprintf(p, sizeof p, "%s/%s", path, e->d_name) < (int)sizeof p)
            moe_test_rm_rf(p);
    }
    closedir(d);
    rmdir(path);
}

#endif
