// int8 x int8 GEMM for phi3v's int8 layers (compiled with gemv.cpp; see its header).
//
// Weights: the checkpoint's symmetric int8 rows (w = q * scale[n], q in -128..127), repacked by int8_pack into units
// of 64 bytes = 16 output columns x 4 inputs: byte 4c + j holds column c's q at input 4u + j (the layout of VNNI's
// 4-wide u8 x s8 dot products; one unit is one vpdpbusd on AVX-512, two on AVX2).
// Activations: each row quantized to int8 with its own scale (x ~ a * xq, |xq| <= 127), as the fbgemm path does
// (cpu_int8.matmul, 8 bits) and llama.cpp's Q8_0 per block of 32. With VNNI the weights go in as unsigned bytes
// q + 128 (an xor) and the row's sum X = sum xq takes the offset back out; plain AVX2 multiplies |q| by xq with q's
// sign (vpmaddubsw: 2 * 128 * 127 < 32767, no saturation). Either way the int32 dot product D = sum xq * q is exact:
//   y[m][n] = a_m * scale[n] * D[m][n]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "int_rows.h"

namespace phi3v_int8 {

using phi3v_int_rows::kWideTiles;
using phi3v_int_rows::load4;

constexpr int64_t kCols = 16;  // output columns per unit
constexpr int64_t kIns = 4;    // inputs per unit
constexpr int64_t kUnit = 64;  // bytes per unit
// bytes ahead on each stream of units (software prefetch): 4 KB with one block of 16 columns per task at decode
// sizes reads 1.14x faster than 1 KB with two (Zen 4, 2 threads, 1 GB of decode-shaped weights)
constexpr int64_t kPrefetch = 4096;

// int8 (N, K) -> (N/16, K/4, 64) int8
at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(), "int8_pack: int8 (N, K) weight");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kCols == 0 && K % kIns == 0, "int8_pack: N must be a multiple of 16 and K of 4, got ", N, ", ", K);
  at::Tensor out = at::empty({N / kCols, K / kIns, kUnit}, w.options());
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N / kCols, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t u = 0; u < K / kIns; ++u) {
        int8_t* unit = dst + (nb * (K / kIns) + u) * kUnit;
        for (int64_t c = 0; c < kCols; ++c) std::memcpy(unit + 4 * c, src + (nb * kCols + c) * K + u * kIns, 4);
      }
  });
  return out;
}

// (N/16, K/4, 64) int8 -> int8 (N, K)
at::Tensor unpack(const at::Tensor& p) {
  TORCH_CHECK(p.dim() == 3 && p.scalar_type() == at::kChar && p.is_contiguous() && p.size(2) == kUnit,
              "int8_unpack: the weight packed by int8_pack");
  const int64_t N = p.size(0) * kCols, K = p.size(1) * kIns;
  at::Tensor out = at::empty({N, K}, p.options());
  const int8_t* src = p.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t nb = 0; nb < N / kCols; ++nb)
    for (int64_t u = 0; u < K / kIns; ++u)
      for (int64_t c = 0; c < kCols; ++c)
        std::memcpy(dst + (nb * kCols + c) * K + u * kIns, src + (nb * (K / kIns) + u) * kUnit + 4 * c, 4);
  return out;
}

// y[m][n0 + 16 b + c] for MR rows of x and NB blocks of 16 columns (units: the first block's; the next follow at
// stride K/4 units)
template <int MR, int NB>
void block(const int8_t* xq, const float* a, const int32_t* X, const int8_t* units, const float* scale, float* y,
           int64_t K, int64_t N, int64_t n0) {
  const int64_t nu = K / kIns, stride_nb = nu * kUnit;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_setzero_si512();
  for (int64_t u = 0; u < nu; ++u) {
    __m512i w[NB];
    for (int b = 0; b < NB; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(units + b * stride_nb + u * kUnit) + kPrefetch, _MM_HINT_T0);
      w[b] = _mm512_xor_si512(_mm512_loadu_si512(units + b * stride_nb + u * kUnit), flip);  // q + 128
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_set1_epi32(load4(xq + m * K + u * kIns));
      for (int b = 0; b < NB; ++b) acc[m][b] = _mm512_dpbusd_epi32(acc[m][b], w[b], xv);
    }
  }
  for (int b = 0; b < NB; ++b) {
    const __m512 s = _mm512_loadu_ps(scale + n0 + b * kCols);
    for (int m = 0; m < MR; ++m) {
      const __m512i d = _mm512_sub_epi32(acc[m][b], _mm512_set1_epi32(128 * X[m]));
      _mm512_storeu_ps(y + m * N + n0 + b * kCols, _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(s, _mm512_set1_ps(a[m]))));
    }
  }
#elif defined(__AVX2__)
  // two halves of 8 columns per unit
  __m256i acc[MR][2 * NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < 2 * NB; ++b) acc[m][b] = _mm256_setzero_si256();
