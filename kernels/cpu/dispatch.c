/* Run-time ISA selection: CPUID at first use, MOE_ISA override, the test hook, dtype/ISA names. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels/cpu/kernels_internal.h"

static const moe_kernel_ops ops_scalar = {
    moe_matmul_rows_scalar, moe_dot_f32_scalar,    moe_axpy_f32_scalar,      moe_attn_scores_scalar,
    moe_attn_accum_scalar,  moe_quantize_x_scalar, moe_matmul_rows_q_scalar, 4,
    moe_attn_exp_scalar, moe_silu_mul_scalar, NULL, NULL, NULL};
static const moe_kernel_ops ops_avx2 = {
    moe_matmul_rows_avx2, moe_dot_f32_avx2,    moe_axpy_f32_avx2,      moe_attn_scores_avx2,
    moe_attn_accum_avx2,  moe_quantize_x_avx2, moe_matmul_rows_q_avx2, 16,
    moe_attn_exp_avx2, moe_silu_mul_avx2, NULL, NULL, NULL};
/* Per kernel, not per machine: an AVX-512 CPU runs each kernel on the fastest code measured for
 * it, which is not always the AVX-512 one. Attention is memory bound: the AVX2 chunk kernels
 * serve AVX-512 CPUs as well. The int8 rows of the quantized matmul are the VNNI ones
 * (quant_avx512.c, vpdpbusd, same bits as AVX2): no case measured slower than the AVX2 rows on
 * an AMD EPYC Zen 4 (Q8 and Q4, decode b = 1, 4, 16, 64 and prefill 128, 512 on the OLMoE and
 * small expert shapes: b=1 equal, the rest faster; bench/RESULTS.md "Issue 16, AVX512-VNNI");
 * x quantization stays AVX2's (a small share).
 * The float matmul (matmul_rows, matmul_avx512.c): bf16
 * weights on vdpbf16ps with x as hi + lo bf16, for every n_tok (batch invariance), f32/f16 on the
 * AVX2 rows. On an AMD EPYC Zen 4 (2026-12-04, bench/RESULTS.md "Issue 16, AVX512-BF16
 * vdpbf16ps"), one thread, thread CPU time, alternated with MOE_ISA=avx2: bf16 kernel 1.8-2.2x
 * the AVX2 rows at n_tok = 1 in cache, 1.2x on the 50304x2048 lm_head from DRAM, 0.96-1.7x from 4
 * to 512 tokens on the small and OLMoE shapes; engine decode b=1 10-30% and b=16 8-15% less CPU
 * time, prefill 512 equal within noise; f16 AVX2 rows beat
 * the 16-lane FMA tiles this file used to have (prefill 73-82 against 56-63 GFLOP/s), f32 was a
 * tie (memory bound); those tiles and MOE_MATMUL_AVX512 are gone. On the Intel Xeon of issue 16
 * those widening AVX-512 rows lost to AVX2 by 12-55%; on an Intel Xeon with AMX the vdpbf16ps
 * rows too lost to AVX2 from 4 tokens on (vdpbf16ps issues once per cycle there), where the amx
 * table below replaces them, and an Intel CPU left at avx512 takes ops_avx512_intel (the AVX2
 * rows for bf16). MOE_BF16_X=round (ops_avx512_xbf16): x as one bf16, 2x faster again, but it
 * fails the HF bf16 fixture's tolerance, so it is opt-in. dot_f32 and axpy_f32 keep their
 * AVX-512 versions (no slower measurement). */
static const moe_kernel_ops ops_avx512 = {
    moe_matmul_rows_avx512, moe_dot_f32_avx512,  moe_axpy_f32_avx512,    moe_attn_scores_avx512,
    moe_attn_accum_avx512,   moe_quantize_x_avx2, moe_matmul_rows_q_avx512, 16,
    moe_attn_exp_avx2, moe_silu_mul_avx2, NULL, NULL, NULL};
/* MOE_BF16_X=round: the same table with x rounded to one bf16 (moe_matmul_rows_avx512_xbf16). */
static const moe_kernel_ops ops_avx512_xbf16 = {
    moe_matmul_rows_avx512_xbf16, moe_dot_f32_avx512,  moe_axpy_f32_avx512,    moe_attn_scores_avx512,
    moe_attn_accum_avx512,         moe_quantize_x_avx2, moe_matmul_rows_q_avx512, 16,
    moe_attn_exp_avx2, moe_silu_mul_avx2, NULL, NULL, NULL};

