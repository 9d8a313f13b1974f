// The CPU's C++ kernels, built on first use by cpu_kernels.py with the system C++ compiler
// and called through ctypes:
//   agentos_decode_{f32,bf16}  paged decode attention (below)
//   agentos_forward_f32        a whole decode step of a dense float32 model (further below)
//
// Paged decode attention: one query per sequence over its cached K/V, read in place through
// the block table (no gathered copy of the context).
//
// Layout (the per-layer views of the block-major pool, see model_runner.py):
//   q, out   [B, H, D]            contiguous
//   k, v     [num_blocks, bs, KVH, D], contiguous inside a block, `block_stride` elements
//            from one block to the next
//   tables   [B, max_blocks] int64, ctx_lens [B] int64 (keys of each sequence, the new one
//            included)
//
// A task is one sequence, or one range of its blocks when the batch is smaller than the
// thread count (split-K; the ranges' partial softmax states are merged at the end). It reads
// each block front to back once: a token's K row holds every kv head side by side, and the
// G = H / KVH query heads of a kv head share it. A block of keys at a time: the scores, one
// online-softmax rescale per head (fp32 throughout), then the V rows weighted in. In float32
// with a head dim of 32, 64 or 128 and G of 1 to 8 (attend_group), each kv head's G outputs
// are held in registers across a block's tokens and each K and V row is loaded once for
// them, while the next block is fetched into the cache.
// window > 0: only the last `window` keys are visible; cap > 0: scores become
// tanh(s / cap) * cap (Gemma 2).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }

inline float to_float(uint16_t x) {  // bfloat16: the high half of a float
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void from_float(float x, float* out) { *out = x; }

inline void from_float(float x, uint16_t* out) {  // round to nearest even, NaN kept NaN
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if (std::isnan(x)) {
    *out = 0x7FC0;
    return;
  }
  bits += 0x7FFF + ((bits >> 16) & 1);
  *out = static_cast<uint16_t>(bits >> 16);
}

typedef float v8f __attribute__((vector_size(32)));

typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

inline v8f load8(const float* p) { return *reinterpret_cast<const v8f_unaligned*>(p); }

// Keeps a vector just loaded in a register: without it GCC folds the load into every
// multiply-add that uses the vector, loading it once per use rather than once.
inline void keep_in_register(v8f& v) {
#if defined(__x86_64__) && defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

inline float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef int32_t v8i __attribute__((vector_size(32)));

// The sums of adjacent lanes: [x0 + x1, x2 + x3, x4 + x5, x6 + x7, y0 + y1, ..., y6 + y7].
inline v8f add_pairs(v8f x, v8f y) {
  const v8i even = {0, 2, 4, 6, 8, 10, 12, 14}, odd = {1, 3, 5, 7, 9, 11, 13, 15};
  return __builtin_shuffle(x, y, even) + __builtin_shuffle(x, y, odd);
}

// The first two of hsum's three rounds for four vectors at once: for a[0..4), the vector
// [c0_0, c0_1, c1_0, c1_1, c2_0, c2_1, c3_0, c3_1] where ct_0 = (v0 + v4) + (v1 + v5) and
// ct_1 = (v2 + v6) + (v3 + v7) of a[t]. add_pairs of two of these is the third round:
// [hsum(a[0]), ..., hsum(a[7])] of eight vectors, summed as hsum sums each (the same bits).
inline v8f hsum_pairs4(const v8f* a) {
  const v8i lo = {0, 1, 2, 3, 8, 9, 10, 11}, hi = {4, 5, 6, 7, 12, 13, 14, 15};
  const v8f s01 = __builtin_shuffle(a[0], a[1], lo) + __builtin_shuffle(a[0], a[1], hi);
  const v8f s23 = __builtin_shuffle(a[2], a[3], lo) + __builtin_shuffle(a[2], a[3], hi);
  return add_pairs(s01, s23);
}

// e^x for x <= 0 (a score minus its running max) in plain arithmetic, so that loops over it
// vectorize (std::exp is a libm call per element): x = n ln2 + r with |r| <= ln2 / 2,
// e^r by its degree-6 Taylor polynomial (relative error about 1e-7 on that range), times
// 2^n built in the exponent bits. Below -87 (where e^x is under float's normal range) it
// gives 2^-126 instead of a denormal or 0, far below what a softmax sum can resolve.
// Above 88 (past float's range) it gives e^88 (about 1.7e38), not infinity.
inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One block of one head's scores s[t0, t1) into the online softmax: capped (cap > 0),
// turned into e^(s - max) in place and added to the running sum l, the running max m
// raised to the block's; returns the factor the head's output so far must be scaled by
// (1 when the max did not move).
inline float softmax_block(float* s, int64_t t0, int64_t t1, float cap, float& m, float& l) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (cap > 0.0f)
    for (int64_t t = t0; t < t1; ++t) s[t] = std::tanh(s[t] / cap) * cap;
  float block_max = neg_inf;
  for (int64_t t = t0; t < t1; ++t) block_max = std::max(block_max, s[t]);
  const float new_max = std::max(m, block_max);
  float correction = 1.0f;
  if (m != new_max && m != neg_inf) {
    correction = std::exp(m - new_max);
    l *= correction;
  }
  m = new_max;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = t0; t < t1; ++t) {
    const float p = exp_clamped(s[t] - new_max);
    s[t] = p;
    sum += p;
  }
  l += sum;
  return correction;
}

