// Decoding's matmuls and attention on CPU, called from jitted code as XLA FFI custom calls.
//
// Packed matmul: y[O, N] = W[O, I] @ x[I, N] with the weight pre-packed into panels of 16 output
// rows, W_packed[P, I, 16] (panel p holds rows 16p..16p+15, one row of 16 per input feature), so
// one panel streams as one contiguous block. Decoding multiplies each weight by a handful of
// activation columns (the batch), which makes it a stream of the weights through the cores:
// XLA:CPU's matmul library re-lays out and streams them at 7-15 GB/s at 8 columns; this kernel
// keeps 8 columns x 2 panels of accumulators in registers and splits the panels over XLA's
// intra-op threads.
//
// Decode attention: the attention block of one new token per row after the fused q/k/v
// projection (heads' RMSNorm and RoPE, the cache write, attention), reading only the cache slots
// written so far (XLA's static shapes make its attention read the whole cache every step).
//
// Decode layer: a whole decoder layer for one new token per row (norms, the four matmuls on
// packed weights, the attention block, silu(gate) x up, the residual adds) in one call, its
// parallel loops run as phases on one set of threads.
//
// See cpu_kernels.py and README.md (Sampling and serving) for the measurements. Built by setup.py
// against jaxlib's FFI headers; registered by cpu_kernels.py.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CACHERL_PAUSE() _mm_pause()
#else
#define CACHERL_PAUSE() std::this_thread::yield()
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;  // output rows per panel: one 64-byte vector of float32
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

// One block: NB activation columns x PB panels, accumulated over all I inputs in registers.
template <int NB, int PB>
inline __attribute__((always_inline)) void Block(const float* w, const float* x, float* y,
                                                 int64_t I, int64_t N, int64_t p, int64_t n0) {
  Vec16 acc[PB][NB];
  for (int q = 0; q < PB; q++)
    for (int b = 0; b < NB; b++) acc[q][b] = Vec16{};
  const float* panel = w + p * I * kPanel;
  const float* column = x + n0;
  for (int64_t i = 0; i < I; i++) {
    Vec16 wv[PB];
#pragma GCC unroll 4
    for (int q = 0; q < PB; q++)
      std::memcpy(&wv[q], panel + (q * I + i) * kPanel, sizeof(Vec16));
#pragma GCC unroll 16
    for (int b = 0; b < NB; b++) {
      const float s = column[i * N + b];
#pragma GCC unroll 4
      for (int q = 0; q < PB; q++) acc[q][b] += wv[q] * s;
    }
  }
  for (int q = 0; q < PB; q++)
    for (int j = 0; j < kPanel; j++)
      for (int b = 0; b < NB; b++) y[((p + q) * kPanel + j) * N + n0 + b] = acc[q][b][j];
}

// Panels [p0, p1) for all N columns; blocks of NB columns, then the leftover columns one by one.
template <int NB, int PB>
inline __attribute__((always_inline)) void Panels(const float* w, const float* x, float* y,
                                                  int64_t I, int64_t N, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + PB <= p1; p += PB) {
    int64_t n0 = 0;
    for (; n0 + NB <= N; n0 += NB) Block<NB, PB>(w, x, y, I, N, p, n0);
    for (; n0 < N; n0++) Block<1, PB>(w, x, y, I, N, p, n0);
  }
  for (; p < p1; p++) {
    int64_t n0 = 0;
    for (; n0 + NB <= N; n0 += NB) Block<NB, 1>(w, x, y, I, N, p, n0);
    for (; n0 < N; n0++) Block<1, 1>(w, x, y, I, N, p, n0);
  }
}