/* An Intel CPU whose best level is avx512 (AVX512_BF16 without AMX, or AMX not granted by the
 * OS or hypervisor): the AVX-512 table with bf16 on the AVX2 rows. vdpbf16ps issues once per
 * cycle on Intel (twice on Zen 4): on the Intel Xeon of bench/RESULTS.md "Issue 16, AMX bf16
 * tiles" (MOE_ISA=avx512) the vdpbf16ps rows equal the AVX2 rows at n_tok = 1 (28.8-34.0 against
 * 31.5-33.4 GFLOP/s, from memory) and lose from 4 tokens on (53-61 against 78-105; 512 tokens
 * 53-60 against 99-101). Batch invariance keeps one path for every n_tok, so the AVX2 rows. Only
 * when avx512 is the CPU's own choice: MOE_ISA=avx512 or a test forcing the level asks for the
 * AVX-512 kernels and gets the vdpbf16ps rows (so they stay tested on Intel CPUs). The AVX2
 * rows' arithmetic runs on zmm there from 4 tokens on (matmul_wide_avx512.c: two tokens' 8-lane
 * accumulators per register, the same bits), since the 8-lane FMAs used half of the two 512-bit
 * FMA ports (bench/RESULTS.md "Issue 16, the AVX2 bf16 rows on zmm").
 * Intel tables (this one and the amx ones) take the Q8 and Q4 batch tiles on zmm
 * (moe_matmul_rows_q_avx512z, same bits): a zmm vpdpbusd does twice a ymm one's work per cycle
 * there (not on Zen 4, which keeps ops_avx512's ymm tiles); `matmul_cputime ... q4|q8 9 abz` on
 * the issue 16 Xeon: Q4 6-token tiles 1.20x, 16-512 tokens 1.10-1.16x, Q8 6 tokens 1.12x, 64-512
 * tokens 1.10-1.12x, 1-4 tokens equal (bench/RESULTS.md "Issue 16, Q4 batch tiles on zmm" and
 * "Q8 batch tiles on zmm"). */
static const moe_kernel_ops ops_avx512_intel = {
    moe_matmul_rows_wide_avx512,  moe_dot_f32_avx512,  moe_axpy_f32_avx512,    moe_attn_scores_avx512,
    moe_attn_accum_avx512, moe_quantize_x_avx2, moe_matmul_rows_q_avx512z, 16,
    moe_attn_exp_avx512, moe_silu_mul_avx2, NULL, NULL, NULL};

/* AMX CPUs: the AVX-512 table with the bf16 rows on the tiles (matmul_amx.c). bf16 on AMX for
 * every n_tok (batch invariance forbids switching paths by n_tok): measured on an Intel Xeon
 * (Sapphire/Emerald Rapids class, 2026-12-05; bench/RESULTS.md "Issue 16, AMX bf16 tiles"). The
 * rest is the AVX-512 table's; Q8/Q4 stay on VNNI: AMX int8 sums whole 64-byte k steps, which
 * cannot give the per-lane bits every ISA shares (docs/kernels.md). */
static const moe_kernel_ops ops_amx = {
    moe_matmul_rows_amx,  moe_dot_f32_avx512,  moe_axpy_f32_avx512,    moe_attn_scores_avx512,
    moe_attn_accum_avx512, moe_quantize_x_avx2, moe_matmul_rows_q_avx512z, 16,
    moe_attn_exp_avx512, moe_silu_mul_avx2, moe_amx_x_bytes, moe_amx_x_prep, moe_matmul_rows_amx_px};
static const moe_kernel_ops ops_amx_xbf16 = {
    moe_matmul_rows_amx_xbf16, moe_dot_f32_avx512,  moe_axpy_f32_avx512,    moe_attn_scores_avx512,
    moe_attn_accum_avx512,      moe_quantize_x_avx2, moe_matmul_rows_q_avx512z, 16,
    moe_attn_exp_avx512, moe_silu_mul_avx2, moe_amx_x_bytes_xbf16, moe_amx_x_prep_xbf16,
    moe_matmul_rows_amx_px_xbf16};

/* -1: not decided yet (MOE_BF16_X read at the first use); 0/1 afterwards or from the test hook. */
static _Atomic int bf16_x_round = -1;

