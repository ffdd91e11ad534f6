// batchrun's CPU cascade attention: one call per cascade part per layer over a page-size-1 KV slot pool, read in
// its own dtype (fp32, bf16 or fp16) with fp32 accumulation and an online softmax in base 2, causality from
// per-row key limits (no mask). The prefix parts resume the own part's (o, lse) in place, so no merge op is
// needed. Tiles of few rows (decode) run on AVX-512 FMAs; in bf16/fp16, tiles of many rows (prefill chunks,
// prefix segments read by a group) run Q K^T and P V on the matrix unit (AMX) through torch's
// at::native::cpublas::brgemm. Built with AVX-512 (F, BW, DQ, VL); Python uses it only on CPUs that have it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "vec.h"
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int BK = 16;       // keys per block (one zmm of scores)
constexpr int MAX_ROWS = 64;  // query rows (query x head in the GQA group) per tile
constexpr int BN_MAX = 256;   // keys per block on the matrix unit
constexpr int MU_MIN_ROWS = 16;  // segments of at least this many rows go to the matrix unit (bf16/fp16)
constexpr int MU_MAX_ROWS = 128;  // rows per matrix-unit tile: K and V are packed once per tile and block
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

using batchrun_cpu::load16;
using batchrun_cpu::store16;

// 2^x for x >= -150 (smaller x are clamped: the result underflows to ~0).
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.f));
  __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(x, n);  // [-0.5, 0.5]
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <typename P>
P* align64(P* p) {
  return reinterpret_cast<P*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Transposes 16 rows of 16 uint32 in registers (r[j] = row j): afterwards r[i] holds column i.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    r[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]);
    r[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
    r[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]);
    r[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    t[j] = _mm512_shuffle_i32x4(r[j], r[j + 4], 0x88);
    t[j + 4] = _mm512_shuffle_i32x4(r[j], r[j + 4], 0xdd);
    t[j + 8] = _mm512_shuffle_i32x4(r[j + 8], r[j + 12], 0x88);
    t[j + 12] = _mm512_shuffle_i32x4(r[j + 8], r[j + 12], 0xdd);
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

struct Item {
  int64_t seg, head, q0, nq;  // segment, kv head, first query of the tile (within the segment), queries
  int64_t cost;
};


template <typename T, int D>
struct Part {
  static constexpr int NV = D / 16;
  const T* q; int64_t qs0, qs1;
  const T* k; const T* v; int64_t ks0, ks1, vs0, vs1;
  float* o; float* lse;  // o [N, Hq, D] contiguous, lse [N, Hq] contiguous
  const int64_t* q_start; const int64_t* q_len; const int64_t* kv_indices; const int64_t* kv_indptr;
  int64_t num_q_heads, group;
  bool is_causal, is_merge;
  bool use_brgemm;  // bf16/fp16 tiles of many rows on the matrix unit (AMX) through at::native::cpublas
  float scale2;  // sm_scale * log2(e)

  const T* q_row(const Item& it, int r) const {
    return q + (q_start[it.seg] + it.q0 + r / group) * qs0 + (it.head * group + r % group) * qs1;
  }

  // Per tile row r (query it.q0 + r / group, head of the group r % group): its key limit, and its state
  // (m, l, acc) empty or resumed from the (o, lse) an earlier part left (o is normalised: l = 1 at m = lse).
  // Returns the largest limit.
  int64_t init_rows(const Item& it, int M, float* acc, float* m, float* l, int64_t* limit) const {
    const int64_t g = it.seg, q_len_g = q_len[g], kv_len = kv_indptr[g + 1] - kv_indptr[g];
    int64_t max_limit = 0;
    for (int r = 0; r < M; ++r) {
      const int64_t qi = it.q0 + r / group, head = it.head * group + r % group, row = q_start[g] + qi;
      limit[r] = is_causal ? std::min(kv_len, std::max<int64_t>(kv_len - q_len_g + qi + 1, 0)) : kv_len;
      max_limit = std::max(max_limit, limit[r]);
      const float lse_row = is_merge ? lse[row * num_q_heads + head] : NEG_INF;
      float* a = acc + r * D;
      if (lse_row == NEG_INF) {
        m[r] = NEG_INF; l[r] = 0.f;
        for (int c = 0; c < NV; ++c) _mm512_store_ps(a + c * 16, _mm512_setzero_ps());
      } else {
        m[r] = lse_row * LOG2E; l[r] = 1.f;
        const float* o_row = o + (row * num_q_heads + head) * D;
        for (int c = 0; c < NV; ++c) _mm512_store_ps(a + c * 16, _mm512_loadu_ps(o_row + c * 16));
      }
    }
    return max_limit;
  }

  void store_rows(const Item& it, int M, const float* acc, const float* m, const float* l) const {
    for (int r = 0; r < M; ++r) {
      const int64_t row = q_start[it.seg] + it.q0 + r / group, head = it.head * group + r % group;
      float* o_row = o + (row * num_q_heads + head) * D;
      if (l[r] == 0.f) {  // saw no key: the empty state, or the earlier part's state unchanged
        if (!is_merge) {
          for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o_row + c * 16, _mm512_setzero_ps());
          lse[row * num_q_heads + head] = NEG_INF;
        }
        continue;
      }
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int c = 0; c < NV; ++c)
        _mm512_storeu_ps(o_row + c * 16, _mm512_mul_ps(_mm512_load_ps(acc + r * D + c * 16), inv));
      lse[row * num_q_heads + head] = (m[r] + std::log2(l[r])) / LOG2E;
    }
  }

  // One row's online softmax over a block of scores s (times `scale` gives base 2; vis keys visible of `width`):
  // updates m, l, writes p to `p` (fp32, or the 16-bit dtype the matrix unit reads; 0 past vis; may be s itself)
  // and returns the factor the row's accumulator must be scaled by.
  template <typename P>
  static float softmax_block(const float* s, int width, int64_t vis, float scale, float& m, float& l, P* p_out) {
    const int nc = width / 16;
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 x[BN_MAX / 16];
    __mmask16 keep[BN_MAX / 16];
    __m512 vmax = _mm512_set1_ps(NEG_INF);
    for (int c = 0; c < nc; ++c) {
      const int64_t left = vis - c * 16;
      keep[c] = left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1u);
      x[c] = _mm512_mask_mul_ps(_mm512_set1_ps(NEG_INF), keep[c], _mm512_load_ps(s + c * 16), sc);
      vmax = _mm512_max_ps(vmax, x[c]);
    }
    const float m_new = std::max(m, _mm512_reduce_max_ps(vmax));
    const float alpha = m == NEG_INF ? 0.f : _mm512_cvtss_f32(exp2_ps(_mm512_set1_ps(m - m_new)));
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < nc; ++c) {
      const __m512 p = _mm512_maskz_mov_ps(keep[c], exp2_ps(_mm512_sub_ps(x[c], mv)));
      sum = _mm512_add_ps(sum, p);
      store16(p_out + c * 16, p);
    }
    l = l * alpha + _mm512_reduce_add_ps(sum);
    m = m_new;
    return alpha;
  }

  void run(const Item& it) const {
    if (use_brgemm && it.nq * group >= MU_MIN_ROWS) run_brgemm(it);
    else run_fma(it);  // the schedule keeps these tiles within MAX_ROWS
  }

  // AVX-512 FMAs: blocks of 16 keys gathered by slot and widened to fp32.
  void run_fma(const Item& it) const {
    const int64_t kv0 = kv_indptr[it.seg];
    const int M = int(it.nq * group);
    alignas(64) float qt[MAX_ROWS][D];
    alignas(64) float acc[MAX_ROWS][D];
    alignas(64) float s[MAX_ROWS][BK];
    alignas(64) float kb[BK][D];
    alignas(64) float kt[D][BK];
    alignas(64) float vb[BK][D];
    float m[MAX_ROWS], l[MAX_ROWS];
    int64_t limit[MAX_ROWS];  // keys j < limit[r] are visible to row r
    const int64_t max_limit = init_rows(it, M, &acc[0][0], m, l, limit);
    for (int r = 0; r < M; ++r) {
      const T* src = q_row(it, r);
      for (int c = 0; c < NV; ++c)
        _mm512_store_ps(&qt[r][c * 16], _mm512_mul_ps(load16(src + c * 16), _mm512_set1_ps(scale2)));
    }
    const bool is_small = M < 16;
    for (int64_t j0 = 0; j0 < max_limit; j0 += BK) {
      const int nb = int(std::min<int64_t>(BK, max_limit - j0));
      for (int n = 0; n < nb; ++n) {
        const int64_t slot = kv_indices[kv0 + j0 + n];
        const T* ks = k + slot * ks0 + it.head * ks1;
        const T* vs = v + slot * vs0 + it.head * vs1;
        for (int c = 0; c < NV; ++c) {
          _mm512_store_ps(&kb[n][c * 16], load16(ks + c * 16));
          _mm512_store_ps(&vb[n][c * 16], load16(vs + c * 16));
        }
      }
      if (is_small) {  // few rows: dot products with a horizontal sum
        for (int r = 0; r < M; ++r)
          for (int n = 0; n < nb; ++n) {
            __m512 a = _mm512_mul_ps(_mm512_load_ps(&qt[r][0]), _mm512_load_ps(&kb[n][0]));
            for (int c = 1; c < NV; ++c)
              a = _mm512_fmadd_ps(_mm512_load_ps(&qt[r][c * 16]), _mm512_load_ps(&kb[n][c * 16]), a);
            s[r][n] = _mm512_reduce_add_ps(a);
          }
      } else {  // many rows: transpose K once, then 16 keys per FMA
        for (int n = 0; n < nb; ++n)
          for (int d = 0; d < D; ++d) kt[d][n] = kb[n][d];
        for (int n = nb; n < BK; ++n)
          for (int d = 0; d < D; ++d) kt[d][n] = 0.f;
        int r = 0;
        for (; r + 4 <= M; r += 4) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          for (int d = 0; d < D; ++d) {
            __m512 kd = _mm512_load_ps(&kt[d][0]);
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(qt[r][d]), kd, a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(qt[r + 1][d]), kd, a1);
            a2 = _mm512_fmadd_ps(_mm512_set1_ps(qt[r + 2][d]), kd, a2);
            a3 = _mm512_fmadd_ps(_mm512_set1_ps(qt[r + 3][d]), kd, a3);
          }
          _mm512_store_ps(&s[r][0], a0); _mm512_store_ps(&s[r + 1][0], a1);
          _mm512_store_ps(&s[r + 2][0], a2); _mm512_store_ps(&s[r + 3][0], a3);
        }
        for (; r < M; ++r) {
          __m512 a0 = _mm512_setzero_ps();
          for (int d = 0; d < D; ++d) a0 = _mm512_fmadd_ps(_mm512_set1_ps(qt[r][d]), _mm512_load_ps(&kt[d][0]), a0);
          _mm512_store_ps(&s[r][0], a0);
        }
      }
      for (int r = 0; r < M; ++r) {
        const int64_t vis = std::min<int64_t>(nb, limit[r] - j0);
        if (vis <= 0) continue;
        const float alpha = softmax_block(&s[r][0], BK, vis, 1.f, m[r], l[r], &s[r][0]);  // q carries the scale
        __m512 o_acc[NV];
        for (int c = 0; c < NV; ++c) o_acc[c] = _mm512_mul_ps(_mm512_load_ps(&acc[r][c * 16]), _mm512_set1_ps(alpha));
        for (int n = 0; n < vis; ++n) {
          const __m512 pn = _mm512_set1_ps(s[r][n]);
          for (int c = 0; c < NV; ++c) o_acc[c] = _mm512_fmadd_ps(pn, _mm512_load_ps(&vb[n][c * 16]), o_acc[c]);
        }
        for (int c = 0; c < NV; ++c) _mm512_store_ps(&acc[r][c * 16], o_acc[c]);
      }
    }
    store_rows(it, M, &acc[0][0], m, l);
  }

  // oneDNN's brgemm (at::native::cpublas): S = Q K^T and acc += P V with fp32 results over blocks of BN_MAX
  // keys, K and V packed as they are gathered. bf16/fp16 run on the matrix unit (AMX, VNNI pair layouts) with P
  // rounded to the pool's dtype (as torch's and vLLM's CPU flash kernels do); fp32 stays fp32 throughout. The
  // softmax itself is fp32 in every dtype.
  void run_brgemm(const Item& it) const {
    constexpr bool is_vnni = !std::is_same_v<T, float>;
    const int64_t kv0 = kv_indptr[it.seg];
    const int M = int(it.nq * group);
    // Per thread, reused: q rows, fp32 accumulators, scores, P, and the packed K^T and V blocks.
    // (64 bytes more than needed: the aligned vector loads and stores want 64-byte aligned rows.)
    thread_local std::vector<float> f32(MU_MAX_ROWS * (D + BN_MAX) + 16);
    thread_local std::vector<T> t16(MU_MAX_ROWS * (D + BN_MAX) + 2 * D * BN_MAX + 32);
    float* acc = align64(f32.data());
    float* s = acc + MU_MAX_ROWS * D;
    T* qb = align64(t16.data());
    T* pb = qb + MU_MAX_ROWS * D;
    T* kp = pb + MU_MAX_ROWS * BN_MAX;  // K^T [D, bn] (VNNI: the pair (d, d + 1) of key n at (d / 2) * 2 bn + 2 n)
    T* vp = kp + D * BN_MAX;            // V [bn, D] (VNNI: the pair (n, n + 1) of column d at (n / 2) * 2 D + 2 d)
    float m[MU_MAX_ROWS], l[MU_MAX_ROWS];
    int64_t limit[MU_MAX_ROWS];
    const int64_t max_limit = init_rows(it, M, acc, m, l, limit);
    for (int r = 0; r < M; ++r) std::memcpy(qb + r * D, q_row(it, r), D * sizeof(T));
    for (int64_t j0 = 0; j0 < max_limit; j0 += BN_MAX) {
      const int nb = int(std::min<int64_t>(BN_MAX, max_limit - j0));
      const int bn = (nb + 31) / 32 * 32;  // keys in this block, padded to whole pairs of vectors
      pack_block(kv0 + j0, nb, bn, it.head, kp, vp);
      at::native::cpublas::brgemm(M, bn, D, D, bn, bn, false, qb, kp, s, is_vnni);
      for (int r = 0; r < M; ++r) {
        const int64_t vis = std::min<int64_t>(nb, limit[r] - j0);
        float* sr = s + r * bn;
        // P where the second brgemm reads it: the 16-bit copy for the matrix unit, else in place over S.
        auto* pr = [&] { if constexpr (is_vnni) return pb + r * bn; else return sr; }();
        float alpha = 1.f;
        if (vis > 0) {
          alpha = softmax_block(sr, bn, vis, scale2, m[r], l[r], pr);
        } else {
          std::memset(pr, 0, bn * sizeof(*pr));
        }
        if (alpha != 1.f)
          for (int c = 0; c < NV; ++c)
            _mm512_store_ps(acc + r * D + c * 16,
                            _mm512_mul_ps(_mm512_load_ps(acc + r * D + c * 16), _mm512_set1_ps(alpha)));
      }
      if constexpr (is_vnni) at::native::cpublas::brgemm(M, D, bn, bn, D, D, true, pb, vp, acc, true);
      else at::native::cpublas::brgemm(M, D, bn, bn, D, D, true, s, vp, acc, false);
    }
    store_rows(it, M, acc, m, l);
  }

  // Gathers keys [first, first + nb) of the segment (slots via kv_indices) for KV head h, zero-padded to bn
  // keys: K^T and V, in the VNNI pair layouts for 16-bit pools (K^T as 32-bit pairs (d, d + 1) transposed, V
  // with keys paired by interleaving two rows), plain for fp32.
  void pack_block(int64_t first, int nb, int bn, int64_t h, T* kp, T* vp) const {
    if constexpr (std::is_same_v<T, float>) {
      for (int n = 0; n < bn; ++n) {
        const float* ks = n < nb ? k + kv_indices[first + n] * ks0 + h * ks1 : nullptr;
        const float* vs = n < nb ? v + kv_indices[first + n] * vs0 + h * vs1 : nullptr;
        for (int d = 0; d < D; ++d) kp[d * bn + n] = ks ? ks[d] : 0.f;
        if (vs) std::memcpy(vp + n * D, vs, D * sizeof(float));
        else std::memset(vp + n * D, 0, D * sizeof(float));
      }
      return;
    } else {
      // K^T: 16 keys at a time, their rows of D / 2 (d, d + 1) pairs transposed in registers 16 pairs at a time.
      uint32_t* kp32 = reinterpret_cast<uint32_t*>(kp);
      for (int n0 = 0; n0 < bn; n0 += 16) {
        const uint32_t* rows[16];
        for (int j = 0; j < 16; ++j)
          rows[j] = n0 + j < nb ? reinterpret_cast<const uint32_t*>(k + kv_indices[first + n0 + j] * ks0 + h * ks1) : nullptr;
        for (int i0 = 0; i0 < D / 2; i0 += 16) {
          const int w = std::min(16, D / 2 - i0);
          const __mmask16 take = __mmask16((1u << w) - 1u);
          __m512i r[16];
          for (int j = 0; j < 16; ++j) r[j] = rows[j] ? _mm512_maskz_loadu_epi32(take, rows[j] + i0) : _mm512_setzero_si512();
          transpose16x16(r);
          for (int i = 0; i < w; ++i) _mm512_storeu_si512(kp32 + (i0 + i) * bn + n0, r[i]);
        }
      }
      const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
      const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
      for (int n = 0; n < bn; n += 2) {
        T* out = vp + (n / 2) * 2 * D;
        const T* a = n < nb ? v + kv_indices[first + n] * vs0 + h * vs1 : nullptr;
        const T* b = n + 1 < nb ? v + kv_indices[first + n + 1] * vs0 + h * vs1 : nullptr;
        for (int d = 0; d < D; d += 32) {  // D is a multiple of 16: the last step may take 16 columns
          const int w = std::min(32, D - d);
          const __mmask32 take = w == 32 ? __mmask32(0xffffffffu) : __mmask32(0xffffu);
          const __m512i x = a ? _mm512_maskz_loadu_epi16(take, a + d) : _mm512_setzero_si512();
          const __m512i y = b ? _mm512_maskz_loadu_epi16(take, b + d) : _mm512_setzero_si512();
          _mm512_storeu_si512(out + 2 * d, _mm512_permutex2var_epi16(x, lo, y));
          if (w == 32) _mm512_storeu_si512(out + 2 * d + 32, _mm512_permutex2var_epi16(x, hi, y));
        }
      }
    }
  }
};