// exp(x) for x <= 0 (scores minus their maximum), within ~2 ulp: 2^n e^r with r in
// [-ln2/2, ln2/2] and a degree-6 Taylor polynomial for e^r. Below -87.3 it returns ~1e-38 where
// the exact value underflows; -inf (a masked slot) is turned into 0 by the caller.
inline __attribute__((always_inline)) Vec16 ExpNonPositive(Vec16 x) {
  const Vec16 lowest = Vec16{} - 87.3f;
  x = x < lowest ? lowest : x;
  const Vec16 round = Vec16{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec16 n = (x * 1.44269504f + round) - round;
  const Vec16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  Vec16 p = Vec16{} + (1.0f / 720);
  p = p * r + (1.0f / 120);
  p = p * r + (1.0f / 24);
  p = p * r + (1.0f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  typedef int32_t Int16 __attribute__((vector_size(64)));
  const Int16 bits = (__builtin_convertvector(n, Int16) + 127) << 23;
  Vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// out = silu(gate) up = gate sigmoid(gate) up over n values, the exponential vectorised (a
// scalar exp per value cost more than the MLP's matmuls at batch 32). sigmoid(g) from
// e = exp(-|g|), which never overflows: 1 / (1 + e) for g >= 0, e / (1 + e) below.
inline __attribute__((always_inline)) void SwiGluLoop(const float* gate, const float* up,
                                                      float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    Vec16 g, u;
    std::memcpy(&g, gate + i, sizeof(g));
    std::memcpy(&u, up + i, sizeof(u));
    const Vec16 negative_abs = g < 0 ? g : -g;
    const Vec16 e = ExpNonPositive(negative_abs);
    const Vec16 sigmoid = (g < 0 ? e : Vec16{} + 1.0f) / (1.0f + e);
    const Vec16 y = g * sigmoid * u;
    std::memcpy(out + i, &y, sizeof(y));
  }
  for (; i < n; i++) {
    const float e = std::exp(-std::fabs(gate[i]));
    out[i] = gate[i] * ((gate[i] < 0 ? e : 1.0f) / (1.0f + e)) * up[i];
  }
}

// out[g, 16 w + j] = sum over t < T of coef[g, t] rows[t, 16 w + j], for g < GC and w < W,
// with the GC x W accumulators in registers and the rows read in order. Both halves of
// attention: scores (t a head dim, rows the keys [D, S] from a slot block) and outputs (t a slot,
// rows the values [S, D] from a head-dim block). Strides in floats.
template <int GC, int W>
inline __attribute__((always_inline)) void BlockedSum(const float* coef, int64_t coef_stride,
                                                      const float* rows, int64_t row_stride,
                                                      int64_t T, float* out, int64_t out_stride) {
  Vec16 acc[GC][W] = {};
  for (int64_t t = 0; t < T; t++) {
    Vec16 r[W];
#pragma GCC unroll 8
    for (int w = 0; w < W; w++) std::memcpy(&r[w], rows + t * row_stride + 16 * w, sizeof(Vec16));
#pragma GCC unroll 4
    for (int g = 0; g < GC; g++) {
      const float c = coef[g * coef_stride + t];
#pragma GCC unroll 8
      for (int w = 0; w < W; w++) acc[g][w] += r[w] * c;
    }
  }
  for (int g = 0; g < GC; g++)
    for (int w = 0; w < W; w++)
      std::memcpy(out + g * out_stride + 16 * w, &acc[g][w], sizeof(Vec16));
}

// GC (1-4) query heads of one (row, kv head) over slots [0, n): q [GC, D] (already scaled), keys
// [D, S], values [S, D], bias [S] (0 or -inf: the mask), out [GC, D]; scores: GC S floats.
// VREGS: how many Vec16 values the instruction set keeps in registers; a block of W slot vectors
// holds W keys and GC W accumulators.
template <int GC, int VREGS>
inline __attribute__((always_inline)) void AttendHeads(const float* q, const float* keys,
                                                       const float* values, const float* bias,
                                                       int64_t D, int64_t S, int64_t n, float* out,
                                                       float* scores) {
  constexpr int W = VREGS / (GC + 1) > 0 ? VREGS / (GC + 1) : 1;
  const int64_t n16 = n / 16 * 16;
  int64_t s = 0;
  for (; s + 16 * W <= n16; s += 16 * W) BlockedSum<GC, W>(q, D, keys + s, S, D, scores + s, S);
  for (; s < n16; s += 16) BlockedSum<GC, 1>(q, D, keys + s, S, D, scores + s, S);
  for (; s < n; s++)
    for (int g = 0; g < GC; g++) {
      float acc = 0;
      for (int64_t d = 0; d < D; d++) acc += q[g * D + d] * keys[d * S + s];
      scores[g * S + s] = acc;
    }
  float sums[GC];
  for (int g = 0; g < GC; g++) {
    float* sc = scores + g * S;
    Vec16 max_v = Vec16{} - INFINITY;
    float max = -INFINITY;
    for (s = 0; s < n16; s += 16) {
      Vec16 v, m;
      std::memcpy(&v, sc + s, sizeof(v));
      std::memcpy(&m, bias + s, sizeof(m));
      v += m;
      std::memcpy(sc + s, &v, sizeof(v));
      max_v = v > max_v ? v : max_v;
    }
    for (; s < n; s++) {
      sc[s] += bias[s];
      max = std::max(max, sc[s]);
    }
    for (int j = 0; j < 16; j++) max = std::max(max, max_v[j]);
    Vec16 sum_v = {};
    float sum = 0;
    for (s = 0; s < n16; s += 16) {
      Vec16 v;
      std::memcpy(&v, sc + s, sizeof(v));
      const Vec16 e = v == -INFINITY ? Vec16{} : ExpNonPositive(v - max);
      std::memcpy(sc + s, &e, sizeof(e));
      sum_v += e;
    }
    for (; s < n; s++) {
      sc[s] = sc[s] == -INFINITY ? 0.0f : std::exp(sc[s] - max);
      sum += sc[s];
    }
    for (int j = 0; j < 16; j++) sum += sum_v[j];
    sums[g] = sum;
  }
  // out = (p @ values) / sum, the sum divided last as kv_cache._attention does.
  // Widest blocks first, so that a head dim of 64 or 128 is one pass over the values.
  constexpr int W4 = W > 4 ? 4 : 1, W2 = W > 2 ? 2 : 1;
  int64_t d = 0;
  for (; d + 16 * W <= D; d += 16 * W) BlockedSum<GC, W>(scores, S, values + d, D, n, out + d, D);
  for (; W4 > 1 && d + 64 <= D; d += 64)
    BlockedSum<GC, W4>(scores, S, values + d, D, n, out + d, D);
  for (; W2 > 1 && d + 32 <= D; d += 32)
    BlockedSum<GC, W2>(scores, S, values + d, D, n, out + d, D);
  for (; d + 16 <= D; d += 16) BlockedSum<GC, 1>(scores, S, values + d, D, n, out + d, D);
  for (; d < D; d++)
    for (int g = 0; g < GC; g++) {
      float acc = 0;
      for (s = 0; s < n; s++) acc += scores[g * S + s] * values[s * D + d];
      out[g * D + d] = acc;
    }
  for (int g = 0; g < GC; g++)
    for (d = 0; d < D; d++) out[g * D + d] /= sums[g];
}

// One (row, kv head) of a decode step's attention: G query heads over slots [0, q_slot]. A slot
// is attended where its validity equals the query slot's (the `same segment` rule of
// qwen3.attention_mask) and always the query's own slot, as kv_cache.extend's mask does.
// q [G, D] (already scaled), keys [D, S], values [S, D], out [G, D]; scratch: 4 S + S floats.
// Heads are taken four at a time, each group reading the keys and values once with its scores
// and outputs in registers (a loop over them in memory spent ~3x the time on stores and
// reloads); keys row by row within a block of slots, which also suits a cache coming from memory.
template <int VREGS>
inline __attribute__((always_inline)) void AttendOne(const float* q, const float* keys,
                                                     const float* values, const bool* valid,
                                                     int64_t G, int64_t D, int64_t S,
                                                     int64_t q_slot, float* out, float* scratch) {
  const int64_t n = q_slot + 1;
  float* bias = scratch + 4 * S;
  const bool own = valid[q_slot];
  for (int64_t s = 0; s < n; s++) bias[s] = valid[s] == own || s == q_slot ? 0.0f : -INFINITY;
  for (int64_t g = 0; g < G; g += 4) {
    const float* qg = q + g * D;
    float* og = out + g * D;
    switch (std::min<int64_t>(4, G - g)) {
      case 1: AttendHeads<1, VREGS>(qg, keys, values, bias, D, S, n, og, scratch); break;
      case 2: AttendHeads<2, VREGS>(qg, keys, values, bias, D, S, n, og, scratch); break;
      case 3: AttendHeads<3, VREGS>(qg, keys, values, bias, D, S, n, og, scratch); break;
      default: AttendHeads<4, VREGS>(qg, keys, values, bias, D, S, n, og, scratch); break;
    }
  }
}

using AttendFn = void (*)(const float*, const float*, const float*, const bool*, int64_t,
                          int64_t, int64_t, int64_t, float*, float*);

using PanelsFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

using SwiGluFn = void (*)(const float*, const float*, float*, int64_t);

// The same loops compiled for three instruction sets; the widest the CPU has is picked at load.
// AVX-512 has 32 vector registers (16 matmul accumulators fit; 24 Vec16 values in attention),
// AVX2 16 (a Vec16 takes two).
#define CACHERL_ATTEND_FOR(SUFFIX, TARGET, VREGS)                                             \
  TARGET void Attend##SUFFIX(const float* q, const float* keys, const float* values,        \
                             const bool* valid, int64_t G, int64_t D, int64_t S,            \
                             int64_t q_slot, float* out, float* scratch) {                  \
    AttendOne<VREGS>(q, keys, values, valid, G, D, S, q_slot, out, scratch);                 \
  }
#if defined(__x86_64__) && defined(__GNUC__)
#define CACHERL_AVX512 __attribute__((target("avx512f,fma")))
#define CACHERL_AVX2 __attribute__((target("avx2,fma")))
CACHERL_AVX512 void PanelsAvx512(const float* w, const float* x, float* y, int64_t I, int64_t N,
                                 int64_t p0, int64_t p1) {
  Panels<8, 2>(w, x, y, I, N, p0, p1);
}
CACHERL_AVX2 void PanelsAvx2(const float* w, const float* x, float* y, int64_t I, int64_t N,
                             int64_t p0, int64_t p1) {
  Panels<4, 1>(w, x, y, I, N, p0, p1);
}
CACHERL_ATTEND_FOR(Avx512, CACHERL_AVX512, 24)
CACHERL_ATTEND_FOR(Avx2, CACHERL_AVX2, 6)
CACHERL_AVX512 void SwiGluAvx512(const float* gate, const float* up, float* out, int64_t n) {
  SwiGluLoop(gate, up, out, n);
}
CACHERL_AVX2 void SwiGluAvx2(const float* gate, const float* up, float* out, int64_t n) {
  SwiGluLoop(gate, up, out, n);
}
#endif
void PanelsGeneric(const float* w, const float* x, float* y, int64_t I, int64_t N, int64_t p0,
                   int64_t p1) {
  Panels<4, 1>(w, x, y, I, N, p0, p1);
}
CACHERL_ATTEND_FOR(Generic, , 2)
void SwiGluGeneric(const float* gate, const float* up, float* out, int64_t n) {
  SwiGluLoop(gate, up, out, n);
}

struct Isa {
  PanelsFn panels;
  AttendFn attend;
  SwiGluFn swiglu;
  const char* name;
};

// CACHERL_CPU_ISA=avx2 or generic caps the choice (the tests run every variant this way).
Isa PickIsa() {
  const char* cap_env = std::getenv("CACHERL_CPU_ISA");
  const std::string cap = cap_env != nullptr ? cap_env : "";
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (__builtin_cpu_supports("avx512f") && avx2 && cap.empty())
    return {PanelsAvx512, AttendAvx512, SwiGluAvx512, "avx512"};
  if (avx2 && cap != "generic") return {PanelsAvx2, AttendAvx2, SwiGluAvx2, "avx2"};
#endif
  return {PanelsGeneric, AttendGeneric, SwiGluGeneric, "generic"};
}

const Isa kIsa = PickIsa();

// Phases that run one after another, each a loop over chunks claimed from a shared counter by
// the calling thread and by helpers on XLA's intra-op pool (the threads that run the rest of the
// step: no threads of our own to compete with it for the cores), which are woken once for all
// the phases (a decode layer's five parallel loops as separate calls paid for five wake-ups and
// the XLA ops between them). A few chunks per thread, so that a thread that starts late or is
// preempted does not hold up the call; helpers may start after the call has returned, hence
// the shared_ptr. The calling thread runs any serial work before publishing the next
// phase. It never waits for a helper to start, only for chunks a helper has claimed: a helper
// that starts late finds the earlier phases' chunks taken and joins where the caller is, and a
// helper never waits long for the caller (AwaitPublished).
class Phases {
 public:
  using Body = std::function<void(int64_t begin, int64_t end)>;

  void Add(int64_t n, int64_t grain, Body body) {
    phases_.push_back(std::make_unique<Phase>(n, grain, std::move(body)));
  }

  // Wakes the helpers; then Run(0), Run(1), ... in order on the calling thread.
  static void Start(ffi::ThreadPool& pool, const std::shared_ptr<Phases>& self) {
    int64_t most = 1;
    for (const auto& phase : self->phases_) most = std::max(most, phase->chunks);
    const int64_t threads = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), most);
    for (int64_t t = 1; t < threads; t++) pool.Schedule([self] { self->Help(); });
  }

  void Run(size_t index) {
    Phase& phase = *phases_[index];
    published_.store(index + 1, std::memory_order_release);
    phase.Work();
    while (phase.done.load(std::memory_order_acquire) < phase.chunks) CACHERL_PAUSE();
  }

 private:
  struct Phase {
    Phase(int64_t n, int64_t grain, Body body)
        : n(n), grain(grain), chunks((n + grain - 1) / grain), body(std::move(body)) {}
    int64_t n, grain, chunks;
    Body body;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
        body(c * grain, std::min(n, (c + 1) * grain));
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  void Help() {
    for (size_t index = 0; index < phases_.size(); index++) {
      if (!AwaitPublished(index)) return;
      phases_[index]->Work();
    }
  }

  // Whether the caller published phase `index` within ~100 us. Between phases it runs only short
  // serial steps (a few us), so a longer wait means it is not coming soon: the pool ran this
  // helper inline inside Schedule (it does when its queue is full), before the caller published
  // anything, or the caller was preempted. The caller then finishes the phases alone.
  bool AwaitPublished(size_t index) const {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(100);
    for (int spins = 1; published_.load(std::memory_order_acquire) <= index; spins++) {
      CACHERL_PAUSE();
      if (spins % 64 == 0 && std::chrono::steady_clock::now() > deadline) return false;
    }
    return true;
  }

  std::vector<std::unique_ptr<Phase>> phases_;
  std::atomic<size_t> published_{0};
};

