/* The elementwise part of one LSTM / GRU / Elman step, forward and backward, as one pass each.
 *
 * forecasting/sequence_kernel.py runs a recurrent layer as one matrix product per step plus these
 * elementwise updates. As torch ops an update is 10-20 calls, each a pass over the gates with
 * its own dispatch; here it is one loop the compiler vectorises (float's exp is inlined below;
 * double, used by the tests, calls libm). NaN and infinities propagate as in torch.
 * Compiled and loaded at run time by forecasting/fused_cells.py.
 *
 * Every step reads the product's output and writes the next products' inputs, in the products'
 * type M: T itself (`_f32`, `_f64`), or bfloat16 for bf16-mixed training (`_mixed`, T = float:
 * state, activations and dh/dc stay float). Buffers (row-major, one row per window of the batch;
 * H = hidden size, G = gate columns; all distinct):
 *   pre    [B, G]  M: the step's pre-activations, the product Z_t @ W
 *   a      [B, G]  T: what the backward pass needs
 *                  LSTM G = 4H: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
 *                  GRU  G = 4H: sigmoid(r), sigmoid(z), W_hn h + b_hn, n
 *   h_prev, h      [B, H] rows `ldh` apart, T: the state
 *   hm             [B, H] rows `ldhm` apart, M: h inside the next step's [x_t, 1, h_t-1] block
 *   c_prev, c, tc  [B, H] T: LSTM cell, and tanh of it
 *   dh             [B, H] T, in: the part of dL/dh_t that the caller knows (the loss's);
 *                  out: GRU dh * z, the part of dL/dh_t-1 that skips the products; LSTM/RNN zero
 *   dh_m           [B, H] M: the recurrent product's part of dL/dh_t (NULL at the last step)
 *   dc             [B, H] T, in: dL/dc_t;  out: dL/dc_t-1 (LSTM)
 *   d_pre          [B, G] rows `ldd` apart, M: dL/d(pre-activations), the products' input
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) {  /* round to nearest even, as torch's conversion */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)  /* NaN: stays a (quiet) NaN, never rounds to inf */
        return (bf16)((u >> 16) | 0x40u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

/* e^x for float, inlined into the loops: Cody-Waite reduction and Cephes' degree-6 polynomial
 * (about 1 ulp); faster in these loops than calling glibc's vector expf (measured). */
static inline float exp_f32(float x) {
    /* Clamped so e^x stays a normal float (sigmoid/tanh saturate anyway); a NaN fails both
     * comparisons and stays NaN, as in torch (the file is built with -fno-finite-math-only). */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = rintf(x * 1.44269504088896341f);  /* NaN: the vector float->int conversion below
                                                  * gives some integer (x86, ARM), p stays NaN */
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;  /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The per-element maths, once per type; LOAD reads a stored pre-activation or gradient,
 * STORE writes a product input (identity, or rounding to bfloat16). */
#define DEFINE_CELLS(T, S, EXP)                                                                \
static inline T sigmoid_##S(T x) { return (T)1 / ((T)1 + EXP(-x)); }                          \
static inline T tanh_##S(T x) { return (T)2 / ((T)1 + EXP((T)-2 * x)) - (T)1; }                \
                                                                                               \
/* LSTM forward: activations into a, c and tanh c, h = o tanh c (returned). */                 \
static inline T lstm_forward_one_##S(T pi, T pf, T pg, T po, T cp, T *a, long H, long j,       \
                                     T *c, T *tc) {                                            \
    T i = sigmoid_##S(pi), f = sigmoid_##S(pf), g = tanh_##S(pg), o = sigmoid_##S(po);         \
    T cv = f * cp + i * g, tv = tanh_##S(cv);                                                  \
    a[j] = i; a[H + j] = f; a[2 * H + j] = g; a[3 * H + j] = o;                                \
    c[j] = cv; tc[j] = tv;                                                                     \
    return o * tv;                                                                             \
}                                                                                              \
                                                                                               \
/* GRU forward: activations into a, h returned. */                                             \
static inline T gru_forward_one_##S(T pr, T pz, T pnh, T pnx, T hp, T *a, long H, long j) {    \
    T r = sigmoid_##S(pr), z = sigmoid_##S(pz), n = tanh_##S(pnx + r * pnh);                   \
    a[j] = r; a[H + j] = z; a[2 * H + j] = pnh; a[3 * H + j] = n;                              \
    return n + z * (hp - n);                                                                   \
}