// Tiles of (segment, kv head, up to MAX_ROWS / group queries), spread over the threads largest first
// (each thread takes the next tile onto the least loaded thread: LPT).
std::vector<std::vector<Item>> schedule(const int64_t* q_len, const int64_t* kv_indptr, int64_t num_segments,
                                        int64_t num_kv_heads, int64_t group, bool is_causal, bool use_brgemm,
                                        int num_threads) {
  std::vector<Item> items;
  for (int64_t g = 0; g < num_segments; ++g) {
    const int64_t ql = q_len[g], kl = kv_indptr[g + 1] - kv_indptr[g];
    const bool is_mu = use_brgemm && ql * group >= MU_MIN_ROWS;
    const int64_t tq = std::max<int64_t>(1, (is_mu ? MU_MAX_ROWS : MAX_ROWS) / group);
    for (int64_t q0 = 0; q0 < ql; q0 += tq) {
      const int64_t nq = std::min(tq, ql - q0);
      const int64_t keys = is_causal ? std::clamp<int64_t>(kl - ql + q0 + nq, 0, kl) : kl;
      for (int64_t h = 0; h < num_kv_heads; ++h) items.push_back({g, h, q0, nq, keys * (nq * group + 8) + 64});
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  std::vector<std::vector<Item>> per_thread(num_threads);
  std::vector<int64_t> load(num_threads, 0);
  for (const Item& it : items) {
    const int t = int(std::min_element(load.begin(), load.end()) - load.begin());
    per_thread[t].push_back(it);
    load[t] += it.cost;
  }
  return per_thread;
}

template <typename T, int D>
void run_part(const Part<T, D>& part, const std::vector<std::vector<Item>>& work) {
  at::parallel_for(0, int64_t(work.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (const Item& it : work[t]) part.run(it);
    // The thread's brgemm state (the matrix unit's tile configuration for the 16-bit pools).
    if (part.use_brgemm) at::native::cpublas::brgemm_release(!std::is_same_v<T, float>);
  });
}

template <typename T>
void dispatch_d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& lse,
                const at::Tensor& q_start, const at::Tensor& q_len, const at::Tensor& kv_indices,
                const at::Tensor& kv_indptr, bool is_causal, bool is_merge, double sm_scale, bool use_brgemm,
                const std::vector<std::vector<Item>>& work) {
  const int64_t D = q.size(2);
  auto fill = [&](auto& p) {
    p.q = q.data_ptr<T>(); p.qs0 = q.stride(0); p.qs1 = q.stride(1);
    p.k = k.data_ptr<T>(); p.v = v.data_ptr<T>();
    p.ks0 = k.stride(0); p.ks1 = k.stride(1); p.vs0 = v.stride(0); p.vs1 = v.stride(1);
    p.o = o.data_ptr<float>(); p.lse = lse.data_ptr<float>();
    p.q_start = q_start.data_ptr<int64_t>(); p.q_len = q_len.data_ptr<int64_t>();
    p.kv_indices = kv_indices.data_ptr<int64_t>(); p.kv_indptr = kv_indptr.data_ptr<int64_t>();
    p.num_q_heads = q.size(1); p.group = q.size(1) / k.size(1);
    p.is_causal = is_causal; p.is_merge = is_merge; p.scale2 = float(sm_scale) * LOG2E;
    p.use_brgemm = use_brgemm;
  };
  switch (D) {  // head sizes of the model families batchrun runs, and the tests' small ones
    case 16: { Part<T, 16> p; fill(p); run_part(p, work); break; }
    case 32: { Part<T, 32> p; fill(p); run_part(p, work); break; }
    case 64: { Part<T, 64> p; fill(p); run_part(p, work); break; }
    case 80: { Part<T, 80> p; fill(p); run_part(p, work); break; }
    case 96: { Part<T, 96> p; fill(p); run_part(p, work); break; }
    case 128: { Part<T, 128> p; fill(p); run_part(p, work); break; }
    default: TORCH_CHECK(false, "head_dim must be 16, 32, 64, 80, 96 or 128");
  }
}

}  // namespace

