/* Weight-only quantized matmuls for decoding, in llama.cpp's block formats, and the thread pool of ch07's kernels.
 *
 *   q_matmul  y (M, N) = q8(rmsnorm?(x) * gain) (M, K) @ W^T (+ y), W (N, K) stored as Q8_0, Q4_0 or Q4_1 blocks
 *   parallel_for  the pool: splits [0, n) over the threads (the F32 small_gemm of decode_kernels.c uses it too)
 *
 * Block formats (ggml-quants.c), 32 weights of one row per block, scales in fp16:
 *   Q8_0  w = d * q,       q int8              (34 bytes in the GGUF: 8.5 bits per weight)
 *   Q4_0  w = d * (q - 8), q 4 bits in [0, 15]  (18 bytes: 4.5 bits)
 *   Q4_1  w = d * q + m,   q 4 bits in [0, 15]  (20 bytes: 5 bits)
 * Here the scales and the codes of a weight are kept in two arrays (same bytes, just not interleaved), so code loads
 * are aligned to the block and the fp16 scales are converted 1 at a time with F16C.
 *
 * The activation trick (llama.cpp's vec_dot_q8_0_q8_0 / q4_0_q8_0 / q4_1_q8_1): the input row is itself quantized to
 * Q8_0 blocks (one fp16 scale per 32 values, int8 codes), so a block's dot product is ONE integer dot product of 32
 * int8 x int8 (or u4 x int8) pairs — 2 AVX2 instructions (maddubs + madd) or 1 with AVX-VNNI — times the two scales:
 *   sum_j w_j x_j = d_w d_x sum_j q_j p_j            (Q8_0)
 *                 = d_w (d_x sum_j q_j p_j - 8 s_x)  (Q4_0, s_x = d_x sum_j p_j)
 *                 = d_w d_x sum_j q_j p_j + m_w s_x  (Q4_1)
 * Numerically the input is rounded to 8 bits per 32-value block (relative error <= 1/254 of the block's largest
 * value): outputs are not those of the dequantized weights times the float input, but those of the dequantized
 * weights times the Q8_0-rounded input — exactly what llama.cpp computes (tests check both).
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QK 32
enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };

/* ------------------------------------------------------------------------------------------------ thread pool */
/* A persistent pool: workers spin briefly on a generation counter (a decode step launches ~150 matmuls a few
 * microseconds apart, too short to sleep and wake), then sleep on a condition variable, so an idle pool costs no
 * CPU on a shared machine. Work is split into equal contiguous ranges, one per thread. */
