/* The decode-time kernels of chapter 07's FusedDecoder, for ONE sequence and a few new tokens at a time:
 *   small_gemm  y (M, N) = rmsnorm?(x) (M, K) @ W (K, N) (+ y), for M of 1 to 12 rows;
 *   attend      RoPE, KV-cache write and causal attention of T new tokens in one call;
 *   swiglu      silu(gate) * up.
 * small_gemm splits its column panels over quant_kernels.c's thread pool (set_threads).
 *
 * Why small_gemm: verifying k draft tokens multiplies a handful of rows by every weight matrix. A BLAS sgemm is
 * tuned for big M; at M = 2..8 it did 2-3x the work of one row on this project's CPU (see decode_kernels.py). Here
 * the weights are packed once into column panels (K rows of NB contiguous floats, read front to back), and each
 * panel is read ONCE for up to MAX_ROWS rows of x, so a few rows cost little more than one: the weight stream, not
 * arithmetic, sets the time, as it should in decoding. Two cheap extras ride along: an RMSNorm of x's rows (a
 * per-row scale, applied to the product: (x * r) @ W == r * (x @ W)) and adding into y (the residual connection).
 *
 * GCC/Clang vector extensions keep it portable C: a `v8` is 8 floats (one AVX register with -march=native).
 */
#include <math.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
#define NB 16      /* columns per packed panel: two v8 */
#define MAX_ROWS 12 /* rows per pass over the weights (see the two panel kernels below) */

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* MB rows of x times one packed panel P (K x NB); out[m, j] = scale[m] * acc[m, j] (+ y) for the panel's nb columns.
 * U independent accumulator sets (k even/odd for U = 2) keep the FMA pipeline busy when MB is too small to. */
#define PANEL(MB, U)                                                                                                 \
  static void panel_##MB(const float *x, const float *P, const float *scale, float *y, long K, long N, long nb,   \
                         int add) {                                                                                  \
    v8 lo[U][MB], hi[U][MB];                                                                                         \
    for (int u = 0; u < U; u++)                                                                                      \
      for (int m = 0; m < MB; m++) lo[u][m] = hi[u][m] = (v8){0};                                                    \
    long k = 0;                                                                                                      \
    for (; k + U <= K; k += U)                                                                                       \
      for (int u = 0; u < U; u++) {                                                                                  \
        v8 wl = load8(P + (k + u) * NB), wh = load8(P + (k + u) * NB + 8);                                           \
        for (int m = 0; m < MB; m++) {                                                                               \
          float s = x[m * K + k + u];                                                                                \
          lo[u][m] += s * wl;                                                                                        \
          hi[u][m] += s * wh;                                                                                        \
        }                                                                                                            \
      }                                                                                                              \
    for (; k < K; k++)                                                                                               \
      for (int m = 0; m < MB; m++) {                                                                                 \
        lo[0][m] += x[m * K + k] * load8(P + k * NB);                                                                \
        hi[0][m] += x[m * K + k] * load8(P + k * NB + 8);                                                            \
      }                                                                                                              \
    for (int m = 0; m < MB; m++) {                                                                                   \
      float acc[NB], *dst = y + m * N;                                                                               \
      for (int u = 1; u < U; u++) lo[0][m] += lo[u][m], hi[0][m] += hi[u][m];                                       \
      store8(acc, lo[0][m] * scale[m]);                                                                              \
      store8(acc + 8, hi[0][m] * scale[m]);                                                                          \
      for (long j = 0; j < nb; j++) dst[j] = add ? dst[j] + acc[j] : acc[j];                                         \
    }                                                                                                                \
  }
PANEL(1, 4) PANEL(2, 2) PANEL(3, 1) PANEL(4, 1) PANEL(5, 1) PANEL(6, 1)

/* 7..12 rows: 2 * MB accumulators would not fit in registers, so the panel is done as two 8-column halves with MB
 * accumulators each. The panel (K x 64 bytes, <= 64 KB here) is still in L1/L2 for the second half, so the weights
 * come from memory once for all MB rows. */
#define HALVES(MB)                                                                                                   \
  static void panel_##MB(const float *x, const float *P, const float *scale, float *y, long K, long N, long nb,   \
                         int add) {                                                                                  \
    for (long half = 0; half * 8 < nb; half++) {                                                                     \
      v8 a[MB];                                                                                                      \
      for (int m = 0; m < MB; m++) a[m] = (v8){0};                                                                   \
      for (long k = 0; k < K; k++) {                                                                                 \
        v8 w = load8(P + k * NB + half * 8);                                                                         \
        for (int m = 0; m < MB; m++) a[m] += x[m * K + k] * w;                                                       \
      }                                                                                                              \
      long width = nb - half * 8 < 8 ? nb - half * 8 : 8;                                                            \
      for (int m = 0; m < MB; m++) {                                                                                 \
        float acc[8], *dst = y + m * N + half * 8;                                                                   \
        store8(acc, a[m] * scale[m]);                                                                                \
        for (long j = 0; j < width; j++) dst[j] = add ? dst[j] + acc[j] : acc[j];                                    \
      }                                                                                                              \
    }                                                                                                                \
  }