// Segment g's query rows q[q_start[g] : q_start[g] + q_len[g]] attend to the slots
// kv_indices[kv_indptr[g] : kv_indptr[g + 1]] of the pool (causal: query i sees key j iff
// j <= kv_len - q_len + i). Writes o [N, Hq, D] and lse [N, Hq] (fp32, natural log) at the same rows;
// is_merge: continue the (o, lse) already there (an earlier part over other keys) instead of overwriting.
void attention_part_(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::Tensor& o,
                     at::Tensor& lse, const at::Tensor& q_start, const at::Tensor& q_len,
                     const at::Tensor& kv_indices, const at::Tensor& kv_indptr, bool is_causal, bool is_merge,
                     double sm_scale) {
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(2) == 1 && v_cache.stride(2) == 1, "unit stride in head_dim");
  TORCH_CHECK(o.is_contiguous() && lse.is_contiguous() && o.scalar_type() == at::kFloat, "o, lse: fp32 contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(), "one dtype");
  for (const at::Tensor* t : {&q_start, &q_len, &kv_indices, &kv_indptr})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1, "metadata: int64 1-D contiguous");
  const int64_t num_segments = q_len.size(0);
  TORCH_CHECK(q_start.size(0) == num_segments && kv_indptr.size(0) == num_segments + 1, "one KV range per segment");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "query heads must be a multiple of KV heads");
  const int64_t group = q.size(1) / k_cache.size(1);
  TORCH_CHECK(group <= MAX_ROWS, "GQA group too large");
  TORCH_CHECK(o.size(0) == q.size(0) && o.size(1) == q.size(1) && o.size(2) == q.size(2), "o: q's shape");
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(1), "lse: q's rows and heads");
  // fp32 takes brgemm too (AVX-512 inside oneDNN); 16-bit pools only where the matrix unit's VNNI packing is.
  const bool use_brgemm = q.scalar_type() == at::kFloat || at::native::cpublas::could_pack(q.scalar_type());
  auto work = schedule(q_len.data_ptr<int64_t>(), kv_indptr.data_ptr<int64_t>(), num_segments, k_cache.size(1),
                       group, is_causal, use_brgemm, at::get_num_threads());
  if (q.scalar_type() == at::kFloat)
    dispatch_d<float>(q, k_cache, v_cache, o, lse, q_start, q_len, kv_indices, kv_indptr, is_causal, is_merge, sm_scale, use_brgemm, work);
  else if (q.scalar_type() == at::kBFloat16)
    dispatch_d<at::BFloat16>(q, k_cache, v_cache, o, lse, q_start, q_len, kv_indices, kv_indptr, is_causal, is_merge, sm_scale, use_brgemm, work);
  else if (q.scalar_type() == at::kHalf)
    dispatch_d<at::Half>(q, k_cache, v_cache, o, lse, q_start, q_len, kv_indices, kv_indptr, is_causal, is_merge, sm_scale, use_brgemm, work);
  else TORCH_CHECK(false, "fp32, bf16 or fp16");
}