void moe_kernels_test_bf16_x_round(int on)
{
    atomic_store_explicit(&bf16_x_round, on ? 1 : 0, memory_order_release);
}

static int use_bf16_x_round(void)
{
    int v = atomic_load_explicit(&bf16_x_round, memory_order_acquire);
    if (v < 0) {
        const char *e = getenv("MOE_BF16_X");
        v = e && strcmp(e, "round") == 0;
        atomic_store_explicit(&bf16_x_round, v, memory_order_release);
    }
    return v;
}

/* -1 until first use. Selection is idempotent, so a race between two first callers is harmless:
 * both compute the same value. */
static _Atomic int active_isa = -1;
/* 1 while the active ISA is the CPU's best, chosen by nobody (no MOE_ISA naming a level, no test
 * forcing one): the Intel rule (ops_avx512_intel) applies only then. */
static _Atomic int isa_is_default = 1;

const char *moe_dtype_name(moe_dtype dt)
{
    switch (dt) {
    case MOE_DT_F32:
        return "f32";
    case MOE_DT_BF16:
        return "bf16";
    case MOE_DT_F16:
        return "f16";
    case MOE_DT_Q8:
        return "q8";
    case MOE_DT_Q4:
        return "q4";
    default:
        return "?";
    }
}

const char *moe_isa_name(moe_isa isa)
{
    switch (isa) {
    case MOE_ISA_SCALAR:
        return "scalar";
    case MOE_ISA_AVX2:
        return "avx2";
    case MOE_ISA_AVX512:
        return "avx512";
    case MOE_ISA_AMX:
        return "amx";
    default:
        return "?";
    }
}

#if defined(__x86_64__) || defined(__i386__)
int moe_kernels_cpu_is_intel(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d))
        return 0;
    /* The vendor string is EBX, EDX, ECX: "Genu" "ineI" "ntel". */
    return b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;
}

/* F16C (CPUID leaf 1, ECX bit 29) read by hand: clang 14 rejects __builtin_cpu_supports("f16c")
 * ("invalid cpu feature string") and the fuzzers are built with clang. F16C only uses the YMM
 * state, which the "avx2" check below already requires the OS to save. */
static int cpu_has_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    return (c >> 29) & 1u;
}
#endif

/* AMX-TILE and AMX-BF16 (CPUID leaf 7 EDX bits 24 and 22), read by hand like F16C, and the tile
 * data state granted to this process: Linux (5.16+) enables it in XCR0 but faults a process's
 * first tile instruction unless the process asked for it (arch_prctl ARCH_REQ_XCOMP_PERM, which
 * covers every thread of the process). Asked once; the answer is kept. Under valgrind (no AMX
 * support) the request fails and AMX is not used. */
#if defined(__linux__) && defined(__x86_64__)
#define ARCH_GET_XCOMP_SUPP 0x1021
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static _Atomic int amx_granted = -1;

static int cpu_has_amx_bf16(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return ((d >> 24) & 1u) && ((d >> 22) & 1u);
}

static int os_grants_amx(void)
{
    int v = atomic_load_explicit(&amx_granted, memory_order_acquire);
    if (v < 0) {
        unsigned long supp = 0;
        v = cpu_has_amx_bf16() && syscall(SYS_arch_prctl, ARCH_GET_XCOMP_SUPP, &supp) == 0 &&
            ((supp >> XFEATURE_XTILEDATA) & 1u) &&
            syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        atomic_store_explicit(&amx_granted, v, memory_order_release);
    }
    return v;
}
#else
static int os_grants_amx(void)
{
    return 0;
}
#endif

/* The best ISA this CPU (and OS: __builtin_cpu_supports checks XCR0 state) can run. */
static moe_isa cpu_best_isa(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    int f16c = cpu_has_f16c();
    /* The AVX-512 file is compiled with F/BW/VL/DQ/BF16/VNNI; require them all so that no
     * instruction the compiler picked can fault. */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
        return os_grants_amx() ? MOE_ISA_AMX : MOE_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c)
        return MOE_ISA_AVX2;
#endif
    return MOE_ISA_SCALAR;
}
#if !defined(__x86_64__) && !defined(__i386__)
int moe_kernels_cpu_is_intel(void)
{
    return 0;
}
#endif