HALVES(7) HALVES(8) HALVES(9) HALVES(10) HALVES(11) HALVES(12)
typedef void (*panel_fn)(const float *, const float *, const float *, float *, long, long, long, int);
static const panel_fn PANELS[MAX_ROWS + 1] = {0,        panel_1, panel_2,  panel_3,  panel_4,  panel_5, panel_6,
                                              panel_7, panel_8, panel_9, panel_10, panel_11, panel_12};

long panel_width(void) { return NB; }

/* W (K, N) row-major -> packed (ceil(N / NB), K, NB); the last panel is zero-padded. */
void pack_weight(const float *W, float *packed, long K, long N) {
  for (long p = 0; p * NB < N; p++)
    for (long k = 0; k < K; k++)
      for (long j = 0; j < NB; j++) {
        long n = p * NB + j;
        packed[(p * K + k) * NB + j] = n < N ? W[k * N + n] : 0.f;
      }
}

/* quant_kernels.c's thread pool (both files are built into one library) */
void parallel_for(void (*fn)(void *, long, long), void *arg, long total);

typedef struct {
  const float *x, *packed, *scale;
  float *y;
  long K, N, mb;
  int add;
} gemm_job;

static void gemm_panels(void *arg, long p0, long p1) {
  const gemm_job *j = arg;
  for (long p = p0; p < p1; p++) {
    long n0 = p * NB, nb = j->N - n0 < NB ? j->N - n0 : NB;
    PANELS[j->mb](j->x, j->packed + p * j->K * NB, j->scale, j->y + n0, j->K, j->N, nb, j->add);
  }
}

/* y (M, N) = r * (x @ W) (+ y when add), r[m] = 1/sqrt(mean(x[m]^2) + eps) if norm else 1. x (M, K) contiguous. */
void small_gemm(const float *x, const float *packed, float *y, long M, long K, long N, int add, int norm, float eps) {
  for (long m0 = 0; m0 < M; m0 += MAX_ROWS) {
    long mb = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS;
    const float *xb = x + m0 * K;
    float scale[MAX_ROWS];
    for (long m = 0; m < mb; m++) {
      float ss = 0.f;
      if (norm)
        for (long k = 0; k < K; k++) ss += xb[m * K + k] * xb[m * K + k];
      scale[m] = norm ? 1.f / sqrtf(ss / (float)K + eps) : 1.f;
    }
    gemm_job job = {xb, packed, scale, y + m0 * N, K, N, mb, add};
    parallel_for(gemm_panels, &job, (N + NB - 1) / NB); /* threads take contiguous runs of panels */
  }
}

/* SwiGLU's elementwise half: out (T, F) = silu(gu[:, :F]) * gu[:, F:], gu (T, 2F). */
void swiglu(const float *gu, float *out, long T, long F) {
  for (long t = 0; t < T; t++)
    for (long f = 0; f < F; f++) {
      float g = gu[t * 2 * F + f];
      out[t * F + f] = g / (1.f + expf(-g)) * gu[t * 2 * F + F + f];
    }
}

static inline float dot(const float *a, const float *b, long D) {
  v8 acc[4] = {{0}, {0}, {0}, {0}}; /* four independent chains: one would wait on each FMA's latency */
  long d = 0;
  for (; d + 32 <= D; d += 32)
    for (int i = 0; i < 4; i++) acc[i] += load8(a + d + 8 * i) * load8(b + d + 8 * i);
  for (; d + 8 <= D; d += 8) acc[0] += load8(a + d) * load8(b + d);
  v8 sum8 = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  float s = 0.f;
  for (int j = 0; j < 8; j++) s += sum8[j];
  for (; d < D; d++) s += a[d] * b[d];
  return s;
}

typedef int i8 __attribute__((vector_size(32)));

/* e^x for 8 floats at once, x <= 0 (softmax after subtracting the max): x = n ln2 + r with |r| <= ln2/2, e^r by its
 * Taylor polynomial to degree 7 (relative error < 1e-7), 2^n built in the exponent bits. A scalar expf per score cost
 * as much as the dot product that made it. */