// Items [0, n) in chunks of `grain` on this thread and XLA's pool: a single phase.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, F body) {
  auto phases = std::make_shared<Phases>();
  phases->Add(n, grain, std::move(body));
  Phases::Start(pool, phases);
  phases->Run(0);
}

int64_t Grain(ffi::ThreadPool& pool, int64_t n, int64_t multiple) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t grain = std::max<int64_t>(multiple, (n + 4 * threads - 1) / (4 * threads));
  return (grain + multiple - 1) / multiple * multiple;
}

ffi::Error PackedMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w_PxIx16,
                            ffi::Buffer<ffi::F32> x_IxN, ffi::ResultBuffer<ffi::F32> y_OxN) {
  const auto w_dims = w_PxIx16.dimensions();
  const auto x_dims = x_IxN.dimensions();
  const auto y_dims = y_OxN->dimensions();
  if (w_dims.size() != 3 || w_dims[2] != kPanel || x_dims.size() != 2 || y_dims.size() != 2 ||
      x_dims[0] != w_dims[1] || y_dims[0] != w_dims[0] * kPanel || y_dims[1] != x_dims[1]) {
    return ffi::Error::InvalidArgument(
        "cacherl packed matmul: expected w [P, I, 16], x [I, N] and y [16 P, N]");
  }
  const float* w = w_PxIx16.typed_data();
  const float* x = x_IxN.typed_data();
  float* y = y_OxN->typed_data();
  const int64_t P = w_dims[0], I = w_dims[1], N = x_dims[1];
  // Whole pairs of panels per chunk: the AVX-512 block.
  ParallelFor(pool, P, Grain(pool, P, 2),
              [=](int64_t p0, int64_t p1) { kIsa.panels(w, x, y, I, N, p0, p1); });
  return ffi::Error::Success();
}

