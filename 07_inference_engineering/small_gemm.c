/* Small-batch matrix multiply for decoding: y (M, N) = rmsnorm?(x) (M, K) @ W (K, N) (+ y), for M of 1 to ~12 rows.
 *
 * Why: verifying k draft tokens multiplies a handful of rows by every weight matrix. A BLAS sgemm is tuned for big
 * M; at M = 2..8 it did 2-3x the work of one row on this project's CPU (see small_gemm.py). Here the weights are
 * packed once into column panels (K rows of NB contiguous floats, read front to back), and each panel is read ONCE
 * for up to MAX_ROWS rows of x, so a few rows cost little more than one: the weight stream, not arithmetic, sets the
 * time, as it should in decoding. Two cheap extras ride along: an RMSNorm of x's rows (a per-row scale, applied to the
 * product: (x * r) @ W == r * (x @ W)) and adding into y (the residual connection).
 *
 * GCC/Clang vector extensions keep it portable C: a `v8` is 8 floats (one AVX register with -march=native).
 */
#include <math.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));
#define NB 16      /* columns per packed panel: two v8 */
#define MAX_ROWS 6 /* rows per pass: 2 * MAX_ROWS accumulators + 2 weight vectors fit the 16 AVX registers */

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
typedef void (*panel_fn)(const float *, const float *, const float *, float *, long, long, long, int);
static const panel_fn PANELS[MAX_ROWS + 1] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6};

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
    for (long p = 0; p * NB < N; p++) {
      long n0 = p * NB, nb = N - n0 < NB ? N - n0 : NB;
      PANELS[mb](xb, packed + p * K * NB, scale, y + m0 * N + n0, K, N, nb, add);
    }
  }
}