static inline v8 exp8(v8 x) {
  i8 low = x < -87.f; /* below this e^x is 0 in float32 anyway: clamp (a bitwise select; C has no vector ?:) */
  x = (v8)(((i8)x & ~low) | ((i8)((v8){0} - 87.f) & low));
  v8 t = x * 1.44269504f - 0.5f;      /* x / ln2, rounded to the nearest integer below by truncation toward zero */
  i8 n = __builtin_convertvector(t, i8);
  n -= (i8)(t < __builtin_convertvector(n, v8)) & 1; /* truncation rounded negatives up: step down */
  n += 1;
  v8 r = x - __builtin_convertvector(n, v8) * 0.693147181f;
  v8 p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r / 5040))))));
  i8 bits = (n + 127) << 23;
  v8 two_n;
  memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

/* sc[j] = e^(sc[j] - mx) for j < n; returns their sum */
static float exp_shifted(float *sc, long n, float mx) {
  v8 acc = {0};
  long j = 0;
  for (; j + 8 <= n; j += 8) {
    v8 e = exp8(load8(sc + j) - mx);
    store8(sc + j, e);
    acc += e;
  }
  float sum = 0.f;
  for (int i = 0; i < 8; i++) sum += acc[i];
  for (; j < n; j++) sum += (sc[j] = expf(sc[j] - mx));
  return sum;
}

/* Rotate one head vector in place, rotate-half layout (ch01's rope): x[i], x[i+h] -> x[i]c_i - x[i+h]s_i,
 * x[i+h]c_{i+h} + x[i]s_{i+h}. cos/sin: this position's row of ch01's rope_cache tables (D floats each). */
static inline void rotate(float *x, const float *cos, const float *sin, long D) {
  long h = D / 2;
  for (long i = 0; i < h; i++) {
    float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

/* out (D) = sum_j p[j] * V[j, :] over n rows: the accumulators stay in registers for the common head sizes. */
#define WSUM(NV)                                                                                                     \
  static void wsum_##NV(const float *p, const float *V, long n, float *out) {                                        \
    v8 acc[NV];                                                                                                      \
    for (int i = 0; i < NV; i++) acc[i] = (v8){0};                                                                   \
    for (long j = 0; j < n; j++)                                                                                     \
      for (int i = 0; i < NV; i++) acc[i] += p[j] * load8(V + j * NV * 8 + i * 8);                                  \
    for (int i = 0; i < NV; i++) store8(out + i * 8, acc[i]);                                                        \
  }
WSUM(1) WSUM(2) WSUM(4) WSUM(8)

static void weighted_sum(const float *p, const float *V, long n, long D, float *out) {
  switch (D) {
    case 8: wsum_1(p, V, n, out); return;
    case 16: wsum_2(p, V, n, out); return;
    case 32: wsum_4(p, V, n, out); return;
    case 64: wsum_8(p, V, n, out); return;
  }
  memset(out, 0, D * sizeof(float));
  for (long j = 0; j < n; j++)
    for (long d = 0; d < D; d++) out[d] += p[j] * V[j * D + d];
}

/* T new tokens of one sequence at positions pos..pos+T-1, in one call:
 *   qkv (T, (H + 2 Hkv) D): q (pre-scaled by 1/sqrt(D)), k, v of the new tokens, before RoPE; rotated IN PLACE;
 *   k, v are written into the cache ck / cv (Hkv, L, D) at their positions;
 *   y (T, H D) = softmax(q k^T) v over cache positions 0..pos+t for token t (causal), query head h reading KV head
 *   h / (H / Hkv) (grouped-query attention: no repeated K/V).
 * cos / sin: (positions, D) tables; rows pos..pos+T-1 are used. */
void attend(float *qkv, float *ck, float *cv, float *y, const float *cos, const float *sin, long T, long H, long Hkv,
            long D, long L, long pos) {
  long row = (H + 2 * Hkv) * D, G = H / Hkv;
  float scores[pos + T];
  for (long t = 0; t < T; t++) {
    float *q = qkv + t * row, *k = q + H * D, *v = k + Hkv * D;
    const float *c = cos + (pos + t) * D, *s = sin + (pos + t) * D;
    for (long j = 0; j < H + Hkv; j++) rotate(q + j * D, c, s, D);
    for (long j = 0; j < Hkv; j++) {
      memcpy(ck + (j * L + pos + t) * D, k + j * D, D * sizeof(float));
      memcpy(cv + (j * L + pos + t) * D, v + j * D, D * sizeof(float));
    }
  }
  for (long t = 0; t < T; t++)
    for (long h = 0; h < H; h++) {
      const float *q = qkv + t * row + h * D, *K = ck + (h / G) * L * D, *V = cv + (h / G) * L * D;
      long S = pos + t + 1;
      float mx = -INFINITY, sum = 0.f;
      for (long j = 0; j < S; j++) {
        scores[j] = dot(q, K + j * D, D);
        mx = scores[j] > mx ? scores[j] : mx;
      }
      sum = exp_shifted(scores, S, mx);
      float *out = y + t * H * D + h * D;
      for (long j = 0; j < S; j++) scores[j] /= sum;
      weighted_sum(scores, V, S, D, out);
    }
}
