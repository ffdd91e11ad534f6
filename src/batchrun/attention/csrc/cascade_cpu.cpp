// batchrun's CPU cascade attention: one call per cascade part per layer over a page-size-1 KV slot pool, read in
// its own dtype (fp32, bf16 or fp16) with fp32 accumulation and an online softmax in base 2, causality from
// per-row key limits (no mask). The prefix parts resume the own part's (o, lse) in place, so no merge op is
// needed. Built with AVX-512 (F, BW, DQ, VL); the Python side uses it only on CPUs that have it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int BK = 16;       // keys per block (one zmm of scores)
constexpr int MAX_ROWS = 64;  // query rows (query x head in the GQA group) per tile
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 is the top half of an fp32: a shift widens it exactly
  __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

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

struct Item {
  int64_t seg, head, q0, nq;  // segment, kv head, first query of the tile (within the segment), queries
  int64_t cost;
};

template <typename T, int D>
struct Part {
  const T* q; int64_t qs0, qs1;
  const T* k; const T* v; int64_t ks0, ks1, vs0, vs1;
  float* o; float* lse;  // o [N, Hq, D] contiguous, lse [N, Hq] contiguous
  const int64_t* q_start; const int64_t* q_len; const int64_t* kv_indices; const int64_t* kv_indptr;
  int64_t num_q_heads, group;
  bool is_causal, is_merge;
  float scale2;  // sm_scale * log2(e)

  void run(const Item& it) const {
    constexpr int NV = D / 16;
    const int64_t g = it.seg, h = it.head;
    const int64_t q_len_g = q_len[g];
    const int64_t kv0 = kv_indptr[g], kv_len = kv_indptr[g + 1] - kv0;
    const int M = int(it.nq * group);
    alignas(64) float qt[MAX_ROWS][D];
    alignas(64) float acc[MAX_ROWS][D];
    alignas(64) float s[MAX_ROWS][BK];
    alignas(64) float kb[BK][D];
    alignas(64) float kt[D][BK];
    alignas(64) float vb[BK][D];
    float m[MAX_ROWS], l[MAX_ROWS];
    int64_t limit[MAX_ROWS];  // keys j < limit[r] are visible to row r
    int64_t max_limit = 0;
    for (int r = 0; r < M; ++r) {
      const int64_t qi = it.q0 + r / group, head = h * group + r % group;
      const int64_t row = q_start[g] + qi;
      const T* src = q + row * qs0 + head * qs1;
      for (int c = 0; c < NV; ++c)
        _mm512_store_ps(&qt[r][c * 16], _mm512_mul_ps(load16(src + c * 16), _mm512_set1_ps(scale2)));
      limit[r] = is_causal ? std::min(kv_len, std::max<int64_t>(kv_len - q_len_g + qi + 1, 0)) : kv_len;
      max_limit = std::max(max_limit, limit[r]);
      const float* o_row = o + (row * num_q_heads + head) * D;
      const float lse_row = is_merge ? lse[row * num_q_heads + head] : NEG_INF;
      if (lse_row == NEG_INF) {
        m[r] = NEG_INF; l[r] = 0.f;
        for (int c = 0; c < NV; ++c) _mm512_store_ps(&acc[r][c * 16], _mm512_setzero_ps());
      } else {  // continue the earlier part's state: o is normalised, so l = 1 at m = lse
        m[r] = lse_row * LOG2E; l[r] = 1.f;
        for (int c = 0; c < NV; ++c) _mm512_store_ps(&acc[r][c * 16], _mm512_loadu_ps(o_row + c * 16));
      }
    }
    const bool is_small = M < 16;
    for (int64_t j0 = 0; j0 < max_limit; j0 += BK) {
      const int nb = int(std::min<int64_t>(BK, max_limit - j0));
      // Gather this block's K and V rows from the pool, converted to fp32.
      for (int n = 0; n < nb; ++n) {
        const int64_t slot = kv_indices[kv0 + j0 + n];
        const T* ks = k + slot * ks0 + h * ks1;
        const T* vs = v + slot * vs0 + h * vs1;
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
      // Online softmax per row over this block.
      for (int r = 0; r < M; ++r) {
        const int64_t vis = std::min<int64_t>(nb, limit[r] - j0);
        if (vis <= 0) continue;
        const __mmask16 keep = __mmask16((1u << vis) - 1u);
        __m512 sr = _mm512_mask_mov_ps(_mm512_set1_ps(NEG_INF), keep, _mm512_load_ps(&s[r][0]));
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(sr));
        const float alpha = m[r] == NEG_INF ? 0.f : std::exp2(m[r] - m_new);
        __m512 p = _mm512_maskz_mov_ps(keep, exp2_ps(_mm512_sub_ps(sr, _mm512_set1_ps(m_new))));
        l[r] = l[r] * alpha + _mm512_reduce_add_ps(p);
        m[r] = m_new;
        alignas(64) float pr[BK];
        _mm512_store_ps(pr, p);
        __m512 o_acc[NV];
        for (int c = 0; c < NV; ++c) o_acc[c] = _mm512_mul_ps(_mm512_load_ps(&acc[r][c * 16]), _mm512_set1_ps(alpha));
        for (int n = 0; n < vis; ++n) {
          const __m512 pn = _mm512_set1_ps(pr[n]);
          for (int c = 0; c < NV; ++c) o_acc[c] = _mm512_fmadd_ps(pn, _mm512_load_ps(&vb[n][c * 16]), o_acc[c]);
        }
        for (int c = 0; c < NV; ++c) _mm512_store_ps(&acc[r][c * 16], o_acc[c]);
      }
    }
    for (int r = 0; r < M; ++r) {
      const int64_t qi = it.q0 + r / group, head = h * group + r % group;
      const int64_t row = q_start[g] + qi;
      float* o_row = o + (row * num_q_heads + head) * D;
      if (l[r] == 0.f) {  // saw no key: the empty state, or the earlier part's state unchanged
        if (!is_merge) {
          for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o_row + c * 16, _mm512_setzero_ps());
          lse[row * num_q_heads + head] = NEG_INF;
        }
        continue;
      }
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o_row + c * 16, _mm512_mul_ps(_mm512_load_ps(&acc[r][c * 16]), inv));
      lse[row * num_q_heads + head] = (m[r] + std::log2(l[r])) / LOG2E;
    }
  }
};