DEFINE_CELLS(float, f32, exp_f32)
DEFINE_CELLS(double, f64, exp)

/* The exported functions, for state and activations of type T and the products' inputs and
 * outputs of type M (T itself, or bfloat16), read and written through LOAD and STORE. */
#define DEFINE_STEPS(NAME, T, S, M, LOAD, STORE)                                        \
void lstm_forward_##NAME(long B, long H, const M *restrict pre, T *restrict a,               \
                         const T *restrict c_prev, T *restrict c, T *restrict tc,              \
                         T *restrict h, long ldh, M *restrict hm, long ldhm) {               \
    for (long b = 0; b < B; ++b) {                                                             \
        const M *p = pre + b * 4 * H;                                                        \
        T *ar = a + b * 4 * H, *cr = c + b * H, *tr = tc + b * H, *hr = h + b * ldh;           \
        const T *cp = c_prev + b * H;                                                          \
        M *hmr = hm + b * ldhm;                                                              \
        for (long j = 0; j < H; ++j) {                                                         \
            T hv = lstm_forward_one_##S(LOAD(p[j]), LOAD(p[H + j]), LOAD(p[2 * H + j]),        \
                                        LOAD(p[3 * H + j]), cp[j], ar, H, j, cr, tr);          \
            hr[j] = hv;                                                                        \
            hmr[j] = STORE(hv);                                                                \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void gru_forward_##NAME(long B, long H, const M *restrict pre, T *restrict a,                \
                        const T *restrict h_prev, T *restrict h, long ldh,                     \
                        M *restrict hm, long ldhm) {                                         \
    for (long b = 0; b < B; ++b) {                                                             \
        const M *p = pre + b * 4 * H;                                                        \
        T *ar = a + b * 4 * H, *hr = h + b * ldh;                                              \
        const T *hp = h_prev + b * ldh;                                                        \
        M *hmr = hm + b * ldhm;                                                              \
        for (long j = 0; j < H; ++j) {                                                         \
            T hv = gru_forward_one_##S(LOAD(p[j]), LOAD(p[H + j]), LOAD(p[2 * H + j]),         \
                                       LOAD(p[3 * H + j]), hp[j], ar, H, j);                   \
            hr[j] = hv;                                                                        \
            hmr[j] = STORE(hv);                                                                \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void rnn_forward_##NAME(long B, long H, const M *restrict pre, T *restrict h, long ldh,      \
                        M *restrict hm, long ldhm) {                                         \
    for (long b = 0; b < B; ++b) {                                                             \
        const M *p = pre + b * H;                                                            \
        T *hr = h + b * ldh;                                                                   \
        M *hmr = hm + b * ldhm;                                                              \
        for (long j = 0; j < H; ++j) {                                                         \
            T hv = tanh_##S(LOAD(p[j]));                                                       \
            hr[j] = hv;                                                                        \
            hmr[j] = STORE(hv);                                                                \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
/* dh_m: the recurrent product's share of dL/dh_t (or NULL: none yet, the last step). */       \
void lstm_backward_##NAME(long B, long H, const T *restrict a, const T *restrict c_prev,       \
                          const T *restrict tc, T *restrict dh, const M *restrict dh_m,        \
                          T *restrict dc, M *restrict d_pre, long ldd) {                       \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *ar = a + b * 4 * H, *cp = c_prev + b * H, *tr = tc + b * H;                  \
        const M *dmr = dh_m ? dh_m + b * H : 0;                                                \
        T *dcr = dc + b * H, *dhr = dh + b * H;                                                \
        M *dr = d_pre + b * ldd;                                                             \
        for (long j = 0; j < H; ++j) {                                                         \
            T i = ar[j], f = ar[H + j], g = ar[2 * H + j], o = ar[3 * H + j];                  \
            T t = tr[j], d_h = dhr[j] + (dmr ? LOAD(dmr[j]) : (T)0);                           \
            T d_c = dcr[j] + d_h * o * ((T)1 - t * t);                                         \
            dr[j] = STORE(d_c * g * i * ((T)1 - i));                                           \
            dr[H + j] = STORE(d_c * cp[j] * f * ((T)1 - f));                                   \
            dr[2 * H + j] = STORE(d_c * i * ((T)1 - g * g));                                   \
            dr[3 * H + j] = STORE(d_h * t * o * ((T)1 - o));                                   \
            dcr[j] = d_c * f;                                                                  \
            dhr[j] = 0; /* the product's share replaces it at the next step */                 \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void gru_backward_##NAME(long B, long H, const T *restrict a, const T *restrict h_prev,        \
                         long ldh, T *restrict dh, const M *restrict dh_m,                   \
                         M *restrict d_pre, long ldd) {                                      \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *ar = a + b * 4 * H, *hp = h_prev + b * ldh;                                   \
        const M *dmr = dh_m ? dh_m + b * H : 0;                                              \
        T *dhr = dh + b * H;                                                                   \
        M *dr = d_pre + b * ldd;                                                             \
        for (long j = 0; j < H; ++j) {                                                         \
            T r = ar[j], z = ar[H + j], n_h = ar[2 * H + j], n = ar[3 * H + j];                \
            T d_h = dhr[j] + (dmr ? LOAD(dmr[j]) : (T)0);                                      \
            T d_n = d_h * ((T)1 - z) * ((T)1 - n * n);                                         \
            dr[j] = STORE(d_n * n_h * r * ((T)1 - r));                                         \
            dr[H + j] = STORE(d_h * (hp[j] - n) * z * ((T)1 - z));                             \
            dr[2 * H + j] = STORE(d_n * r);                                                    \
            dr[3 * H + j] = STORE(d_n);                                                        \
            dhr[j] = d_h * z;                                                                  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void rnn_backward_##NAME(long B, long H, const T *restrict h, long ldh, T *restrict dh,        \
                         const M *restrict dh_m, M *restrict d_pre, long ldd) {                \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *hr = h + b * ldh;                                                             \
        const M *dmr = dh_m ? dh_m + b * H : 0;                                                \
        T *dhr = dh + b * H;                                                                   \
        M *dr = d_pre + b * ldd;                                                               \
        for (long j = 0; j < H; ++j) {                                                         \
            T d_h = dhr[j] + (dmr ? LOAD(dmr[j]) : (T)0);                                      \
            dr[j] = STORE(d_h * ((T)1 - hr[j] * hr[j]));                                       \
            dhr[j] = 0;                                                                        \
        }                                                                                      \
    }                                                                                          \
}

#define SAME(x) (x)
DEFINE_STEPS(f32, float, f32, float, SAME, SAME)
DEFINE_STEPS(f64, double, f64, double, SAME, SAME)
DEFINE_STEPS(mixed, float, f32, bf16, from_bf16, to_bf16)

/* ---- A whole layer's time loop in one call: each step's product through the BLAS's ?gemm_ and
 * its elementwise update above, with no return to Python between steps.
 *
 * forecasting/sequence_kernel.py otherwise runs the loop itself: per step two or three torch
 * products and a ctypes call. Here (GRU, batch 512, hidden 64, window 36, one thread) the loop in
 * C trained 6% faster, and 13% with the weight gradients taken per step (see sequence_backward;
 * 2026-12-07, AMD EPYC). The products are the same BLAS calls torch's own would make (`gemm` is
 * the ?gemm_ that torch links, found by forecasting/fused_cells.py); the buffers and their
 * layouts are sequence_kernel's (see there):
 *   W      [k + H, G]       the packed weights, k = inputs + 1 (the bias row)
 *   Z      [T + 1, B, k + H]  row t: [x_t, 1, h_t-1]; the forward writes each h_t-1 part
 *   am     [B, G]           one step's product (scratch)
 *   a      [T, B, G]        each step's activations (LSTM, GRU; NULL for the Elman cell)
 *   hs     [T + 1, B, H]    h_t-1 in row t, row 0 zero
 *   c, tc  [T + 1, B, H]    LSTM cells and their tanh, row 0 zero (NULL for GRU and Elman)
 *   d_out  [T, B, H]        the loss's dL/dh_t, strides in elements (NULL: only the last h_t
 *                           is an output, its gradient already in dh)
 *   d_pre  [B, G]           one step's dL/d(pre-activations) (scratch)
 * Cells: 0 LSTM, 1 GRU, 2 Elman. GRU's W is zero in its h rows' n-input columns: those columns
 * take a separate [x_t, 1] product (as in sequence_kernel, ~25% fewer FLOPs per step). */

/* Fortran ?gemm_, column-major. Each integer is passed as a pointer to a 64-bit value: on a
 * little-endian machine an LP64 BLAS reads its low 32 bits and an ILP64 one all 64, and both
 * read the value. The trailing lengths are the hidden ones of the two character arguments
 * (gfortran's ABI; BLAS that do not take them ignore them). */
#define DEFINE_GEMM(NAME, T)                                                                    \
typedef void (*gemm_##NAME##_t)(const char *, const char *, const int64_t *, const int64_t *,     \
                                const int64_t *, const T *, const T *, const int64_t *,         \
                                const T *, const int64_t *, const T *, T *, const int64_t *,    \
                                size_t, size_t);                                                \
                                                                                                \
/* Row-major C[m, n] = op(A) @ op(B), or C += that with `accumulate`: A is [m, k] with rows lda  \
 * apart, or with a_t its transpose, stored [k, m]; likewise B [k, n], or with b_t stored [n, k]. \
 * Column-major, that is C^T = op(B)^T op(A)^T. */                                              \
void matmul_##NAME(void *gemm, long m, long n, long k, const T *a, long lda, long a_t,           \
                   const T *b, long ldb, long b_t, long accumulate, T *c, long ldc) {            \
    const int64_t M = n, N = m, K = k, LDB = ldb, LDA = lda, LDC = ldc;                         \
    const T one = 1, beta = accumulate ? 1 : 0;                                                 \
    ((gemm_##NAME##_t)gemm)(b_t ? "T" : "N", a_t ? "T" : "N", &M, &N, &K, &one, b, &LDB, a, &LDA, \
                            &beta, c, &LDC, 1, 1);                                              \
}

#define DEFINE_SEQUENCES(NAME, T)                                                                \
void sequence_forward_##NAME(void *gemm, long cell, long steps, long B, long n_in, long H,       \
                             const T *W, T *Z, T *am, T *a, T *hs, T *c, T *tc) {               \
    const long k = n_in + 1, ldz = k + H, G = cell == 2 ? H : 4 * H, rec = cell == 1 ? 3 * H : G; \
    for (long t = 0; t < steps; ++t) {                                                          \
        const T *z = Z + t * B * ldz;                                                            \
        if (!t)  /* h_-1 = 0: the x and bias rows only */                                        \
            matmul_##NAME(gemm, B, G, k, z, ldz, 0, W, G, 0, 0, am, G);                                \
        else {                                                                                   \
            matmul_##NAME(gemm, B, rec, ldz, z, ldz, 0, W, G, 0, 0, am, G);                            \
            if (rec < G)                                                                         \
                matmul_##NAME(gemm, B, G - rec, k, z, ldz, 0, W + rec, G, 0, 0, am + rec, G);          \
        }                                                                                        \
        T *h_prev = hs + t * B * H, *h = h_prev + B * H, *hm = Z + (t + 1) * B * ldz + k;         \
        if (cell == 0)                                                                           \
            lstm_forward_##NAME(B, H, am, a + t * B * G, c + t * B * H, c + (t + 1) * B * H,      \
                                tc + (t + 1) * B * H, h, H, hm, ldz);                            \
        else if (cell == 1)                                                                      \
            gru_forward_##NAME(B, H, am, a + t * B * G, h_prev, h, H, hm, ldz);                  \
        else                                                                                     \
            rnn_forward_##NAME(B, H, am, h, H, hm, ldz);                                         \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
/* dh: in, dL/dh of the last step (zero unless only it is an output); dh_m [B, H] and d_pre     \
 * [B, G] scratch; dc [B, H] zero (LSTM). Out: dW [k + H, G], zero on entry, the weights'        \
 * gradient, taken step by step while that step's d_pre is still in cache (one product over all  \
 * steps after the loop reads every d_pre back from memory: ~20% slower at batch 512); d_x       \
 * [T, B, n_in] the input's, or NULL where it needs none. */                                    \
void sequence_backward_##NAME(void *gemm, long cell, long steps, long B, long n_in, long H,      \
                              const T *W, const T *Z, const T *a, const T *hs, const T *c,       \
                              const T *tc, const T *d_out, long s0, long s1, long s2, T *dh,     \
                              T *dh_m, T *dc, T *d_pre, T *dW, T *d_x) {                         \
    const long k = n_in + 1, ldz = k + H, G = cell == 2 ? H : 4 * H, rec = cell == 1 ? 3 * H : G; \
    for (long t = steps - 1; t >= 0; --t) {                                                      \
        if (d_out)                                                                               \
            for (long b = 0; b < B; ++b)                                                         \
                for (long j = 0; j < H; ++j)                                                     \
                    dh[b * H + j] += d_out[t * s0 + b * s1 + j * s2];                            \
        const T *m = t < steps - 1 ? dh_m : 0, *z = Z + t * B * ldz;                             \
        if (cell == 0)                                                                           \
            lstm_backward_##NAME(B, H, a + t * B * G, c + t * B * H, tc + (t + 1) * B * H, dh, m, \
                                 dc, d_pre, G);                                                  \
        else if (cell == 1)                                                                      \
            gru_backward_##NAME(B, H, a + t * B * G, hs + t * B * H, H, dh, m, d_pre, G);        \
        else                                                                                     \
            rnn_backward_##NAME(B, H, hs + (t + 1) * B * H, H, dh, m, d_pre, G);                 \
        if (d_x)  /* dL/dx_t = d_pre @ W[:n_in]^T */                                             \
            matmul_##NAME(gemm, B, n_in, G, d_pre, G, 0, W, G, 1, 0, d_x + t * B * n_in, n_in);  \
        if (!t) {  /* h_-1 = 0: its rows of Z are zero, and no state before step 0 takes dh */   \
            matmul_##NAME(gemm, k, G, B, z, ldz, 1, d_pre, G, 0, 1, dW, G);                      \
            break;                                                                               \
        }                                                                                        \
        /* dW += Z_t^T d_pre; GRU: its zero block (h rows, n-input columns) left out */          \
        matmul_##NAME(gemm, ldz, rec, B, z, ldz, 1, d_pre, G, 0, 1, dW, G);                      \
        if (rec < G)                                                                             \
            matmul_##NAME(gemm, k, G - rec, B, z, ldz, 1, d_pre + rec, G, 0, 1, dW + rec, G);    \
        /* dL/dh_t-1's product part: d_pre[:, :rec] @ W[k:, :rec]^T */                           \
        matmul_##NAME(gemm, B, H, rec, d_pre, G, 0, W + k * G, G, 1, 0, dh_m, H);                \
    }                                                                                            \
}

DEFINE_GEMM(f32, float)
DEFINE_GEMM(f64, double)
DEFINE_SEQUENCES(f32, float)
DEFINE_SEQUENCES(f64, double)