// The keys [lo, hi) of sequence b, every head: the partial softmax state of each query head
// (its running max m, sum l and unnormalized output acc). Each token's K (then V) row holds
// all kv heads side by side, so a block is read front to back, once.
// Returns false, having read nothing, when a block id of the range is outside the pool.
// DC > 0: the head dim, known when compiling (the loops over it unroll); 0: head_dim.
template <typename T, int DC>
bool attend(const float* qf, const T* k, const T* v, const int64_t* table, int64_t lo,
            int64_t hi, int64_t H, int64_t KVH, const int64_t* kv_head, int64_t head_dim,
            int64_t bs, int64_t num_blocks, int64_t block_stride, float scale, float cap,
            float* m, float* l, float* acc, float* s) {
  const int64_t D = DC > 0 ? DC : head_dim;
  const int64_t row = KVH * D;  // elements from one token to the next inside a block
  for (int64_t j = lo / bs; j * bs < hi; ++j)
    if (table[j] < 0 || table[j] >= num_blocks) return false;
  for (int64_t j = lo / bs; j * bs < hi; ++j) {
    const T* kb = k + table[j] * block_stride;
    const T* vb = v + table[j] * block_stride;
    const int64_t t0 = std::max<int64_t>(0, lo - j * bs), t1 = std::min<int64_t>(bs, hi - j * bs);
    for (int64_t t = t0; t < t1; ++t) {  // scores s[head][t]
      const T* kt = kb + t * row;
      for (int64_t hq = 0; hq < H; ++hq) {
        const float* qh = qf + hq * D;
        const T* kh = kt + kv_head[hq] * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qh[d] * to_float(kh[d]);
        s[hq * bs + t] = dot * scale;
      }
    }
    for (int64_t hq = 0; hq < H; ++hq) {  // one rescale per block and head
      const float correction = softmax_block(s + hq * bs, t0, t1, cap, m[hq], l[hq]);
      if (correction != 1.0f) {
        float* ah = acc + hq * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ah[d] *= correction;
      }
    }
    for (int64_t t = t0; t < t1; ++t) {  // acc += p * V
      const T* vt = vb + t * row;
      for (int64_t hq = 0; hq < H; ++hq) {
        const float p = s[hq * bs + t];
        const T* vh = vt + kv_head[hq] * D;
        float* ah = acc + hq * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ah[d] += p * to_float(vh[d]);
      }
    }
  }
  return true;
}


// The next block's K and V, asked for a few lines at a time while this block is read
// (`lines` more at each call, K's then V's), so that their fetch overlaps the arithmetic.
// Asked for all at once at the block's start (256 lines of 64 bytes at the tiny model's
// shape), the requests filled the core's miss buffers and stalled it until most had arrived.
// Into the second-level cache: a block can outgrow the first (64 KB at 8 kv heads of 64).
// Four layers' decode attention, 2 threads, against the burst into the first level:
// 1.24x at 32 sequences of 160 tokens (tiny), 1.41x at one of 8k (Llama-3-8B shape),
// 1.31x at 64 of 256 (8 kv heads of 64); the tiny model's decode step at batch 32 and 130
// tokens 4.5 -> 4.0 ms.
struct Prefetcher {
  const char* k = nullptr;
  const char* v = nullptr;  // null: k's range alone
  int64_t bytes = 0, at = 0;  // of k's range (and of v's); how far it has asked

  void next(int64_t lines) {
    const int64_t end = v != nullptr ? 2 * bytes : bytes;
    for (int64_t i = 0; i < lines && at < end; ++i, at += 64)
      __builtin_prefetch(at < bytes ? k + at : v + (at - bytes), 0, 2);
  }
};