// RMSNorm over D values then rotate-half RoPE, as kv_cache._norm_and_rope_heads does: x is one
// head's column of the fused q/k/v projection (stride B), cos/sin the row's tables (stride B).
inline void NormAndRope(const float* x, int64_t B, const float* weight, const float* cos,
                        const float* sin, int64_t D, float eps, float scale, float* out) {
  float sum_sq = 0;
  for (int64_t d = 0; d < D; d++) sum_sq += x[d * B] * x[d * B];
  const float r = 1.0f / std::sqrt(sum_sq / static_cast<float>(D) + eps);
  // Rotate-half pairs dimension d with d + D/2: (a, b) -> (a cos - b sin, b cos + a sin).
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d++) {
    const int64_t e = d + half;
    const float a = weight[d] * (x[d * B] * r), b = weight[e] * (x[e * B] * r);
    out[d] = (a * cos[d * B] - b * sin[d * B]) * scale;
    out[e] = (b * cos[e * B] + a * sin[e * B]) * scale;
  }
}

// The attention block of one decode step after the fused q/k/v projection, for items (row, kv
// head) [i0, i1): per-head RMSNorm and RoPE of the new queries and key, the new key and value
// written into slot `slot` of the caches, and attention over them. qkv [(H + 2K) D, B] and out
// [H D, B] are feature-major like kv_cache.extend's activations.
struct AttentionBlock {
  const float* qkv;
  const float* q_norm;
  const float* k_norm;
  const float* cos;
  const float* sin;
  const bool* valid;
  float* keys;
  float* values;
  float* out;
  int64_t B, H, K, D, S, slot;
  float eps, scale;

