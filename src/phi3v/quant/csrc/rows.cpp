// The per-row scaling around fbgemm's int8 GEMM (quant/cpu_int8.py), one pass over the rows each way instead of
// PyTorch's float(), abs(), amax(), mul() and mul_(), to() (compiled with gemv.cpp; see its header).
//
// scale_rows_in(x, top) -> (z, amax): x (M, K) float32 or bf16; z (M + 1, K) float32 with row m = x[m] * top / amax[m]
//   (within [-top, top]) and a last row [-1, 1, 0, ...] that pins fbgemm's range to [-1, 1]; amax (M) the rows'
//   largest magnitudes (the smallest normal float where a row is zero).
// scale_rows_out(y, factor, dtype) -> y[:M] * factor[:, None] as dtype, M = factor's length.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace phi3v_rows {

inline float load_value(const float* p) { return *p; }
inline float load_value(const at::BFloat16* p) { return static_cast<float>(*p); }

// The SIMD primitives of one target: a vector of float32 lanes, a row's values loaded (bf16 widened) into one,
// store, magnitude, max and the largest lane.
#if defined(__AVX512F__)
using Vec = __m512;
constexpr int64_t kLanes = 16;
inline Vec loadv(const float* p) { return _mm512_loadu_ps(p); }
inline Vec loadv(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline Vec vzero() { return _mm512_setzero_ps(); }
inline void storev(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vabs(Vec v) { return _mm512_abs_ps(v); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__)
using Vec = __m256;
constexpr int64_t kLanes = 8;
inline Vec loadv(const float* p) { return _mm256_loadu_ps(p); }
inline Vec loadv(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec vzero() { return _mm256_setzero_ps(); }
inline void storev(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vabs(Vec v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline float hmax(Vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
#endif

template <typename T>
void rows_in(const T* x, float* z, float* amax, int64_t M, int64_t K, double top) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* r = x + m * K;
      float* out = z + m * K;
      int64_t k = 0;
      float a = 0.f;
#if defined(__AVX512F__) || defined(__AVX2__)
      Vec va = vzero();
      for (; k + kLanes <= K; k += kLanes) {
        const Vec v = loadv(r + k);
        storev(out + k, v);  // the row as float32; scaled in place below, while it is in L1
        va = vmax(va, vabs(v));
      }
      a = hmax(va);
#endif
      for (int64_t t = k; t < K; ++t) {
        out[t] = load_value(r + t);
        a = std::max(a, std::fabs(out[t]));
      }
      a = std::max(a, std::numeric_limits<float>::min());
      amax[m] = a;
      const float s = static_cast<float>(top / a);
      for (int64_t t = 0; t < K; ++t) out[t] *= s;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> scale_rows_in(const at::Tensor& x_in, double top) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) >= 2, "scale_rows_in: x (M, K) with K >= 2");
  const at::Tensor x = x_in.scalar_type() == at::kBFloat16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor z = at::empty({M + 1, K}, x.options().dtype(at::kFloat));
  at::Tensor amax = at::empty({M}, x.options().dtype(at::kFloat));
  if (x.scalar_type() == at::kBFloat16)
    rows_in(x.data_ptr<at::BFloat16>(), z.data_ptr<float>(), amax.data_ptr<float>(), M, K, top);
  else
    rows_in(x.data_ptr<float>(), z.data_ptr<float>(), amax.data_ptr<float>(), M, K, top);
  float* pin = z.data_ptr<float>() + M * K;
  std::fill(pin, pin + K, 0.f);
  pin[0] = -1.f;
  pin[1] = 1.f;
  return {z, amax};
}

template <typename T>
void rows_out(const float* y, const float* f, T* out, int64_t M, int64_t N) {
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * N + n] = static_cast<T>(y[m * N + n] * f[m]);
  });
}

at::Tensor scale_rows_out(const at::Tensor& y, const at::Tensor& factor, at::ScalarType dtype) {
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == at::kFloat && y.is_contiguous(), "scale_rows_out: float32 (M', N)");
  TORCH_CHECK(factor.dim() == 1 && factor.scalar_type() == at::kFloat && factor.is_contiguous() &&
                  factor.size(0) <= y.size(0),
              "scale_rows_out: float32 factor (M) with M <= y's rows");
  const int64_t M = factor.size(0), N = y.size(1);
  at::Tensor out = at::empty({M, N}, y.options().dtype(dtype));
  if (dtype == at::kBFloat16)
    rows_out(y.data_ptr<float>(), factor.data_ptr<float>(), out.data_ptr<at::BFloat16>(), M, N);
  else if (dtype == at::kHalf)
    rows_out(y.data_ptr<float>(), factor.data_ptr<float>(), out.data_ptr<at::Half>(), M, N);
  else if (dtype == at::kFloat)
    rows_out(y.data_ptr<float>(), factor.data_ptr<float>(), out.data_ptr<float>(), M, N);
  else
    TORCH_CHECK(false, "scale_rows_out: dtype must be float32, bfloat16 or float16");
  return out;
}

}  // namespace phi3v_rows

TORCH_LIBRARY_FRAGMENT(phi3v_native, m) {
  m.def("scale_rows_in(Tensor x, float top) -> (Tensor, Tensor)", &phi3v_rows::scale_rows_in);
  m.def("scale_rows_out(Tensor y, Tensor factor, ScalarType dtype) -> Tensor", &phi3v_rows::scale_rows_out);
}