// The keys [lo, hi) of one sequence for every query head, float32 with a head dim DC (a
// multiple of 8) and G query heads a kv head: the same partial softmax state as attend,
// in m, l and acc from their initial values (-inf, 0, 0). A block at a time, each kv head
// in turn: its G heads' outputs in registers across the block's tokens, each K and V row
// loaded once for the G heads. So the block is read front to back while the next one is
// fetched. (A kv head at a time across all blocks read each block KVH times over, at a
// stride the hardware does not fetch ahead: four layers of a Llama-3-8B shape at one
// sequence of 8k tokens took 25.6 ms that way, 16.9 this way; docs/benchmarks.md.)
// Block ids are checked by the caller.
template <int DC, int G>
void attend_group(const float* qf, const float* k, const float* v, const int64_t* table,
                  int64_t lo, int64_t hi, int64_t KVH, int64_t bs, int64_t block_stride,
                  float scale, float cap, float* m, float* l, float* acc, float* s) {
  constexpr int NV = DC / 8;
  const int64_t row = KVH * DC;
  // each score below asks for the next block's share: 2 DC floats, of its K and V rows
  constexpr int64_t kLinesPerScore = 2 * DC * sizeof(float) / 64;
  for (int64_t j = lo / bs; j * bs < hi; ++j) {
    Prefetcher ahead;
    if ((j + 1) * bs < hi) {
      ahead.k = reinterpret_cast<const char*>(k + table[j + 1] * block_stride);
      ahead.v = reinterpret_cast<const char*>(v + table[j + 1] * block_stride);
      ahead.bytes = bs * row * sizeof(float);
    }
    const int64_t t0 = std::max<int64_t>(0, lo - j * bs), t1 = std::min<int64_t>(bs, hi - j * bs);
    for (int64_t kvh = 0; kvh < KVH; ++kvh) {
      const float* kb = k + table[j] * block_stride + kvh * DC;
      const float* vb = v + table[j] * block_stride + kvh * DC;
      float* ah = acc + kvh * G * DC;
      v8f qv[G][NV], o[G][NV];
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < NV; ++i) {
          qv[g][i] = load8(qf + (kvh * G + g) * DC + i * 8);
          o[g][i] = load8(ah + g * DC + i * 8);
        }
      int64_t t = t0;
      // scores s[g][t], eight tokens at a time: their dot products' horizontal sums done
      // together (hsum_pairs4, then add_pairs: the same bits as one hsum each, a third of the shuffles and adds):
      // four layers' attention 1.07x at the tiny shape's 32 x 160, 1.19x at 8 x 1,024 of
      // Qwen2.5-0.5B's heads (7 of 64 dims a kv head), 1.0x at Llama-3-8B's 1 x 8,192
      for (; t + 8 <= t1; t += 8) {
        v8f pairs[2][G];
        for (int half = 0; half < 2; ++half) {
          v8f a[G][4];
          for (int u = 0; u < 4; ++u) {
            const int64_t tt = t + half * 4 + u;
            ahead.next(kLinesPerScore);
            v8f kk[NV];
            for (int i = 0; i < NV; ++i) kk[i] = load8(kb + tt * row + i * 8);
            for (int g = 0; g < G; ++g) {
              a[g][u] = qv[g][0] * kk[0];
              for (int i = 1; i < NV; ++i) a[g][u] += qv[g][i] * kk[i];
            }
          }
          for (int g = 0; g < G; ++g) pairs[half][g] = hsum_pairs4(a[g]);
        }
        for (int g = 0; g < G; ++g) {
          const v8f scores = add_pairs(pairs[0][g], pairs[1][g]) * scale;
          std::memcpy(s + g * bs + t, &scores, sizeof(v8f));
        }
      }
      for (; t < t1; ++t) {  // the rest one at a time
        ahead.next(kLinesPerScore);
        v8f kk[NV];
        for (int i = 0; i < NV; ++i) kk[i] = load8(kb + t * row + i * 8);
        for (int g = 0; g < G; ++g) {
          v8f a = qv[g][0] * kk[0];
          for (int i = 1; i < NV; ++i) a += qv[g][i] * kk[i];
          s[g * bs + t] = hsum(a) * scale;
        }
      }
      for (int g = 0; g < G; ++g) {  // one rescale per block and head
        const int64_t h = kvh * G + g;
        const float correction = softmax_block(s + g * bs, t0, t1, cap, m[h], l[h]);
        if (correction != 1.0f)
          for (int i = 0; i < NV; ++i) o[g][i] *= correction;
      }
      for (int64_t t = t0; t < t1; ++t) {  // o += p * V
        v8f vv[NV];
        for (int i = 0; i < NV; ++i) vv[i] = load8(vb + t * row + i * 8);
        for (int g = 0; g < G; ++g) {
          const float p = s[g * bs + t];
          for (int i = 0; i < NV; ++i) o[g][i] += p * vv[i];
        }
      }
      for (int g = 0; g < G; ++g)
        for (int i = 0; i < NV; ++i) std::memcpy(ah + g * DC + i * 8, &o[g][i], sizeof(v8f));
    }
  }
}

