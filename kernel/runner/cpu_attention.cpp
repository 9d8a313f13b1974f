// Paged decode attention on the CPU: one query per sequence over its cached K/V, read in
// place through the block table (no gathered copy of the context). Built on first use by
// cpu_attention.py with the system C++ compiler; called through ctypes.
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
// online-softmax rescale per head (fp32 throughout), then the V rows weighted in.
// window > 0: only the last `window` keys are visible; cap > 0: scores become
// tanh(s / cap) * cap (Gemma 2).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// The keys [lo, hi) of sequence b, every head: the partial softmax state of each query head
// (its running max m, sum l and unnormalized output acc). Each token's K (then V) row holds
// all kv heads side by side, so a block is read front to back, once.
// Returns false, having read nothing, when a block id of the range is outside the pool.
template <typename T>
bool attend(const float* qf, const T* k, const T* v, const int64_t* table, int64_t lo,
            int64_t hi, int64_t H, int64_t KVH, int64_t D, int64_t bs, int64_t num_blocks,
            int64_t block_stride, float scale, float cap, float* m, float* l, float* acc,
            float* s) {
  const int64_t G = H / KVH;
  const int64_t row = KVH * D;  // elements from one token to the next inside a block
  const float neg_inf = -std::numeric_limits<float>::infinity();
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
        const T* kh = kt + (hq / G) * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qh[d] * to_float(kh[d]);
        float score = dot * scale;
        if (cap > 0.0f) score = std::tanh(score / cap) * cap;
        s[hq * bs + t] = score;
      }
    }
    for (int64_t hq = 0; hq < H; ++hq) {  // one rescale per block and head
      float block_max = neg_inf;
      for (int64_t t = t0; t < t1; ++t) block_max = std::max(block_max, s[hq * bs + t]);
      const float new_max = std::max(m[hq], block_max);
      if (m[hq] != new_max && m[hq] != neg_inf) {
        const float correction = std::exp(m[hq] - new_max);
        l[hq] *= correction;
        float* ah = acc + hq * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ah[d] *= correction;
      }
      m[hq] = new_max;
      for (int64_t t = t0; t < t1; ++t) {
        const float p = std::exp(s[hq * bs + t] - new_max);
        s[hq * bs + t] = p;
        l[hq] += p;
      }
    }
    for (int64_t t = t0; t < t1; ++t) {  // acc += p * V
      const T* vt = vb + t * row;
      for (int64_t hq = 0; hq < H; ++hq) {
        const float p = s[hq * bs + t];
        const T* vh = vt + (hq / G) * D;
        float* ah = acc + hq * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ah[d] += p * to_float(vh[d]);
      }
    }
  }
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
    std::vector<float> qf(H * D), s(H * bs);
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
      if (!attend(qf.data(), k, v, tables + b * max_blocks, lo, hi, H, KVH, D, bs, num_blocks,
                  block_stride, scale, cap, &m[task * H], &l[task * H], &acc[task * H * D],
                  s.data())) {
#pragma omp atomic write
        bad = 1;
      }
    }
#pragma omp for
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, hq = bh % H;
      float top = neg_inf;
      for (int64_t p = 0; p < splits; ++p) top = std::max(top, m[(b * splits + p) * H + hq]);
      std::vector<float> o(D, 0.0f);
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

}  // extern "C"