// Tiles of (segment, kv head, up to MAX_ROWS / group queries), spread over the threads largest first
// (each thread takes the next tile onto the least loaded thread: LPT).
std::vector<std::vector<Item>> schedule(const int64_t* q_len, const int64_t* kv_indptr, int64_t num_segments,
                                        int64_t num_kv_heads, int64_t group, bool is_causal, int num_threads) {
  std::vector<Item> items;
  const int64_t tq = std::max<int64_t>(1, MAX_ROWS / group);
  for (int64_t g = 0; g < num_segments; ++g) {
    const int64_t ql = q_len[g], kl = kv_indptr[g + 1] - kv_indptr[g];
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
  });
}

template <typename T>
void dispatch_d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& o, at::Tensor& lse,
                const at::Tensor& q_start, const at::Tensor& q_len, const at::Tensor& kv_indices,
                const at::Tensor& kv_indptr, bool is_causal, bool is_merge, double sm_scale,
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
  auto work = schedule(q_len.data_ptr<int64_t>(), kv_indptr.data_ptr<int64_t>(), num_segments, k_cache.size(1),
                       group, is_causal, at::get_num_threads());
  if (q.scalar_type() == at::kFloat)
    dispatch_d<float>(q, k_cache, v_cache, o, lse, q_start, q_len, kv_indices, kv_indptr, is_causal, is_merge, sm_scale, work);
  else if (q.scalar_type() == at::kBFloat16)
    dispatch_d<at::BFloat16>(q, k_cache, v_cache, o, lse, q_start, q_len, kv_indices, kv_indptr, is_causal, is_merge, sm_scale, work);
  else if (q.scalar_type() == at::kHalf)
    dispatch_d<at::Half>(q, k_cache, v_cache, o, lse, q_start, q_len, kv_indices, kv_indptr, is_causal, is_merge, sm_scale, work);
  else TORCH_CHECK(false, "fp32, bf16 or fp16");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_part_", &attention_part_, "one cascade attention part over the KV slot pool, in place");
}