// attend_group for a float32 range, when DC and G have an instance; false when they do
// not (attend then runs it).
template <int DC>
bool attend_grouped(const float* qf, const float* k, const float* v, const int64_t* table,
                    int64_t lo, int64_t hi, int64_t H, int64_t KVH, int64_t bs,
                    int64_t block_stride, float scale, float cap, float* m, float* l,
                    float* acc, float* s) {
  const int64_t G = H / KVH;
  auto run = G == 1   ? attend_group<DC, 1>
             : G == 2 ? attend_group<DC, 2>
             : G == 3 ? attend_group<DC, 3>
             : G == 4 ? attend_group<DC, 4>
             : G == 5 ? attend_group<DC, 5>
             : G == 6 ? attend_group<DC, 6>
             : G == 7 ? attend_group<DC, 7>
             : G == 8 ? attend_group<DC, 8>
                      : nullptr;
  if (run == nullptr) return false;
  run(qf, k, v, table, lo, hi, KVH, bs, block_stride, scale, cap, m, l, acc, s);
  return true;
}

// Each sequence's keys are cut into `splits` ranges of whole blocks (more than one when
// there are fewer sequences than threads: batch 1 at a long context), attended in parallel,
// then merged by their maxima and sums. Returns 0, or 1 when a context length exceeds its
// table or a block id is outside the pool: nothing outside the pool is read, and out is
// not to be used.
template <typename T>
int decode(const T* q, const T* k, const T* v, const int64_t* tables, const int64_t* ctx_lens,
           T* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t bs, int64_t num_blocks,
           int64_t max_blocks, int64_t block_stride, float scale, int64_t window, float cap,
           int64_t splits, int num_threads) {
  for (int64_t b = 0; b < B; ++b)
    if (ctx_lens[b] < 1 || ctx_lens[b] > max_blocks * bs) return 1;
  int bad = 0;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> m(B * splits * H, neg_inf), l(B * splits * H, 0.0f);
  std::vector<float> acc(B * splits * H * D, 0.0f);
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> qf(H * D), s(H * bs), o(D);
    // NOTE: each query head's kv head, looked up: a 64-bit division per score costs more
    // than the score's multiply-adds
    std::vector<int64_t> kv_head(H);
    for (int64_t hq = 0; hq < H; ++hq) kv_head[hq] = hq / (H / KVH);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < B * splits; ++task) {
      const int64_t b = task / splits, part = task % splits;
      const int64_t len = ctx_lens[b];
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t first = start / bs, blocks = (len + bs - 1) / bs - first;
      const int64_t per = (blocks + splits - 1) / splits;
      const int64_t lo = std::max(start, (first + part * per) * bs);
      const int64_t hi = std::min(len, (first + (part + 1) * per) * bs);
      if (lo >= hi) continue;
      for (int64_t i = 0; i < H * D; ++i) qf[i] = to_float(q[b * H * D + i]);
      if constexpr (std::is_same_v<T, float>) {
        bool ids_ok = true;
        for (int64_t j = lo / bs; j * bs < hi; ++j)
          ids_ok = ids_ok && tables[b * max_blocks + j] >= 0 && tables[b * max_blocks + j] < num_blocks;
        if (!ids_ok) {
#pragma omp atomic write
          bad = 1;
          continue;
        }
        auto grouped = D == 32    ? attend_grouped<32>
                       : D == 64  ? attend_grouped<64>
                       : D == 128 ? attend_grouped<128>
                                  : nullptr;
        if (grouped != nullptr &&
            grouped(qf.data(), k, v, tables + b * max_blocks, lo, hi, H, KVH, bs, block_stride,
                    scale, cap, &m[task * H], &l[task * H], &acc[task * H * D], s.data()))
          continue;
      }
      // NOTE: the usual head dims get loops of a fixed length
      auto run = D == 32    ? attend<T, 32>
                 : D == 64  ? attend<T, 64>
                 : D == 128 ? attend<T, 128>
                 : D == 256 ? attend<T, 256>
                            : attend<T, 0>;
      if (!run(qf.data(), k, v, tables + b * max_blocks, lo, hi, H, KVH, kv_head.data(), D, bs,
               num_blocks, block_stride, scale, cap, &m[task * H], &l[task * H],
               &acc[task * H * D], s.data())) {
#pragma omp atomic write
        bad = 1;
      }
    }
#pragma omp for
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, hq = bh % H;
      float top = neg_inf;
      for (int64_t p = 0; p < splits; ++p) top = std::max(top, m[(b * splits + p) * H + hq]);
      std::fill(o.begin(), o.end(), 0.0f);
      float sum = 0.0f;
      for (int64_t p = 0; p < splits; ++p) {
        const int64_t i = (b * splits + p) * H + hq;
        if (m[i] == neg_inf) continue;  // an empty range
        const float w = std::exp(m[i] - top);
        sum += l[i] * w;
        for (int64_t d = 0; d < D; ++d) o[d] += acc[i * D + d] * w;
      }
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      for (int64_t d = 0; d < D; ++d) from_float(o[d] * inv, &out[bh * D + d]);
    }
  }
  return bad;
}


