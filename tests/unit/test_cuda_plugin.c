/* The CUDA backend is a plugin loaded on demand (worker/compute/cuda_plugin.h): a CPU process maps
 * no CUDA library (linking cuBLAS costs every process ~150 MiB resident), --device cuda loads the
 * plugin and then fails or runs on what the machine has, and a missing or foreign plugin is a
 * clear error naming the path. Criterion runs each test in its own process, so each starts with
 * the plugin not loaded. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "worker/compute/backend.h"
#include "worker/compute/cuda_plugin.h"

/* Whether /proc/self/maps has a mapping whose path contains `lib`. */
static bool maps_contain(const char *lib)
{
    FILE *f = fopen("/proc/self/maps", "r");
    cr_assert(f);
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof line, f))
        found = strstr(line, lib) != NULL;
    fclose(f);
    return found;
}

Test(cuda_plugin, a_cpu_process_maps_no_cuda_library)
{
    moe_backend *be = NULL;
    cr_assert_eq(moe_backend_create(MOE_DEVICE_CPU, 0, NULL, &be), MOE_OK);
    const char *libs[] = {"libcublas", "libcudart", "libnccl", "libmoe_cuda"};
    for (size_t i = 0; i < sizeof libs / sizeof libs[0]; i++)
        cr_expect(!maps_contain(libs[i]), "a CPU-only process maps %s", libs[i]);
    cr_expect_null(moe_cuda_plugin_loaded_path());
    moe_backend_free(be);
}

Test(cuda_plugin, device_cuda_loads_the_plugin_then_answers_for_the_machine)
{
    moe_backend *be = NULL;
    moe_status st = moe_backend_cuda_create(0, &be);
#ifdef MOE_TEST_CUDA_PLUGIN
    /* The plugin loaded whatever the machine has; without a GPU its own check answers. */
    cr_assert_not_null(moe_cuda_plugin_loaded_path(), "not loaded: %s", moe_error_message());
    cr_expect(maps_contain("libcublas"), "the plugin is loaded but cuBLAS is not mapped");
    if (st == MOE_OK) {
        cr_log_info("cuda: %s", be->ops->describe(be));
        moe_backend_free(be);
    } else {
        cr_expect_eq(st, MOE_ERR_UNAVAILABLE);
        cr_expect(strstr(moe_error_message(), "could not be loaded") == NULL,
                  "the plugin loaded, yet the error says it did not: %s", moe_error_message());
        cr_log_info("no GPU here, as the plugin says: %s", moe_error_message());
    }
#else
    cr_expect_eq(st, MOE_ERR_UNAVAILABLE);
    cr_expect(strstr(moe_error_message(), "built without CUDA") != NULL, "%s", moe_error_message());
    cr_expect_null(moe_cuda_plugin_loaded_path());
#endif
}

#ifdef MOE_TEST_CUDA_PLUGIN
Test(cuda_plugin, a_missing_plugin_is_an_error_naming_the_path)
{
    setenv("MOE_CUDA_PLUGIN", "/nonexistent/libmoe_cuda.so", 1);
    moe_backend *be = NULL;
    cr_assert_eq(moe_backend_cuda_create(0, &be), MOE_ERR_UNAVAILABLE);
    const char *msg = moe_error_message();
    cr_expect(strstr(msg, "/nonexistent/libmoe_cuda.so") && strstr(msg, "MOE_CUDA_PLUGIN"), "%s", msg);
    cr_expect_null(moe_cuda_plugin_loaded_path());
    cr_expect(!maps_contain("libcublas"));
}

Test(cuda_plugin, a_library_that_is_not_the_plugin_is_refused)
{
    /* A real shared library without the entry points: refused, and nothing of it is called. */
    setenv("MOE_CUDA_PLUGIN", "libz.so.1", 1);
    moe_backend *be = NULL;
    cr_assert_eq(moe_backend_cuda_create(0, &be), MOE_ERR_UNAVAILABLE);
    cr_expect(strstr(moe_error_message(), "not this build's plugin") != NULL, "%s", moe_error_message());
    cr_expect_null(moe_cuda_plugin_loaded_path());
}

Test(cuda_plugin, the_plugin_of_this_build_loads_from_its_path)
{
    setenv("MOE_CUDA_PLUGIN", MOE_TEST_CUDA_PLUGIN, 1);
    moe_backend *be = NULL;
    moe_status st = moe_backend_cuda_create(0, &be);
    cr_assert_str_eq(moe_cuda_plugin_loaded_path(), MOE_TEST_CUDA_PLUGIN, "%s", moe_error_message());
    if (st == MOE_OK)
        moe_backend_free(be);
}
#endif
