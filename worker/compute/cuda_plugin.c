/* Loads the CUDA plugin (cuda_plugin.h) the first time the CUDA backend or the NCCL comm is asked
 * for, and forwards to it. Looked for, in order: $MOE_CUDA_PLUGIN (a path: then only there), next
 * to the executable, in ../lib/moeserve/ from it (deploy/image/build.sh's layout), and where this
 * build made it. A build without a CUDA toolkit has no plugin and says so. */
#include "worker/compute/cuda_plugin.h"

#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#ifdef MOE_HAVE_NCCL
#include "worker/comm_nccl.h"
#endif

#ifdef MOE_CUDA_PLUGIN_BUILD_PATH

#define PLUGIN_FILE "libmoe_cuda.so"

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static moe_cuda_plugin_backend_fn backend_create;
static moe_cuda_plugin_nccl_fn nccl_create;
static char loaded_path[PATH_MAX];
static char load_error[2048]; /* why it could not be loaded: every place tried */

static void note_failure(const char *path, const char *why)
{
    size_t n = strlen(load_error);
    snprintf(load_error + n, sizeof load_error - n, "%s%s: %s", n ? "; " : "", path, why);
}

/* dlsym into a function pointer: ISO C has no conversion from an object pointer to a function
 * pointer, POSIX guarantees the representation is the same, so the bytes are copied. */
static void *resolve(void *h, const char *name, void *fn_out, size_t fn_size)
{
    void *s = dlsym(h, name);
    if (s)
        memcpy(fn_out, &s, fn_size);
    return s;
}

/* 1 loaded, 0 not there or refused (the reason noted). */
static int try_load(const char *path)
{
    /* RTLD_LOCAL: the plugin's libraries (cuBLAS, NCCL) stay out of the program's namespace. */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        note_failure(path, dlerror());
        return 0;
    }
    moe_cuda_plugin_abi_fn abi = NULL;
    moe_cuda_plugin_backend_fn be = NULL;
    resolve(h, MOE_CUDA_PLUGIN_SYM_ABI, &abi, sizeof abi);
    resolve(h, MOE_CUDA_PLUGIN_SYM_BACKEND, &be, sizeof be);
    if (!abi || !be || abi() != MOE_CUDA_PLUGIN_ABI) {
        char why[128];
        snprintf(why, sizeof why, "not this build's plugin (ABI %#x, this program %#x)", abi ? abi() : 0u,
                 MOE_CUDA_PLUGIN_ABI);
        note_failure(path, why);
        dlclose(h);
        return 0;
    }
    backend_create = be;
    resolve(h, MOE_CUDA_PLUGIN_SYM_NCCL, &nccl_create, sizeof nccl_create);
    snprintf(loaded_path, sizeof loaded_path, "%s", path);
    MOE_LOG_I("cuda plugin: loaded %s (NCCL %s)", path, nccl_create ? "in it" : "not built");
    return 1;
}

static void load(void)
{
    const char *env = getenv("MOE_CUDA_PLUGIN");
    if (env && *env) {
        try_load(env);
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            char p[PATH_MAX + 32];
            snprintf(p, sizeof p, "%s/" PLUGIN_FILE, exe);
            if (access(p, F_OK) == 0 && try_load(p))
                return;
            snprintf(p, sizeof p, "%s/../lib/moeserve/" PLUGIN_FILE, exe);
            if (access(p, F_OK) == 0 && try_load(p))
                return;
        }
    }
    try_load(MOE_CUDA_PLUGIN_BUILD_PATH);
}

static moe_status plugin_missing(void)
{
    return moe_error(MOE_ERR_UNAVAILABLE,
                     "device cuda: the CUDA plugin could not be loaded (%s); set MOE_CUDA_PLUGIN to its path "
                     "or use --device cpu",
                     load_error);
}

const char *moe_cuda_plugin_loaded_path(void) { return loaded_path[0] ? loaded_path : NULL; }

moe_status moe_backend_cuda_create(int gpu, moe_backend **out)
{
    pthread_once(&load_once, load);
    if (!backend_create)
        return plugin_missing();
    return backend_create(gpu, out);
}

#ifdef MOE_HAVE_NCCL
moe_status moe_comm_nccl_create(MPI_Comm mpi_comm, int device, moe_comm *out)
{
    pthread_once(&load_once, load);
    if (!backend_create)
        return plugin_missing();
    if (!nccl_create)
        return moe_error(MOE_ERR_UNAVAILABLE, "NCCL comm: the CUDA plugin %s was built without NCCL", loaded_path);
    return nccl_create(mpi_comm, device, out);
}
#endif

#else /* no CUDA toolkit at configure time: no plugin */

const char *moe_cuda_plugin_loaded_path(void) { return NULL; }

moe_status moe_backend_cuda_create(int gpu, moe_backend **out)
{
    (void)out;
    return moe_error(MOE_ERR_UNAVAILABLE,
                     "device cuda (GPU %d): this binary was built without CUDA (no toolkit found at "
                     "configure time, or -DMOE_CUDA=OFF); rebuild with a CUDA toolkit or use --device cpu",
                     gpu);
}

#ifdef MOE_HAVE_NCCL
moe_status moe_comm_nccl_create(MPI_Comm mpi_comm, int device, moe_comm *out)
{
    (void)mpi_comm, (void)out;
    return moe_error(MOE_ERR_UNAVAILABLE, "NCCL comm (GPU %d): this binary was built without the CUDA plugin", device);
}
#endif

#endif