// ---------------------------------------------------------------------------------------
// A whole decode step of a dense float32 Llama-family model (model.py's LlamaModel.forward
// when every token is a decode): B sequences, one new token each, through every layer, then
// the logits of S of them. One call, so the step costs no Python per operation; its
// matrix-vector products stream each weight row once for all B tokens and split the rows
// over the threads (at batch 1 the step is bound by reading the weights).
//
// Per layer the pointers (LAYER_PTRS of them, null where the model has none):
enum LayerPtr {
  kInNorm, kQkvW, kQkvB, kQNorm, kKNorm, kOW, kOB, kPostAttnNorm, kPreFfNorm, kPostFfNorm,
  kGateUpW, kGateUpB, kDownW, kDownB, kKCache, kVCache, kLayerPtrs
};
// and the sizes (dims) and constants:
enum Dim {
  kB, kS, kHidden, kInter, kHeads, kKvHeads, kHeadDim, kVocab, kLayers, kBlockSize,
  kNumBlocks, kMaxBlocks, kBlockStride, kRopeRows, kAct, kNormPlusOne, kSandwich, kQkNorm,
  kSplits, kThreads, kDims
};
enum Const { kEps, kEmbedScale, kAttnScale, kAttnCap, kFinalCap, kConsts };
enum Act { kSilu, kGeluTanh, kGelu };


// The dot products of 4 weight rows w[0..3] with NB input vectors x[0..NB) of length K,
// into s[b][r]: each weight vector loaded once for the NB inputs.
template <int NB>
void dots(const float* const* w, const float* const* x, int64_t K, float (*s)[4]) {
  const int64_t K8 = K - K % 8;
  v8f acc[NB][4] = {};
  for (int64_t k = 0; k < K8; k += 8) {
    v8f w0 = load8(w[0] + k), w1 = load8(w[1] + k), w2 = load8(w[2] + k), w3 = load8(w[3] + k);
    keep_in_register(w0);
    keep_in_register(w1);
    keep_in_register(w2);
    keep_in_register(w3);
    for (int b = 0; b < NB; ++b) {
      v8f xv = load8(x[b] + k);
      keep_in_register(xv);
      acc[b][0] += w0 * xv;
      acc[b][1] += w1 * xv;
      acc[b][2] += w2 * xv;
      acc[b][3] += w3 * xv;
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < 4; ++r) {
      float t = hsum(acc[b][r]);
      for (int64_t k = K8; k < K; ++k) t += w[r][k] * x[b][k];
      s[b][r] = t;
    }
}

// y[b, n] = W[n] . x[b] (+ bias[n]) for b < B, n < N; W [N, K] row-major, x [B, K], y [B, N].
// Four weight rows at a time, read once for every b (four b at a time, then two, then one,
// sharing the loads); the row groups are split over the threads. Each row's sum runs in
// the same order whatever B is. The next group's rows asked for ahead: the tiny model's
// decode step at batch 32, 3.9 -> 3.2 ms; 8, 2.5 -> 1.9; the Qwen2.5-0.5B shape's at 32,
// 247 -> 209 ms.
void matvec(const float* W, const float* bias, const float* x, float* y, int64_t B, int64_t N,
            int64_t K, int threads) {
  const int64_t groups = (N + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t n0 = g * 4, rows = std::min<int64_t>(4, N - n0);
    const float* w[4];
    for (int64_t r = 0; r < 4; ++r) w[r] = W + (n0 + std::min(r, rows - 1)) * K;
    float s[4][4];
    // with more than one pass over the rows' inputs, the next group's rows are asked for
    // into L2 a share at each pass (see Prefetcher); at one pass the hardware's own
    // prefetch of the rows in order keeps up
    const int64_t passes = (B + 3) / 4;
    Prefetcher ahead;
    if (passes > 1 && g + 1 < groups) {
      ahead.k = reinterpret_cast<const char*>(W + (n0 + 4) * K);
      ahead.bytes = std::min<int64_t>(4, N - n0 - 4) * K * sizeof(float);
    }
    const int64_t lines = passes > 1 ? (ahead.bytes / 64 + passes - 1) / passes : 0;
    for (int64_t b = 0; b < B;) {
      ahead.next(lines);
      const int64_t nb = B - b >= 4 ? 4 : B - b >= 2 ? 2 : 1;
      const float* xb[4];
      for (int64_t i = 0; i < 4; ++i) xb[i] = x + std::min(b + i, B - 1) * K;
      if (nb == 4)
        dots<4>(w, xb, K, s);
      else if (nb == 2)
        dots<2>(w, xb, K, s);
      else
        dots<1>(w, xb, K, s);
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t r = 0; r < rows; ++r)
          y[(b + i) * N + n0 + r] = s[i][r] + (bias ? bias[n0 + r] : 0.0f);
      b += nb;
    }
  }
}

// RMSNorm of each of the `rows` vectors of x [rows, n] into out (which may be x), as model.py
// computes it in float32: x * rsqrt(mean(x^2) + eps) * w, or * (1 + w) with plus_one (Gemma).
void rms_norm(const float* x, const float* w, float* out, int64_t rows, int64_t n, float eps,
              bool plus_one) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
    float* o = out + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] = (xr[i] * inv) * (plus_one ? 1.0f + w[i] : w[i]);
  }
}