  void Items(int64_t i0, int64_t i1) const {
    const int64_t G = H / K;
    // Per thread and kept between calls: no allocation in each decode step's layers.
    // AttendOne's scratch (scores of 4 heads and the mask, 5 S), then the queries and the
    // outputs [G, D] each.
    thread_local std::vector<float> scratch;
    const size_t size = 5 * S + 2 * G * D;
    if (scratch.size() < size) scratch.resize(size);
    float* scores = scratch.data();
    float* q = scores + 5 * S;
    float* o = q + G * D;
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / K, k = i % K;
      float* row_keys = keys + i * D * S;
      float* row_values = values + i * S * D;
      NormAndRope(qkv + (H + k) * D * B + b, B, k_norm, cos + b, sin + b, D, eps, 1.0f, o);
      for (int64_t d = 0; d < D; d++) {
        row_keys[d * S + slot] = o[d];
        row_values[slot * D + d] = qkv[((H + K + k) * D + d) * B + b];
      }
      for (int64_t g = 0; g < G; g++)
        NormAndRope(qkv + (k * G + g) * D * B + b, B, q_norm, cos + b, sin + b, D, eps, scale,
                    q + g * D);
      kIsa.attend(q, row_keys, row_values, valid + b * S, G, D, S, slot, o, scores);
      for (int64_t g = 0; g < G; g++)
        for (int64_t d = 0; d < D; d++) out[((k * G + g) * D + d) * B + b] = o[g * D + d];
    }
  }
};

template <typename Dims>
bool Is(Dims dims, std::initializer_list<int64_t> want) {
  return dims.size() == want.size() && std::equal(want.begin(), want.end(), dims.begin());
}