#define MAX_THREADS 64
typedef void (*task_fn)(void *arg, long i0, long i1);
static struct {
  int n;       /* threads used, including the caller */
  int created; /* threads that exist, including the caller (workers never exit) */
  pthread_t th[MAX_THREADS];
  atomic_long gen;
  atomic_int done, sleepers;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  task_fn fn;
  void *arg;
  long total;
} pool = {1, 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void run_chunk(int id) {
  long per = (pool.total + pool.n - 1) / pool.n, i0 = id * per, i1 = i0 + per < pool.total ? i0 + per : pool.total;
  if (i0 < i1) pool.fn(pool.arg, i0, i1);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

static void *worker(void *p) {
  int id = (int)(long)p;
  long seen = 0;
  for (;;) {
    int spins = 0;
    while (atomic_load(&pool.gen) == seen) {
      if (++spins < 4000) { /* ~0.1-0.5 ms of pause instructions, then sleep */
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&pool.mu);
      atomic_fetch_add(&pool.sleepers, 1);
      while (atomic_load(&pool.gen) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
      atomic_fetch_sub(&pool.sleepers, 1);
      pthread_mutex_unlock(&pool.mu);
    }
    seen = atomic_load(&pool.gen);
    run_chunk(id);
    atomic_fetch_add(&pool.done, 1);
  }
  return NULL;
}

static pthread_mutex_t pool_owner = PTHREAD_MUTEX_INITIALIZER;

/* Threads used by the kernels from now on (1 = the caller only). Workers are created once and never exit. */
int set_threads(int n) {
  n = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
  if (n == pool.n) return n;
  pthread_mutex_lock(&pool_owner); /* never while a job runs: its ranges are computed from pool.n */
  for (; pool.created < n; pool.created++)
    if (pthread_create(&pool.th[pool.created], NULL, worker, (void *)(long)pool.created) != 0) break;
  pool.n = n < pool.created ? n : pool.created;
  pthread_mutex_unlock(&pool_owner);
  return pool.n;
}

int get_threads(void) { return pool.n; }

/* Run fn over [0, total) in pool.n equal ranges; returns when all are done. One caller at a time uses the pool: a
 * second concurrent caller (another Python thread in a kernel: ctypes releases the GIL) runs its job by itself. */
void parallel_for(task_fn fn, void *arg, long total) {
  if (pool.n == 1 || total < 2 || pthread_mutex_trylock(&pool_owner) != 0) {
    fn(arg, 0, total);
    return;
  }
  /* every worker wakes, including any beyond pool.n (after set_threads lowered it): their ranges are empty */
  pool.fn = fn, pool.arg = arg, pool.total = total;
  atomic_store(&pool.done, 0);
  atomic_fetch_add(&pool.gen, 1);
  if (atomic_load(&pool.sleepers) > 0) {
    pthread_mutex_lock(&pool.mu);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
  }
  run_chunk(0);
  /* wait for the others; yield now and then: on an oversubscribed CPU a worker may be waiting for this very core */
  for (long spins = 1; atomic_load(&pool.done) < pool.created - 1; spins++)
    if (spins % 256) cpu_relax();
    else sched_yield();
  pthread_mutex_unlock(&pool_owner);
}

/* ------------------------------------------------------------------------------------------ activation rows */
static inline float fp16_to_f32(uint16_t h) {
  _Float16 v;
  memcpy(&v, &h, 2);
  return (float)v;
}

/* One input row -> Q8_0 blocks: codes p (K), scales dx (K/32, rounded through fp16 as the file format stores them)
 * and block sums sx = dx * sum(p). x is first scaled by r (RMSNorm) and gain (the norm's weight, if any). */
static void quantize_row(const float *x, long K, float r, const float *gain, int8_t *p, float *dx, float *sx) {
  float v[QK];
  for (long b = 0; b < K / QK; b++) {
    float amax = 0.f;
    for (int j = 0; j < QK; j++) {
      v[j] = x[b * QK + j] * r * (gain ? gain[b * QK + j] : 1.f);
      amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
    }
    float d = amax / 127.f, id = d > 0 ? 1.f / d : 0.f; /* as ggml and ch06's quantize_q8_0 */
    int sum = 0;
    for (int j = 0; j < QK; j++) { /* roundf (ties away from zero, ggml's reference) as floors: vectorizes */
      float t = v[j] * id, a = fabsf(t), fl = floorf(a);
      int q = (int)copysignf(fl + floorf(2.f * (a - fl)), t);
      p[b * QK + j] = (int8_t)q;
      sum += q;
    }
    dx[b] = (float)(_Float16)d; /* the stored scale is fp16 */
    sx[b] = dx[b] * (float)sum;
  }
}

/* ------------------------------------------------------------------------------------------ block dot products */
typedef struct {
  int type;
  const void *qs;        /* codes (N, K) int8 or (N, K/2) packed nibbles */
  const uint16_t *d, *m; /* fp16 scales (N, K/32), Q4_1 minimums (N, K/32) */
  const int8_t *p;       /* activation codes (M, K) */
  const float *dx, *sx;  /* activation scales and block sums (M, K/32) (float mode: sx = block sums of xf) */
  const float *xf;       /* float mode: the (normed, gained) input rows themselves (M, K) */
  float *y;
  const float *row_mult; /* optional per-output scale (N) */
  long M, K, N;
  int add;
} qjob;

#if defined(__AVX2__)
/* 8 int32 partial sums of u (unsigned bytes) * s (signed bytes), 4 neighbouring pairs per lane */
static inline __m256i dot_u8_s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); /* one instruction */
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)); /* products fit int16: |u s| <= 127^2 */
#endif
}
static inline __m256i load32(const void *q) { return _mm256_loadu_si256((const __m256i *)q); }
static inline __m256i load_q4(const uint8_t *q) { /* 16 bytes -> 32 codes 0..15: low nibbles are weights 0..15 */
  __m128i b = _mm_loadu_si128((const __m128i *)q);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
/* Block b of weight row n times R activation rows m0.. : acc[r] += d_w d_x (integer dot) (8 lanes), mins[r] += the
 * Q4_1 minimum's term. Q8_0 and Q4_0 (codes - 8) are signed: |w| x (p with w's sign), as maddubs / dpbusd want one
 * unsigned operand; Q4_1 codes are unsigned already. `type` is a constant at every call: the branches fold away. */
static inline __attribute__((always_inline)) void block_dot(const qjob *j, int type, long n, long b, long m0,
                                                              int R, __m256 *acc, float *mins) {
  long K = j->K, nb = K / QK;
  float dw = fp16_to_f32(j->d[n * nb + b]);
  __m256i w = type == Q8_0 ? load32((const int8_t *)j->qs + n * K + b * QK)
                           : load_q4((const uint8_t *)j->qs + n * K / 2 + b * QK / 2);
  if (type == Q4_0) w = _mm256_sub_epi8(w, _mm256_set1_epi8(8));
  __m256i u = type == Q4_1 ? w : _mm256_sign_epi8(w, w);
  for (int r = 0; r < R; r++) {
    long row = (m0 + r) * nb + b;
    __m256i p = load32(j->p + (m0 + r) * K + b * QK);
    __m256i s = dot_u8_s8(u, type == Q4_1 ? p : _mm256_sign_epi8(p, w));
    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * j->dx[row]), _mm256_cvtepi32_ps(s), acc[r]);
    if (type == Q4_1) mins[r] += fp16_to_f32(j->m[n * nb + b]) * j->sx[row];
  }
}
/* The exact-input variant: weights dequantized in registers, times the float input (no input rounding). */
static inline __attribute__((always_inline)) void block_dot_f(const qjob *j, int type, long n, long b, long m0,
                                                                int R, __m256 *acc, float *mins) {
  long K = j->K, nb = K / QK;
  float dw = fp16_to_f32(j->d[n * nb + b]);
  __m256 w[4];
  if (type == Q8_0) {
    const int8_t *q = (const int8_t *)j->qs + n * K + b * QK;
    for (int i = 0; i < 4; i++) w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
  } else {
    __m256i c = load_q4((const uint8_t *)j->qs + n * K / 2 + b * QK / 2);
    if (type == Q4_0) c = _mm256_sub_epi8(c, _mm256_set1_epi8(8));
    __m128i h[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
    for (int i = 0; i < 4; i++)
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(i % 2 ? _mm_srli_si128(h[i / 2], 8) : h[i / 2]));
  }
  for (int r = 0; r < R; r++) {
    const float *x = j->xf + (m0 + r) * K + b * QK;
    __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    for (int i = 1; i < 4; i++) s = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + 8 * i), s);
    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw), s, acc[r]);
    if (type == Q4_1) mins[r] += fp16_to_f32(j->m[n * nb + b]) * j->sx[(m0 + r) * nb + b];
  }
}
#define FINISH(r, v) (hsum(v))
#else
static inline __attribute__((always_inline)) void block_dot(const qjob *j, int type, long n, long b, long m0,
                                                              int R, float *acc, float *mins) {
  long K = j->K, nb = K / QK;
  float dw = fp16_to_f32(j->d[n * nb + b]);
  const int8_t *q8 = (const int8_t *)j->qs + n * K + b * QK;
  const uint8_t *q4 = (const uint8_t *)j->qs + n * K / 2 + b * QK / 2;
  for (int r = 0; r < R; r++) {
    long row = (m0 + r) * nb + b;
    const int8_t *p = j->p + (m0 + r) * K + b * QK;
    int s = 0;
    if (type == Q8_0)
      for (int i = 0; i < QK; i++) s += q8[i] * p[i];
    else
      for (int i = 0; i < QK / 2; i++) s += ((q4[i] & 15) - 8 * (type == Q4_0)) * p[i] + ((q4[i] >> 4) - 8 * (type == Q4_0)) * p[i + QK / 2];
    acc[r] += dw * j->dx[row] * (float)s;
    if (type == Q4_1) mins[r] += fp16_to_f32(j->m[n * nb + b]) * j->sx[row];
  }
}
static inline __attribute__((always_inline)) void block_dot_f(const qjob *j, int type, long n, long b, long m0,
                                                                int R, float *acc, float *mins) {
  long K = j->K, nb = K / QK;
  float dw = fp16_to_f32(j->d[n * nb + b]);
  const int8_t *q8 = (const int8_t *)j->qs + n * K + b * QK;
  const uint8_t *q4 = (const uint8_t *)j->qs + n * K / 2 + b * QK / 2;
  for (int r = 0; r < R; r++) {
    const float *x = j->xf + (m0 + r) * K + b * QK;
    float s = 0.f;
    for (int i = 0; i < QK; i++) {
      int q = type == Q8_0 ? q8[i] : (i < QK / 2 ? q4[i] & 15 : q4[i - QK / 2] >> 4) - 8 * (type == Q4_0);
      s += (float)q * x[i];
    }
    acc[r] += dw * s;
    if (type == Q4_1) mins[r] += fp16_to_f32(j->m[n * nb + b]) * j->sx[(m0 + r) * nb + b];
  }
}
#define FINISH(r, v) (v)
#endif