static moe_isa select_isa(void)
{
    moe_isa best = cpu_best_isa();
    const char *env = getenv("MOE_ISA");
    if (env && *env) {
        /* The override can only lower the ISA: asking for more than the CPU has must not
         * crash with SIGILL later. An unknown value keeps the CPU's best (and the default). */
        for (int i = MOE_ISA_SCALAR; i <= MOE_ISA_AMX; i++)
            if (strcmp(env, moe_isa_name((moe_isa)i)) == 0) {
                atomic_store_explicit(&isa_is_default, 0, memory_order_release);
                if ((moe_isa)i < best)
                    best = (moe_isa)i;
            }
    }
    return best;
}

moe_isa moe_kernels_isa(void)
{
    int isa = atomic_load_explicit(&active_isa, memory_order_acquire);
    if (isa < 0) {
        isa = (int)select_isa();
        atomic_store_explicit(&active_isa, isa, memory_order_release);
    }
    return (moe_isa)isa;
}

moe_isa moe_kernels_force_isa(moe_isa isa)
{
    if (isa >= MOE_ISA_SCALAR && isa <= cpu_best_isa()) {
        atomic_store_explicit(&isa_is_default, 0, memory_order_release);
        atomic_store_explicit(&active_isa, (int)isa, memory_order_release);
    }
    return moe_kernels_isa();
}

/* -1 until first use: whether the Intel rule applies (an Intel CPU left at its default avx512). */
static _Atomic int intel_bf16_rule = -1;

static int bf16_on_avx2_rows(void)
{
    int v = atomic_load_explicit(&intel_bf16_rule, memory_order_acquire);
    if (v < 0) {
        v = moe_kernels_cpu_is_intel();
        atomic_store_explicit(&intel_bf16_rule, v, memory_order_release);
    }
    return v && atomic_load_explicit(&isa_is_default, memory_order_acquire);
}

const moe_kernel_ops *moe_kernels_table(moe_isa isa, int x_round, int intel_rule)
{
    switch (isa) {
    case MOE_ISA_AMX:
        return x_round ? &ops_amx_xbf16 : &ops_amx;
    case MOE_ISA_AVX512:
        if (x_round)
            return &ops_avx512_xbf16;
        return intel_rule ? &ops_avx512_intel : &ops_avx512;
    case MOE_ISA_AVX2:
        return &ops_avx2;
    default:
        return &ops_scalar;
    }
}

const moe_kernel_ops *moe_kernels_ops(void)
{
    moe_isa isa = moe_kernels_isa();
    return moe_kernels_table(isa, use_bf16_x_round(), isa == MOE_ISA_AVX512 && bf16_on_avx2_rows());
}

const char *moe_kernels_describe(void)
{
    /* Every entry is a fixed string: the choice is made once per process (tests aside). */
    switch (moe_kernels_isa()) {
    case MOE_ISA_AMX:
        return use_bf16_x_round()
                   ? "isa=amx: matmul float=bf16:amx-tiles-xround (MOE_BF16_X=round) "
                     "f32/f16:avx2 quant=avx512-vnni:zmm-batch attention=avx512vl silu=avx2 dot/axpy=avx512"
                   : "isa=amx: matmul float=bf16:amx-tiles-xsplit f32/f16:avx2 "
                     "quant=avx512-vnni:zmm-batch attention=avx512vl silu=avx2 dot/axpy=avx512";
    case MOE_ISA_AVX512:
        if (use_bf16_x_round())
            return "isa=avx512: matmul float=bf16:avx512-dpbf16-xround (MOE_BF16_X=round) "
                   "f32/f16:avx2 quant=avx512-vnni attention=avx512vl silu=avx2 dot/axpy=avx512";
        return bf16_on_avx2_rows()
                   ? "isa=avx512: matmul float=avx2-arith:zmm-token-pairs (Intel: vdpbf16ps rows "
                     "measured slower) "
                     "quant=avx512-vnni:zmm-batch attention=avx512vl silu=avx2 dot/axpy=avx512"
                   : "isa=avx512: matmul float=bf16:avx512-dpbf16-xsplit f32/f16:avx2 "
                     "quant=avx512-vnni attention=avx512vl silu=avx2 dot/axpy=avx512";
    case MOE_ISA_AVX2:
        return "isa=avx2: matmul float=avx2 quant=avx2-int8 attention=avx2 "
               "silu=avx2 dot/axpy=avx2";
    default:
        return "isa=scalar: every kernel scalar";
    }
}