// Checks the attention block's shapes and fills `block`'s sizes and the query slot from them.
ffi::Error CheckAttention(const char* call, ffi::Buffer<ffi::F32>& q_norm_D,
                          ffi::Buffer<ffi::F32>& k_norm_D, ffi::Buffer<ffi::F32>& cos_DxB,
                          ffi::Buffer<ffi::F32>& sin_DxB, ffi::Buffer<ffi::PRED>& valid_BxS,
                          ffi::Buffer<ffi::S32>& q_slot, ffi::ResultBuffer<ffi::F32>& k_BxKxDxS,
                          ffi::ResultBuffer<ffi::F32>& v_BxKxSxD, int64_t H,
                          AttentionBlock& block) {
  const auto k_dims = k_BxKxDxS->dimensions();
  const auto v_dims = v_BxKxSxD->dimensions();
  const bool caches_ok = k_dims.size() == 4 && v_dims.size() == 4 && k_dims[0] == v_dims[0] &&
                         k_dims[1] == v_dims[1] && k_dims[2] == v_dims[3] &&
                         k_dims[3] == v_dims[2] && k_dims[1] > 0 && H % k_dims[1] == 0;
  if (!caches_ok) {
    return ffi::Error::InvalidArgument(
        std::string(call) +
        ": expected keys [B, K, D, S] and values [B, K, S, D], with the query heads a multiple "
        "of K");
  }
  const int64_t B = k_dims[0], K = k_dims[1], D = k_dims[2], S = k_dims[3];
  if (!Is(q_norm_D.dimensions(), {D}) || !Is(k_norm_D.dimensions(), {D}) ||
      !Is(cos_DxB.dimensions(), {D, B}) || !Is(sin_DxB.dimensions(), {D, B}) ||
      !Is(valid_BxS.dimensions(), {B, S}) || q_slot.dimensions().size() != 0 || D % 2 != 0) {
    return ffi::Error::InvalidArgument(
        std::string(call) +
        ": expected norms [D], cos/sin [D, B], valid [B, S] and a scalar query slot, D even");
  }
  const int64_t slot = *q_slot.typed_data();
  if (slot < 0 || slot >= S) return ffi::Error::InvalidArgument("query slot outside the cache");
  block.q_norm = q_norm_D.typed_data();
  block.k_norm = k_norm_D.typed_data();
  block.cos = cos_DxB.typed_data();
  block.sin = sin_DxB.typed_data();
  block.valid = valid_BxS.typed_data();
  block.keys = k_BxKxDxS->typed_data();
  block.values = v_BxKxSxD->typed_data();
  block.B = B, block.H = H, block.K = K, block.D = D, block.S = S, block.slot = slot;
  return ffi::Error::Success();
}

// A decode step's attention block in one call (AttentionBlock), the caches aliased in and out.
// Doing it in one call saves XLA a handful of small fusions per layer, and the new key lands in
// the cache lines the attention reads next.
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv_QxB,
                               ffi::Buffer<ffi::F32> q_norm_D, ffi::Buffer<ffi::F32> k_norm_D,
                               ffi::Buffer<ffi::F32> cos_DxB, ffi::Buffer<ffi::F32> sin_DxB,
                               ffi::Buffer<ffi::PRED> valid_BxS, ffi::Buffer<ffi::S32> q_slot,
                               ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, int64_t H, float eps,
                               float scale, ffi::ResultBuffer<ffi::F32> out_HDxB,
                               ffi::ResultBuffer<ffi::F32> k_BxKxDxS,
                               ffi::ResultBuffer<ffi::F32> v_BxKxSxD) {
  // The caches are read and written through the results, which XLA aliases to the inputs.
  AttentionBlock block;
  const char* call = "cacherl decode attention";
  if (ffi::Error error = CheckAttention(call, q_norm_D, k_norm_D, cos_DxB, sin_DxB, valid_BxS,
                                        q_slot, k_BxKxDxS, v_BxKxSxD, H, block);
      error.failure()) {
    return error;
  }
  const int64_t B = block.B, K = block.K, D = block.D;
  if (!Is(qkv_QxB.dimensions(), {(H + 2 * K) * D, B}) ||
      !Is(out_HDxB->dimensions(), {H * D, B})) {
    return ffi::Error::InvalidArgument(std::string(call) +
                                       ": expected qkv [(H + 2K) D, B] and out [H D, B]");
  }
  block.qkv = qkv_QxB.typed_data();
  block.out = out_HDxB->typed_data();
  block.eps = eps, block.scale = scale;
  ParallelFor(pool, B * K, Grain(pool, B * K, 1),
              [block](int64_t i0, int64_t i1) { block.Items(i0, i1); });
  return ffi::Error::Success();
}

// RMSNorm of each column of feature-major x [E, B], as qwen3.rms_norm over axis 0.
void RmsNormColumns(const float* x, const float* weight, int64_t E, int64_t B, float eps,
                    float* out) {
  thread_local std::vector<float> scale;
  scale.assign(B, 0.0f);
  for (int64_t e = 0; e < E; e++)
    for (int64_t b = 0; b < B; b++) scale[b] += x[e * B + b] * x[e * B + b];
  for (int64_t b = 0; b < B; b++)
    scale[b] = 1.0f / std::sqrt(scale[b] / static_cast<float>(E) + eps);
  for (int64_t e = 0; e < E; e++)
    for (int64_t b = 0; b < B; b++) out[e * B + b] = weight[e] * (x[e * B + b] * scale[b]);
}