#if defined(__AVX2__)
typedef __m256 vacc;
#define VZERO _mm256_setzero_ps()
#define VADD(a, b) _mm256_add_ps(a, b)
#else
typedef float vacc;
#define VZERO 0.f
#define VADD(a, b) ((a) + (b))
#endif

/* Weight rows n0..n1 times R activation rows, for one weight type. Two accumulator sets (even / odd blocks) so
 * consecutive blocks' FMAs do not wait on each other's latency. The weight row (<= a few KB) stays in L1 while the
 * next R rows of activations read it again. */
#define ROWS_KERNEL(T, R, DOT)                                                                                       \
  static void rows_##T##_##R##DOT(const qjob *j, long n0, long n1, long m0) {                                        \
    long nb = j->K / QK;                                                                                             \
    for (long n = n0; n < n1; n++) {                                                                                 \
      vacc a0[R], a1[R];                                                                                             \
      float mins[R];                                                                                                 \
      for (int r = 0; r < R; r++) a0[r] = a1[r] = VZERO, mins[r] = 0.f;                                              \
      long b = 0;                                                                                                    \
      for (; b + 2 <= nb; b += 2) {                                                                                  \
        DOT(j, T, n, b, m0, R, a0, mins);                                                                            \
        DOT(j, T, n, b + 1, m0, R, a1, mins);                                                                        \
      }                                                                                                              \
      if (b < nb) DOT(j, T, n, b, m0, R, a0, mins);                                                                  \
      for (int r = 0; r < R; r++) {                                                                                  \
        float v = (FINISH(r, VADD(a0[r], a1[r])) + mins[r]) * (j->row_mult ? j->row_mult[n] : 1.f);                 \
        float *dst = j->y + (m0 + r) * j->N + n;                                                                     \
        *dst = j->add ? *dst + v : v;                                                                                \
      }                                                                                                              \
    }                                                                                                                \
  }