// Rotates each of the `heads` vectors of x [heads, D] by the position's cos/sin rows [D]
// (non-interleaved halves, as HF Llama).
void rope(float* x, const float* cos, const float* sin, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* xh = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = xh[i], b = xh[i + half];
      xh[i] = a * cos[i] - b * sin[i];
      xh[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// out[i] = act(gate[i]) * up[i] for i < n. SiLU and tanh-GELU in plain arithmetic (e^x as
// exp_clamped), so the loop vectorizes: with std::exp, a libm call per element, the
// activations of a batch of 32 took as long as its matrix products. Exact GELU keeps erf.
void activate(const float* gate, const float* up, float* out, int64_t n, int64_t act) {
  if (act == kSilu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + exp_clamped(-gate[i])) * up[i];
  } else if (act == kGeluTanh) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = gate[i], y = 0.7978845608028654f * (x + 0.044715f * x * x * x);
      const float tanh_y = 1.0f - 2.0f / (1.0f + exp_clamped(2.0f * y));
      out[i] = 0.5f * x * (1.0f + tanh_y) * up[i];
    }
  } else {
    for (int64_t i = 0; i < n; ++i)
      out[i] = 0.5f * gate[i] * (1.0f + std::erf(gate[i] * 0.7071067811865476f)) * up[i];
  }
}

// Every index the step reads through, checked before anything is written: token ids within
// the vocabulary, positions within the RoPE tables, slots within the pool, context lengths
// within [1, the table] and the block ids they reach within the pool, rows within the batch.
bool indices_ok(const int64_t* dims, const int64_t* ids, const int64_t* positions,
                const int64_t* slots, const int64_t* tables, const int64_t* ctx_lens,
                const int64_t* rows) {
  const int64_t bs = dims[kBlockSize], max_blocks = dims[kMaxBlocks];
  for (int64_t b = 0; b < dims[kB]; ++b) {
    if (ids[b] < 0 || ids[b] >= dims[kVocab] || positions[b] < 0 ||
        positions[b] >= dims[kRopeRows] || slots[b] < 0 ||
        slots[b] >= dims[kNumBlocks] * bs || ctx_lens[b] < 1 || ctx_lens[b] > max_blocks * bs)
      return false;
    for (int64_t j = 0; j * bs < ctx_lens[b]; ++j) {
      const int64_t block = tables[b * max_blocks + j];
      if (block < 0 || block >= dims[kNumBlocks]) return false;
    }
  }
  for (int64_t s = 0; s < dims[kS]; ++s)
    if (rows[s] < 0 || rows[s] >= dims[kB]) return false;
  return true;
}