#if defined(__AVXVNNI__)
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
#else
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t u = 0; u < nu; ++u) {
    __m256i w[2 * NB];
    for (int b = 0; b < NB; ++b)
      _mm_prefetch(reinterpret_cast<const char*>(units + b * stride_nb + u * kUnit) + kPrefetch, _MM_HINT_T0);
    for (int b = 0; b < 2 * NB; ++b)
      w[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(units + (b / 2) * stride_nb + u * kUnit + (b % 2) * 32));
#if defined(__AVXVNNI__)
    for (int b = 0; b < 2 * NB; ++b) w[b] = _mm256_xor_si256(w[b], flip);
#endif
    for (int m = 0; m < MR; ++m) {
      const __m256i xv = _mm256_set1_epi32(load4(xq + m * K + u * kIns));
      for (int b = 0; b < 2 * NB; ++b) {
#if defined(__AVXVNNI__)
        acc[m][b] = _mm256_dpbusd_avx_epi32(acc[m][b], w[b], xv);
#else
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w[b], w[b]), _mm256_sign_epi8(xv, w[b]));
        acc[m][b] = _mm256_add_epi32(acc[m][b], _mm256_madd_epi16(p, ones));
#endif
      }
    }
  }
  for (int b = 0; b < 2 * NB; ++b) {
    const __m256 s = _mm256_loadu_ps(scale + n0 + b * 8);
    for (int m = 0; m < MR; ++m) {
#if defined(__AVXVNNI__)
      const __m256i d = _mm256_sub_epi32(acc[m][b], _mm256_set1_epi32(128 * X[m]));
#else
      const __m256i d = acc[m][b];
#endif
      _mm256_storeu_ps(y + m * N + n0 + b * 8, _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_set1_ps(a[m]))));
    }
  }
#else
  for (int m = 0; m < MR; ++m)
    for (int64_t c = 0; c < kCols * NB; ++c) {
      const int8_t* col_units = units + (c / kCols) * stride_nb + 4 * (c % kCols);
      int32_t d = 0;
      for (int64_t u = 0; u < nu; ++u)
        for (int64_t j = 0; j < 4; ++j) d += col_units[u * kUnit + j] * xq[m * K + u * kIns + j];
      y[m * N + n0 + c] = static_cast<float>(d) * (scale[n0 + c] * a[m]);
    }
#endif
}

template <int NB>
void columns(const int8_t* xq, const float* a, const int32_t* X, const int8_t* units, const float* scale, float* y,
             int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) block<4, NB>(xq + m * K, a + m, X + m, units, scale, y + m * N, K, N, n0);
  switch (M - m) {
    case 3: block<3, NB>(xq + m * K, a + m, X + m, units, scale, y + m * N, K, N, n0); break;
    case 2: block<2, NB>(xq + m * K, a + m, X + m, units, scale, y + m * N, K, N, n0); break;
    case 1: block<1, NB>(xq + m * K, a + m, X + m, units, scale, y + m * N, K, N, n0); break;
    default: break;
  }
}

// x (M, K) float32 or bf16, packed (N/16, K/4, 64) int8, scale (N) float32 -> y (M, N) float32
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& scale) {
  TORCH_CHECK(x_in.dim() == 2 && packed.dim() == 3 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
                  packed.size(2) == kUnit,
              "int8_matmul: x (M, K) and the weight packed by int8_pack");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed.size(0) * kCols;
  TORCH_CHECK(packed.size(1) * kIns == K, "int8_matmul: x has ", K, " features, the weight ", packed.size(1) * kIns);
  TORCH_CHECK(K <= 65536, "int8_matmul: K above 65536 could overflow the int32 sums");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 1 && scale.size(0) == N,
              "int8_matmul: scale must be float32 (N,)");
  at::Tensor xq, a, X;
  phi3v_int_rows::quantize(x_in, K, xq, a, X);
  at::Tensor y = at::empty({M, N}, a.options());
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float* ap = a.data_ptr<float>();
  const int32_t* Xp = X.data_ptr<int32_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t stride_nb = (K / kIns) * kUnit;
  // tasks of four blocks of 16 columns beside a tile of 4 rows for many rows on AVX-512 (x's loads shared), of one
  // for a few (one stream per task streams fastest, see kPrefetch) and on AVX2: a tile's accumulators are 4 x 2 * NB
  // vectors and AVX2 has 16 registers (at NB 1 none spill: 1.19-1.36x at 8-773 rows on Zen 3)
  phi3v_int_rows::column_tasks(N / kCols, M > 4 && kWideTiles ? 4 : 1, [&](int64_t b0, int64_t nb) {
    const int8_t* units = wp + b0 * stride_nb;
    if (nb == 4)
      columns<4>(xqp, ap, Xp, units, sp, yp, M, K, N, b0 * kCols);
    else
      columns<1>(xqp, ap, Xp, units, sp, yp, M, K, N, b0 * kCols);
  });
  return y;
}

}  // namespace phi3v_int8

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(phi3v_native, m) {
  m.def("int8_pack(Tensor w) -> Tensor", &phi3v_int8::pack);
  m.def("int8_unpack(Tensor packed) -> Tensor", &phi3v_int8::unpack);
  m.def("int8_matmul(Tensor x, Tensor packed, Tensor scale) -> Tensor");
}

// a CPU kernel (not a composite one) so that torch.compile can trace it through its fake (quant/native.py)
TORCH_LIBRARY_IMPL(phi3v_native, CPU, m) {
  m.impl("int8_matmul", &phi3v_int8::matmul);
}
