/* Element-wise and per-vector kernels: rmsnorm, softmax, silu*up, axpy, top-k, rotary. */
#include <math.h>

#include "kernels/cpu/kernels_internal.h"

void moe_rmsnorm(float *y, const float *x, const float *w, int n, float eps)
{
    /* Sum of squares in double: n is at most a few thousand, this is not the hot loop, and it
     * makes the norm independent of summation order (PyTorch reduces in f32 with its own
     * blocking; double is closer to the exact value than either). */
    double ss = 0.0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * (double)x[i];
    /* HF: x * torch.rsqrt(variance + eps) in f32, then * weight. */
    float var = (float)(ss / (double)n);
    float inv = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < n; i++)
        y[i] = (x[i] * inv) * w[i];
}

void moe_softmax(float *x, int n)
{
    if (n <= 0)
        return;
    float mx = x[0];
    for (int i = 1; i < n; i++)
        mx = x[i] > mx ? x[i] : mx;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; i++)
        x[i] *= inv;
}

void moe_silu_mul_scalar(float *gate, const float *up, int n)
{
    for (int i = 0; i < n; i++) {
        float g = gate[i];
        gate[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void moe_silu_mul(float *gate, const float *up, int n)
{
    /* AVX2: the vector exp (a scalar expf per element was 3.5% of a bf16 prefill) */
    moe_kernels_ops()->silu_mul(gate, up, n);
}

void moe_axpy_f32_scalar(float *y, float a, const float *x, int n)
{
    for (int i = 0; i < n; i++)
        y[i] += a * x[i];
}

void moe_axpy(float *y, float a, const float *x, int n)
{
    moe_kernels_ops()->axpy_f32(y, a, x, n);
}

void moe_topk(const float *x, int n, int k, int *idx, float *val)
{
    /* Insertion into a sorted list of k: k is the experts-per-token (2..8), n the expert count
     * (8..128), so O(n*k) beats any heap. Strict '>' keeps the earlier index first on ties.
     * NaN never compares greater, so it is never picked over a number. */
    int m = 0;
    for (int i = 0; i < n; i++) {
        float v = x[i];
        if (m == k && !(v > val[k - 1]))
            continue;
        int p = m < k ? m : k - 1;
        while (p > 0 && v > val[p - 1]) {
            val[p] = val[p - 1];
            idx[p] = idx[p - 1];
            p--;
        }
        val[p] = v;
        idx[p] = i;
        if (m < k)
            m++;
    }
}

void moe_rope(float *x, int n_heads, int head_dim, const float *cos_sin)
{
    int half = head_dim / 2;
    const float *c = cos_sin, *s = cos_sin + half;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int i = 0; i < half; i++) {
            float a = v[i], b = v[i + half];
            /* HF: q*cos + rotate_half(q)*sin, each product rounded then added. */
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i] + a * s[i];
        }
    }
}

void moe_rope_table(float *table, int n_pos, int head_dim, double theta)
{
    int half = head_dim / 2;
    /* PyTorch (HF default rope init), all in f32:
     *   inv_freq = 1.0 / (base ** (arange(0, dim, 2).float() / dim))
     *   freqs = pos.float() * inv_freq;  cos/sin of freqs (cat'ed twice; we keep one half).
     * base is a Python float, so `base ** t` is a f32 pow with a f32 base; the division by a
     * Python float gives f32 too. */
    float base = (float)theta;
    for (int p = 0; p < n_pos; p++) {
        float *row = table + (size_t)p * head_dim;
        for (int i = 0; i < half; i++) {
            float e = (float)(2 * i) / (float)head_dim;
            float inv_freq = 1.0f / powf(base, e);
            float f = (float)p * inv_freq;
            row[i] = cosf(f);
            row[half + i] = sinf(f);
        }
    }
}