int forward(const int64_t* dims, const float* consts, const float* const* layer_ptrs,
            const int64_t* windows, const int64_t* ids, const int64_t* positions,
            const int64_t* slots, const int64_t* tables, const int64_t* ctx_lens,
            const int64_t* rows, const float* embed, const float* final_norm,
            const float* lm_head, const float* cos, const float* sin, float* logits) {
  if (!indices_ok(dims, ids, positions, slots, tables, ctx_lens, rows)) return 1;
  const int64_t B = dims[kB], S = dims[kS], E = dims[kHidden], I = dims[kInter];
  const int64_t H = dims[kHeads], KVH = dims[kKvHeads], D = dims[kHeadDim];
  const int64_t q_size = H * D, kv_size = KVH * D, qkv_size = q_size + 2 * kv_size;
  const int64_t bs = dims[kBlockSize], act = dims[kAct];
  const bool plus_one = dims[kNormPlusOne], sandwich = dims[kSandwich];
  const float eps = consts[kEps];
  const int threads = static_cast<int>(dims[kThreads]);
  std::vector<float> x(B * E), h(B * E), o(B * E), qkv(B * qkv_size), q(B * q_size),
      attn(B * q_size), gate_up(B * 2 * I), mid(B * I);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < E; ++i) x[b * E + i] = embed[ids[b] * E + i] * consts[kEmbedScale];
  for (int64_t layer = 0; layer < dims[kLayers]; ++layer) {
    const float* const* p = layer_ptrs + layer * kLayerPtrs;
    rms_norm(x.data(), p[kInNorm], h.data(), B, E, eps, plus_one);
    matvec(p[kQkvW], p[kQkvB], h.data(), qkv.data(), B, qkv_size, E, threads);
    float* k_cache = const_cast<float*>(p[kKCache]);
    float* v_cache = const_cast<float*>(p[kVCache]);
    for (int64_t b = 0; b < B; ++b) {
      float* qb = qkv.data() + b * qkv_size;  // q, k, v side by side
      float* kb = qb + q_size;
      if (dims[kQkNorm]) {
        rms_norm(qb, p[kQNorm], qb, H, D, eps, false);
        rms_norm(kb, p[kKNorm], kb, KVH, D, eps, false);
      }
      const float* c = cos + positions[b] * D;
      const float* s = sin + positions[b] * D;
      rope(qb, c, s, H, D);
      rope(kb, c, s, KVH, D);
      std::memcpy(q.data() + b * q_size, qb, q_size * sizeof(float));
      const int64_t at = (slots[b] / bs) * dims[kBlockStride] + (slots[b] % bs) * kv_size;
      std::memcpy(k_cache + at, kb, kv_size * sizeof(float));
      std::memcpy(v_cache + at, kb + kv_size, kv_size * sizeof(float));
    }
    if (decode(q.data(), k_cache, v_cache, tables, ctx_lens, attn.data(), B, H, KVH, D, bs,
               dims[kNumBlocks], dims[kMaxBlocks], dims[kBlockStride], consts[kAttnScale],
               windows[layer], consts[kAttnCap], dims[kSplits], threads))
      return 1;  // NOTE: unreachable after indices_ok
    matvec(p[kOW], p[kOB], attn.data(), o.data(), B, E, q_size, threads);
    if (sandwich) rms_norm(o.data(), p[kPostAttnNorm], o.data(), B, E, eps, plus_one);
    for (int64_t i = 0; i < B * E; ++i) x[i] += o[i];
    rms_norm(x.data(), sandwich ? p[kPreFfNorm] : p[kPostAttnNorm], h.data(), B, E, eps,
             plus_one);
    matvec(p[kGateUpW], p[kGateUpB], h.data(), gate_up.data(), B, 2 * I, E, threads);
    for (int64_t b = 0; b < B; ++b)
      activate(&gate_up[b * 2 * I], &gate_up[b * 2 * I + I], &mid[b * I], I, act);
    matvec(p[kDownW], p[kDownB], mid.data(), o.data(), B, E, I, threads);
    if (sandwich) rms_norm(o.data(), p[kPostFfNorm], o.data(), B, E, eps, plus_one);
    for (int64_t i = 0; i < B * E; ++i) x[i] += o[i];
  }
  std::vector<float> last(S * E);
  for (int64_t s = 0; s < S; ++s) std::memcpy(&last[s * E], &x[rows[s] * E], E * sizeof(float));
  rms_norm(last.data(), final_norm, last.data(), S, E, eps, plus_one);
  matvec(lm_head, nullptr, last.data(), logits, S, dims[kVocab], E, threads);
  const float cap = consts[kFinalCap];
  if (cap > 0.0f)
    for (int64_t i = 0; i < S * dims[kVocab]; ++i) logits[i] = std::tanh(logits[i] / cap) * cap;
  return 0;
}


// ---------------------------------------------------------------------------------------
// The work between the matrix products of any other float32 step (prefills, mixed steps,
// more decodes than forward takes), for model.py's step through torch's GEMMs: each a pass
// over the step's rows, split over the threads.

// x [rows, n] += a (a normed by a_norm first, when given: Gemma 2's post-norms); then, when
// out is given, out = rms_norm(x) by w.
void add_norm(float* x, const float* a, const float* a_norm, const float* w, float* out,
              int64_t rows, int64_t n, float eps, bool plus_one, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> normed(a_norm != nullptr ? n : 0);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float* xr = x + r * n;
      const float* ar = a + r * n;
      if (a_norm != nullptr) {
        rms_norm(ar, a_norm, normed.data(), 1, n, eps, plus_one);
        ar = normed.data();
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) xr[i] += ar[i];
      if (out != nullptr) rms_norm(xr, w, out + r * n, 1, n, eps, plus_one);
    }
  }
}

// qkv [T, (H + 2 KVH) D], one row per token: its q and k heads normed (q_norm, k_norm when
// given: Qwen3) and rotated at the token's position, in place; its k and v written at its
// slot of the layer's cache. Returns 1, having changed nothing, when a position or a slot
// is out of range.
int rope_write(float* qkv, int64_t T, int64_t H, int64_t KVH, int64_t D,
               const int64_t* positions, const float* cos, const float* sin, int64_t rope_rows,
               const float* q_norm, const float* k_norm, float eps, const int64_t* slots,
               float* k_cache, float* v_cache, int64_t bs, int64_t block_stride,
               int64_t num_blocks, int threads) {
  for (int64_t t = 0; t < T; ++t)
    if (positions[t] < 0 || positions[t] >= rope_rows || slots[t] < 0 || slots[t] >= num_blocks * bs)
      return 1;
  const int64_t q_size = H * D, kv_size = KVH * D, row = q_size + 2 * kv_size;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* qt = qkv + t * row;
    float* kt = qt + q_size;
    if (q_norm != nullptr) rms_norm(qt, q_norm, qt, H, D, eps, false);
    if (k_norm != nullptr) rms_norm(kt, k_norm, kt, KVH, D, eps, false);
    rope(qt, cos + positions[t] * D, sin + positions[t] * D, H, D);
    rope(kt, cos + positions[t] * D, sin + positions[t] * D, KVH, D);
    const int64_t at = (slots[t] / bs) * block_stride + (slots[t] % bs) * kv_size;
    std::memcpy(k_cache + at, kt, kv_size * sizeof(float));
    std::memcpy(v_cache + at, kt + kv_size, kv_size * sizeof(float));
  }
  return 0;
}

}  // namespace