// A whole decoder layer for one new token per row, every matmul on a packed weight:
//   h = norm(x); qkv = W_qkv h; a = attention block (AttentionBlock); x' = x + W_o a;
//   h' = norm(x'); [g; u] = W_gate_up h'; x' += W_down (silu(g) u)
// in five phases on one set of threads; the residual adds and silu(g) u run on the rows a thread
// has just computed. Activations are feature-major [features, B].
ffi::Error DecodeLayerImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_ExB,
                           ffi::Buffer<ffi::F32> attn_norm_E, ffi::Buffer<ffi::F32> w_qkv,
                           ffi::Buffer<ffi::F32> q_norm_D, ffi::Buffer<ffi::F32> k_norm_D,
                           ffi::Buffer<ffi::F32> w_o, ffi::Buffer<ffi::F32> mlp_norm_E,
                           ffi::Buffer<ffi::F32> w_gate_up, ffi::Buffer<ffi::F32> w_down,
                           ffi::Buffer<ffi::F32> cos_DxB, ffi::Buffer<ffi::F32> sin_DxB,
                           ffi::Buffer<ffi::PRED> valid_BxS, ffi::Buffer<ffi::S32> q_slot,
                           ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, int64_t H, float eps,
                           float scale, ffi::ResultBuffer<ffi::F32> out_ExB,
                           ffi::ResultBuffer<ffi::F32> k_BxKxDxS,
                           ffi::ResultBuffer<ffi::F32> v_BxKxSxD) {
  auto block = std::make_shared<AttentionBlock>();
  const char* call = "cacherl decode layer";
  if (ffi::Error error = CheckAttention(call, q_norm_D, k_norm_D, cos_DxB, sin_DxB, valid_BxS,
                                        q_slot, k_BxKxDxS, v_BxKxSxD, H, *block);
      error.failure()) {
    return error;
  }
  if (x_ExB.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument(std::string(call) + ": expected x [E, B]");
  }
  const int64_t B = block->B, K = block->K, D = block->D, E = x_ExB.dimensions()[0];
  const int64_t Q = (H + 2 * K) * D, F = w_down.dimensions().size() == 3
                                              ? w_down.dimensions()[1]
                                              : 0;
  if (!Is(x_ExB.dimensions(), {E, B}) || !Is(out_ExB->dimensions(), {E, B}) ||
      !Is(attn_norm_E.dimensions(), {E}) || !Is(mlp_norm_E.dimensions(), {E}) ||
      !Is(w_qkv.dimensions(), {Q / kPanel, E, kPanel}) ||
      !Is(w_o.dimensions(), {E / kPanel, H * D, kPanel}) ||
      !Is(w_gate_up.dimensions(), {2 * F / kPanel, E, kPanel}) ||
      !Is(w_down.dimensions(), {E / kPanel, F, kPanel}) || Q % kPanel != 0 || E % kPanel != 0 ||
      F % kPanel != 0) {
    return ffi::Error::InvalidArgument(
        std::string(call) +
        ": expected x and out [E, B], norms [E], and packed weights w_qkv [(H + 2K) D / 16, E, "
        "16], w_o [E / 16, H D, 16], w_gate_up [2F / 16, E, 16], w_down [E / 16, F, 16]");
  }
  // Activations between the phases, on the calling thread and kept between calls.
  thread_local std::vector<float> buffer;
  buffer.resize((2 * E + Q + H * D + 3 * F) * B);
  float* h = buffer.data();             // [E, B], the normalised input of a matmul
  float* qkv = h + E * B;               // [Q, B]
  float* attended = qkv + Q * B;        // [H D, B]
  float* gate_up = attended + H * D * B;  // [2F, B]
  float* act = gate_up + 2 * F * B;     // [F, B]
  float* down = act + F * B;            // [E, B]
  const float* x = x_ExB.typed_data();
  float* out = out_ExB->typed_data();
  const float* wq = w_qkv.typed_data();
  const float* wo = w_o.typed_data();
  const float* wgu = w_gate_up.typed_data();
  const float* wd = w_down.typed_data();
  block->qkv = qkv, block->out = attended, block->eps = eps, block->scale = scale;

  auto phases = std::make_shared<Phases>();
  phases->Add(Q / kPanel, Grain(pool, Q / kPanel, 2), [=](int64_t p0, int64_t p1) {
    kIsa.panels(wq, h, qkv, E, B, p0, p1);
  });
  phases->Add(B * K, Grain(pool, B * K, 1),
              [block](int64_t i0, int64_t i1) { block->Items(i0, i1); });
  phases->Add(E / kPanel, Grain(pool, E / kPanel, 2), [=](int64_t p0, int64_t p1) {
    kIsa.panels(wo, attended, out, H * D, B, p0, p1);
    for (int64_t i = p0 * kPanel * B; i < p1 * kPanel * B; i++) out[i] += x[i];
  });
  // Gate panels [p0, p1) and the up panels F / 16 further on: the rows silu(g) u needs.
  phases->Add(F / kPanel, Grain(pool, F / kPanel, 2), [=](int64_t p0, int64_t p1) {
    kIsa.panels(wgu, h, gate_up, E, B, p0, p1);
    kIsa.panels(wgu, h, gate_up, E, B, p0 + F / kPanel, p1 + F / kPanel);
    const int64_t i = p0 * kPanel * B;
    kIsa.swiglu(gate_up + i, gate_up + F * B + i, act + i, (p1 - p0) * kPanel * B);
  });
  phases->Add(E / kPanel, Grain(pool, E / kPanel, 2), [=](int64_t p0, int64_t p1) {
    kIsa.panels(wd, act, down, F, B, p0, p1);
    for (int64_t i = p0 * kPanel * B; i < p1 * kPanel * B; i++) out[i] += down[i];
  });

  RmsNormColumns(x, attn_norm_E.typed_data(), E, B, eps, h);
  Phases::Start(pool, phases);
  phases->Run(0);  // qkv
  phases->Run(1);  // attention
  phases->Run(2);  // out = x + W_o a
  RmsNormColumns(out, mlp_norm_E.typed_data(), E, B, eps, h);
  phases->Run(3);  // silu(g) u
  phases->Run(4);  // out += W_down (silu(g) u)
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacherlPackedMatmul, PackedMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The inputs both decode calls end with (RoPE tables, validity, the query slot, the caches
// aliased to results 1 and 2), their attributes and their three results.
template <typename Binding>
auto WithCacheArgs(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()   // cos
      .template Arg<ffi::Buffer<ffi::F32>>()             // sin
      .template Arg<ffi::Buffer<ffi::PRED>>()            // valid
      .template Arg<ffi::Buffer<ffi::S32>>()             // q_slot
      .template Arg<ffi::Buffer<ffi::F32>>()             // keys (aliased to result 1)
      .template Arg<ffi::Buffer<ffi::F32>>()             // values (result 2)
      .template Attr<int64_t>("num_heads")
      .template Attr<float>("eps")
      .template Attr<float>("scale")
      .template Ret<ffi::Buffer<ffi::F32>>()             // out
      .template Ret<ffi::Buffer<ffi::F32>>()             // keys
      .template Ret<ffi::Buffer<ffi::F32>>();            // values
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacherlDecodeAttention, DecodeAttentionImpl,
                              WithCacheArgs(ffi::Ffi::Bind()
                                                .Ctx<ffi::ThreadPool>()
                                                .Arg<ffi::Buffer<ffi::F32>>()    // qkv
                                                .Arg<ffi::Buffer<ffi::F32>>()    // q_norm
                                                .Arg<ffi::Buffer<ffi::F32>>()));  // k_norm

XLA_FFI_DEFINE_HANDLER_SYMBOL(CacherlDecodeLayer, DecodeLayerImpl,
                              WithCacheArgs(ffi::Ffi::Bind()
                                                .Ctx<ffi::ThreadPool>()
                                                .Arg<ffi::Buffer<ffi::F32>>()    // x
                                                .Arg<ffi::Buffer<ffi::F32>>()    // attn_norm
                                                .Arg<ffi::Buffer<ffi::F32>>()    // w_qkv
                                                .Arg<ffi::Buffer<ffi::F32>>()    // q_norm
                                                .Arg<ffi::Buffer<ffi::F32>>()    // k_norm
                                                .Arg<ffi::Buffer<ffi::F32>>()    // wo
                                                .Arg<ffi::Buffer<ffi::F32>>()    // mlp_norm
                                                .Arg<ffi::Buffer<ffi::F32>>()    // w_gate_up
                                                .Arg<ffi::Buffer<ffi::F32>>()));  // w_down

// --- the Python module: hands the handler to jax.ffi.register_ffi_target ------------------------

static PyObject* Handlers(PyObject*, PyObject*) {
  return Py_BuildValue(
      "{sNsNsN}", "packed_matmul",
      PyCapsule_New(reinterpret_cast<void*>(&CacherlPackedMatmul), nullptr, nullptr),
      "decode_attention",
      PyCapsule_New(reinterpret_cast<void*>(&CacherlDecodeAttention), nullptr, nullptr),
      "decode_layer",
      PyCapsule_New(reinterpret_cast<void*>(&CacherlDecodeLayer), nullptr, nullptr));
}

static PyObject* InstructionSet(PyObject*, PyObject*) { return PyUnicode_FromString(kIsa.name); }

static PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS, "The XLA FFI handlers, as capsules by name."},
    {"instruction_set", InstructionSet, METH_NOARGS, "The vector instructions the kernel uses."},
    {nullptr, nullptr, 0, nullptr},
};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels", nullptr, -1, kMethods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&kModule); }