#define ALL_R(T, DOT) ROWS_KERNEL(T, 1, DOT) ROWS_KERNEL(T, 2, DOT) ROWS_KERNEL(T, 3, DOT) ROWS_KERNEL(T, 4, DOT)
ALL_R(Q8_0, block_dot) ALL_R(Q4_0, block_dot) ALL_R(Q4_1, block_dot)
ALL_R(Q8_0, block_dot_f) ALL_R(Q4_0, block_dot_f) ALL_R(Q4_1, block_dot_f)
#define MR 4 /* activation rows per pass over a weight row: their accumulators stay in registers */
typedef void (*rows_fn)(const qjob *, long, long, long);
#define TABLE(T, DOT) {0, rows_##T##_1##DOT, rows_##T##_2##DOT, rows_##T##_3##DOT, rows_##T##_4##DOT}
static const rows_fn ROWS[2][3][MR + 1] = {
    {TABLE(Q8_0, block_dot), TABLE(Q4_0, block_dot), TABLE(Q4_1, block_dot)},
    {TABLE(Q8_0, block_dot_f), TABLE(Q4_0, block_dot_f), TABLE(Q4_1, block_dot_f)}};

static void q_rows(void *arg, long n0, long n1) {
  const qjob *j = arg;
  for (long m0 = 0; m0 < j->M; m0 += MR) ROWS[j->xf != NULL][j->type][j->M - m0 < MR ? j->M - m0 : MR](j, n0, n1, m0);
}

/* y (M, N) = q8(r * x * gain) @ W^T (+ y if add), W (N, K) in blocks of `type`; r = rmsnorm scale if norm else 1;
 * gain (K) and row_mult (N) may be NULL. K must be a multiple of 32. With q8_input = 0 the input is not rounded:
 * y = (r * x * gain) @ dequantized(W)^T, the exact-input product (slower: float FMAs instead of integer dots).
 * Returns 0, or -1 if out of memory. */
int q_matmul(int type, const void *qs, const uint16_t *d, const uint16_t *m, const float *x, float *y, long M,
             long K, long N, int add, int norm, float eps, const float *gain, const float *row_mult, int q8_input) {
  long nb = K / QK;
  int8_t *p = malloc(M * K);
  float *buf = malloc((2 * M * nb + (q8_input ? 0 : M * K)) * sizeof(float));
  if (!p || !buf) {
    free(p), free(buf);
    return -1;
  }
  float *dx = buf, *sx = buf + M * nb, *xf = q8_input ? NULL : buf + 2 * M * nb;
  for (long r = 0; r < M; r++) {
    float scale = 1.f;
    if (norm) {
      float ss = 0.f;
      for (long k = 0; k < K; k++) ss += x[r * K + k] * x[r * K + k];
      scale = 1.f / sqrtf(ss / (float)K + eps);
    }
    if (q8_input) {
      quantize_row(x + r * K, K, scale, gain, p + r * K, dx + r * nb, sx + r * nb);
      continue;
    }
    for (long b = 0; b < nb; b++) { /* the scaled input and its block sums (for Q4_1's minimums) */
      float s = 0.f;
      for (long k = b * QK; k < (b + 1) * QK; k++) s += (xf[r * K + k] = x[r * K + k] * scale * (gain ? gain[k] : 1.f));
      sx[r * nb + b] = s;
    }
  }
  qjob j = {type, qs, d, m, p, dx, sx, xf, y, row_mult, M, K, N, add};
  parallel_for(q_rows, &j, N);
  free(p), free(buf);
  return 0;
}