extern "C" {

int agentos_decode_f32(const float* q, const float* k, const float* v, const int64_t* tables,
                       const int64_t* ctx_lens, float* out, int64_t B, int64_t H, int64_t KVH,
                       int64_t D, int64_t bs, int64_t num_blocks, int64_t max_blocks,
                       int64_t block_stride, float scale, int64_t window, float cap,
                       int64_t splits, int num_threads) {
  return decode(q, k, v, tables, ctx_lens, out, B, H, KVH, D, bs, num_blocks, max_blocks,
                block_stride, scale, window, cap, splits, num_threads);
}

int agentos_decode_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                        const int64_t* tables, const int64_t* ctx_lens, uint16_t* out,
                        int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t bs,
                        int64_t num_blocks, int64_t max_blocks, int64_t block_stride,
                        float scale, int64_t window, float cap, int64_t splits,
                        int num_threads) {
  return decode(q, k, v, tables, ctx_lens, out, B, H, KVH, D, bs, num_blocks, max_blocks,
                block_stride, scale, window, cap, splits, num_threads);
}

// dims [kDims], consts [kConsts], layer_ptrs [layers * kLayerPtrs], windows [layers] (0: full
// attention); ids, positions, slots, ctx_lens [B]; tables [B, max_blocks]; rows [S]; embed
// [vocab, hidden]; lm_head [vocab, hidden] (the embedding when tied); cos, sin [rope_rows,
// head_dim]; logits [S, vocab] out. Returns 0, or 1 (having written nothing) when an index
// is out of range (see indices_ok).
int agentos_forward_f32(const int64_t* dims, const float* consts, const float* const* layer_ptrs,
                        const int64_t* windows, const int64_t* ids, const int64_t* positions,
                        const int64_t* slots, const int64_t* tables, const int64_t* ctx_lens,
                        const int64_t* rows, const float* embed, const float* final_norm,
                        const float* lm_head, const float* cos, const float* sin,
                        float* logits) {
  return forward(dims, consts, layer_ptrs, windows, ids, positions, slots, tables, ctx_lens,
                 rows, embed, final_norm, lm_head, cos, sin, logits);
}

// The steps through torch's GEMMs (see add_norm, rope_write, activate): x, a, out [rows, n];
// qkv [T, (H + 2 KVH) D]; gate_up [T, 2 I], out [T, I]. Null a_norm, w or out: none.
void agentos_add_norm_f32(float* x, const float* a, const float* a_norm, const float* w,
                          float* out, int64_t rows, int64_t n, float eps, int plus_one,
                          int threads) {
  add_norm(x, a, a_norm, w, out, rows, n, eps, plus_one, threads);
}

void agentos_rms_norm_f32(const float* x, const float* w, float* out, int64_t rows, int64_t n,
                          float eps, int plus_one, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) rms_norm(x + r * n, w, out + r * n, 1, n, eps, plus_one);
}

int agentos_rope_write_f32(float* qkv, int64_t T, int64_t H, int64_t KVH, int64_t D,
                           const int64_t* positions, const float* cos, const float* sin,
                           int64_t rope_rows, const float* q_norm, const float* k_norm,
                           float eps, const int64_t* slots, float* k_cache, float* v_cache,
                           int64_t bs, int64_t block_stride, int64_t num_blocks, int threads) {
  return rope_write(qkv, T, H, KVH, D, positions, cos, sin, rope_rows, q_norm, k_norm, eps,
                    slots, k_cache, v_cache, bs, block_stride, num_blocks, threads);
}

// y [B, N] = x [B, K] W^T (+ bias): matvec, the decode step's weight products, for a
// step of a few rows (W read once for all of them).
void agentos_matvec_f32(const float* W, const float* bias, const float* x, float* y, int64_t B,
                        int64_t N, int64_t K, int threads) {
  matvec(W, bias, x, y, B, N, K, threads);
}

void agentos_act_mul_f32(const float* gate_up, float* out, int64_t T, int64_t I, int act,
                         int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t t = 0; t < T; ++t) activate(gate_up + t * 2 * I, gate_up + t * 2 * I + I, out + t * I, I, act);
}

int agentos_forward_dims() { return kDims; }
int agentos_forward_consts() { return kConsts; }
int agentos_forward_layer_ptrs() { return kLayerPtrs; }

}  // extern "C"
