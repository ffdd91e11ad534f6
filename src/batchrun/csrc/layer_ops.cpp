// batchrun's fused CPU layer ops: the elementwise work of a decoder layer in one pass each, read and written in
// the model's dtype (fp32, bf16 or fp16) with fp32 arithmetic and one rounding per output, as torch's own
// kernels round it: rms_norm (with the residual add before it), RoPE in place, and silu(gate) * up.
// torch runs each of these as 3-7 kernels, several of them on AVX2 in the 16-bit dtypes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "vec.h"
#include <immintrin.h>
#include <cmath>
#include <cstdint>

namespace {

using batchrun_cpu::load16;
using batchrun_cpu::store16;

// e^x for fp32 lanes, within 2 ulp (range reduction by ln 2 in two parts, a degree-6 polynomial).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Rows of `width` elements (a multiple of 16), row r at base + r * stride.
template <typename T>
struct Rows {
  T* base; int64_t stride;
  T* operator[](int64_t r) const { return base + r * stride; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) { return {t.data_ptr<T>(), t.stride(0)}; }

// out = x * rsqrt(mean(x^2) + eps) * w in fp32, rounded once; with `delta`, x = residual + delta first, rounded
// to the dtype and written back to the residual (torch's in-place add), then normalised.
template <typename T>
void rms_norm_rows(Rows<T> residual, const T* delta_base, int64_t delta_stride, Rows<T> out, const T* w,
                   int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* x = residual[r];
      if (delta_base != nullptr) {
        const T* d = delta_base + r * delta_stride;
        for (int64_t c = 0; c < width; c += 16) store16(x + c, _mm512_add_ps(load16(x + c), load16(d + c)));
      }
      __m512 acc = _mm512_setzero_ps();
      for (int64_t c = 0; c < width; c += 16) {
        const __m512 v = load16(x + c);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));  // squares rounded, as torch's pow(2) then sum
      }
      const float mean = _mm512_reduce_add_ps(acc) / float(width);
      const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(mean + eps));
      T* y = out[r];
      for (int64_t c = 0; c < width; c += 16)
        store16(y + c, _mm512_mul_ps(_mm512_mul_ps(load16(x + c), rstd), load16(w + c)));
    }
  });
}

// x [N, H, D] in place: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) per head, cos/sin [N, D] rows (the
// signed sin of batchrun.model.llama.rope_tables). Products and the sum are rounded in fp32 as torch's
// x * cos + rotate_half(x) * sin is (no fused multiply-add), then once to the dtype.
template <typename T>
void rope_rows(T* x, int64_t xs0, int64_t xs1, const T* cos, int64_t cs0, const T* sin, int64_t ss0,
               int64_t rows, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* c_row = cos + r * cs0;
      const T* s_row = sin + r * ss0;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + r * xs0 + h * xs1;
        for (int64_t c = 0; c < half; c += 16) {
          const __m512 x1 = load16(v + c), x2 = load16(v + half + c);
          const __m512 y1 = _mm512_add_ps(_mm512_mul_ps(x1, load16(c_row + c)), _mm512_mul_ps(x2, load16(s_row + c)));
          const __m512 y2 = _mm512_add_ps(_mm512_mul_ps(x2, load16(c_row + half + c)),
                                          _mm512_mul_ps(x1, load16(s_row + half + c)));
          store16(v + c, y1);
          store16(v + half + c, y2);
        }
      }
    }
  });
}

// out [N, I] = silu(gate) * up, gate_up [N, 2I] rows (gate | up); silu(g) = g / (1 + e^-g) in fp32.
template <typename T>
void silu_mul_rows(Rows<const T> gate_up, Rows<T> out, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gate_up[r];
      const T* u = g + width;
      T* y = out[r];
      for (int64_t c = 0; c < width; c += 16) {
        const __m512 gv = load16(g + c);
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv)));
        // 1 / den: the 14-bit estimate and one Newton step (within 1 ulp; a division costs 8x more here).
        __m512 inv = _mm512_rcp14_ps(den);
        inv = _mm512_mul_ps(inv, _mm512_fnmadd_ps(den, inv, _mm512_set1_ps(2.f)));
        store16(y + c, _mm512_mul_ps(_mm512_mul_ps(gv, inv), load16(u + c)));
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": 2-D with unit stride in the last dim");
  TORCH_CHECK(t.size(1) % 16 == 0, name, ": the last dim must be a multiple of 16");
}

template <typename F>
void by_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "fp32, bf16 or fp16");
  }
}

}  // namespace

// hidden [N, H] (unit stride in H); delta [N, H] or None; weight [H]. With delta: hidden += delta in place.
// Returns rms_norm(hidden) * weight as a new [N, H] tensor in hidden's dtype.
at::Tensor add_rms_norm_(at::Tensor& hidden, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                         double eps) {
  check_rows(hidden, "hidden");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == hidden.size(1), "weight: [H] contiguous");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight: hidden's dtype");
  if (delta.has_value()) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == hidden.sizes() && delta->scalar_type() == hidden.scalar_type(), "delta: hidden's shape and dtype");
  }
  at::Tensor out = at::empty(hidden.sizes(), hidden.options());
  by_dtype(hidden.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    const T* d = delta.has_value() ? delta->data_ptr<T>() : nullptr;
    rms_norm_rows<T>(rows_of<T>(hidden), d, delta.has_value() ? delta->stride(0) : 0, rows_of<T>(out),
                     weight.data_ptr<T>(), hidden.size(0), hidden.size(1), float(eps));
  });
  return out;
}

// x [N, heads, D] (unit stride in D, D a multiple of 32) rotated in place by cos/sin [N, D] of x's dtype.
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 32 == 0, "x: [N, heads, D], D a multiple of 32");
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 2 && t->stride(1) == 1 && t->size(0) == x.size(0) && t->size(1) == x.size(2), "cos/sin: [N, D]");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "cos/sin: x's dtype");
  }
  by_dtype(x.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    rope_rows<T>(x.data_ptr<T>(), x.stride(0), x.stride(1), cos.data_ptr<T>(), cos.stride(0), sin.data_ptr<T>(),
                 sin.stride(0), x.size(0), x.size(1), x.size(2));
  });
}

// gate_up [N, 2I] (gate | up) -> [N, I] = silu(gate) * up.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 32 == 0, "gate_up: 2I, I a multiple of 16");
  const int64_t width = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), width}, gate_up.options());
  by_dtype(gate_up.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    silu_mul_rows<T>({gate_up.data_ptr<T>(), gate_up.stride(0)}, rows_of<T>(out), gate_up.size(0), width);
  });
  return out;
}
