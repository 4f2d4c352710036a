// int4 x int8 GEMM for phi3v's int4 layers (compiled with gemv.cpp; see its header).
//
// Weights: the checkpoint's asymmetric int4 groups, w = (q - 8) * scale + zero, q in 0..15, repacked by int4_pack
// into units of 64 bytes = 16 output columns x 8 inputs: byte 4c + j holds column c's q at input 8u + j in its low
// nibble and at 8u + 4 + j in its high nibble (the layout of VNNI's 4-wide u8 x s8 dot products).
// Activations: each row quantized to int8 with its own scale (x ~ a * xq, |xq| <= 127), as llama.cpp's Q8_0 does per
// block of 32. Per group g of G inputs, with D = sum xq * q and X = sum xq (both exact int32):
//   y[m][n] = a_m * sum_g ( scale[g][n] * (D - 8 X[m][g]) + zero[g][n] * X[m][g] )
// The terms (scale, zero) are stored beside each block of 16 columns in bf16 for a bf16 checkpoint (its own values:
// half the bytes of float32, 6% fewer bytes per decoded token), else in float32.
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

namespace phi3v_int4 {

using phi3v_int_rows::kWideTiles;
using phi3v_int_rows::load4;
#if defined(__AVX2__)
using phi3v_int_rows::load8;  // 8 terms (float32, or bf16 widened exactly)
#endif

constexpr int64_t kCols = 16;  // output columns per unit
constexpr int64_t kIns = 8;    // inputs per unit
constexpr int64_t kUnit = 64;  // bytes per unit
// bytes ahead on each stream of units (software prefetch): 4 KB with one block of 16 columns per task at decode
// sizes reads 1.10-1.30x faster than 1 KB with two (Zen 4, 2 threads, 1 GB of decode-shaped weights)
constexpr int64_t kPrefetch = 4096;

// (N, K/2) uint8, input 2j in the low nibble of byte j and 2j+1 in the high one -> (N/16, K/8, 64) uint8
at::Tensor pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), "int4_pack: uint8 (N, K/2) weight");
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(N % kCols == 0 && K % kIns == 0, "int4_pack: N must be a multiple of 16 and K of 8, got ", N, ", ", K);
  at::Tensor out = at::empty({N / kCols, K / kIns, kUnit}, w.options());
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / kCols, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t u = 0; u < K / kIns; ++u) {
        uint8_t* unit = dst + (nb * (K / kIns) + u) * kUnit;
        for (int64_t c = 0; c < kCols; ++c) {
          const uint8_t* row = src + (nb * kCols + c) * (K / 2);
          for (int64_t j = 0; j < 4; ++j) {
            const int64_t k_lo = u * kIns + j, k_hi = k_lo + 4;
            const uint8_t q_lo = (row[k_lo / 2] >> (4 * (k_lo % 2))) & 15;
            const uint8_t q_hi = (row[k_hi / 2] >> (4 * (k_hi % 2))) & 15;
            unit[4 * c + j] = static_cast<uint8_t>(q_lo | (q_hi << 4));
          }
        }
      }
  });
  return out;
}

inline float term(const float* p) { return *p; }
inline float term(const at::BFloat16* p) { return static_cast<float>(*p); }
#if defined(__AVX512F__)
inline __m512 terms16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 terms16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// One block of 16 * NB output columns for MR rows of x: y[m][n0 + ...]. sz: the first column block's terms,
// (K/G, 2, 16) per block = scale, zero; the next block's follow (stride_sz values).
template <int MR, int NB, typename T>
void block(const int8_t* xq, const float* a, const int32_t* X, const uint8_t* units, const T* sz, float* y,
           int64_t K, int64_t N, int64_t G, int64_t n0) {
  const int64_t groups = K / G, per_group = G / kIns, stride_nb = (K / kIns) * kUnit, stride_sz = groups * 2 * kCols;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  const __m512i low = _mm512_set1_epi8(15);
  __m512 facc[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b) facc[m][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i iacc[MR][NB];
    for (int m = 0; m < MR; ++m)
      for (int b = 0; b < NB; ++b) iacc[m][b] = _mm512_setzero_si512();
    for (int64_t u = g * per_group; u < (g + 1) * per_group; ++u) {
      __m512i lo[NB], hi[NB];
      for (int b = 0; b < NB; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(units + b * stride_nb + u * kUnit) + kPrefetch, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(units + b * stride_nb + u * kUnit);
        lo[b] = _mm512_and_si512(v, low);
        hi[b] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      }
      for (int m = 0; m < MR; ++m) {
        const __m512i x0 = _mm512_set1_epi32(load4(xq + m * K + u * kIns));
        const __m512i x1 = _mm512_set1_epi32(load4(xq + m * K + u * kIns + 4));
        for (int b = 0; b < NB; ++b) {
          iacc[m][b] = _mm512_dpbusd_epi32(iacc[m][b], lo[b], x0);
          iacc[m][b] = _mm512_dpbusd_epi32(iacc[m][b], hi[b], x1);
        }
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512 s = terms16(sz + b * stride_sz + g * 2 * kCols);
      const __m512 zz = terms16(sz + b * stride_sz + g * 2 * kCols + kCols);
      for (int m = 0; m < MR; ++m) {
        const __m512i d = _mm512_sub_epi32(iacc[m][b], _mm512_set1_epi32(8 * X[m * groups + g]));  // exact
        facc[m][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, facc[m][b]);
        facc[m][b] = _mm512_fmadd_ps(_mm512_set1_ps(static_cast<float>(X[m * groups + g])), zz, facc[m][b]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < NB; ++b)
      _mm512_storeu_ps(y + m * N + n0 + b * kCols, _mm512_mul_ps(facc[m][b], _mm512_set1_ps(a[m])));
#elif defined(__AVX2__)
  // two halves of 8 columns per unit; u8 x s8 pairs through maddubs (no saturation: 2 * 15 * 127 < 32767)
  const __m256i low = _mm256_set1_epi8(15);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[MR][2 * NB];
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < 2 * NB; ++b) facc[m][b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i iacc[MR][2 * NB];
    for (int m = 0; m < MR; ++m)
      for (int b = 0; b < 2 * NB; ++b) iacc[m][b] = _mm256_setzero_si256();
    for (int64_t u = g * per_group; u < (g + 1) * per_group; ++u) {
      __m256i lo[2 * NB], hi[2 * NB];
      for (int b = 0; b < NB; ++b)
        _mm_prefetch(reinterpret_cast<const char*>(units + b * stride_nb + u * kUnit) + kPrefetch, _MM_HINT_T0);
      for (int b = 0; b < 2 * NB; ++b) {
        const __m256i v = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(units + (b / 2) * stride_nb + u * kUnit + (b % 2) * 32));
        lo[b] = _mm256_and_si256(v, low);
        hi[b] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      }
      for (int m = 0; m < MR; ++m) {
        const __m256i x0 = _mm256_set1_epi32(load4(xq + m * K + u * kIns));
        const __m256i x1 = _mm256_set1_epi32(load4(xq + m * K + u * kIns + 4));
        for (int b = 0; b < 2 * NB; ++b) {
#if defined(__AVXVNNI__)
          iacc[m][b] = _mm256_dpbusd_avx_epi32(iacc[m][b], lo[b], x0);
          iacc[m][b] = _mm256_dpbusd_avx_epi32(iacc[m][b], hi[b], x1);
#else
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[b], x0), _mm256_maddubs_epi16(hi[b], x1));
          iacc[m][b] = _mm256_add_epi32(iacc[m][b], _mm256_madd_epi16(p, ones));
#endif
        }
      }
    }
    for (int b = 0; b < 2 * NB; ++b) {
      const T* t = sz + (b / 2) * stride_sz + g * 2 * kCols + (b % 2) * 8;
      const __m256 s = load8(t);
      const __m256 zz = load8(t + kCols);
      for (int m = 0; m < MR; ++m) {
        const __m256i d = _mm256_sub_epi32(iacc[m][b], _mm256_set1_epi32(8 * X[m * groups + g]));  // exact
        facc[m][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, facc[m][b]);
        facc[m][b] = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(X[m * groups + g])), zz, facc[m][b]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int b = 0; b < 2 * NB; ++b)
      _mm256_storeu_ps(y + m * N + n0 + b * 8, _mm256_mul_ps(facc[m][b], _mm256_set1_ps(a[m])));
#else
  for (int m = 0; m < MR; ++m)
    for (int64_t c = 0; c < kCols * NB; ++c) {
      const uint8_t* col_units = units + (c / kCols) * stride_nb;
      const int64_t cc = c % kCols;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t d = 0;
        for (int64_t u = g * per_group; u < (g + 1) * per_group; ++u)
          for (int64_t j = 0; j < 4; ++j) {
            const uint8_t byte = col_units[u * kUnit + 4 * cc + j];
            d += (byte & 15) * xq[m * K + u * kIns + j] + (byte >> 4) * xq[m * K + u * kIns + 4 + j];
          }
        const T* t = sz + (c / kCols) * stride_sz + g * 2 * kCols + cc;
        const int32_t xg = X[m * groups + g];
        acc += term(t) * static_cast<float>(d - 8 * xg) + term(t + kCols) * static_cast<float>(xg);
      }
      y[m * N + n0 + c] = acc * a[m];
    }
#endif
}

template <int NB, typename T>
void columns(const int8_t* xq, const float* a, const int32_t* X, const uint8_t* units, const T* sz, float* y,
             int64_t M, int64_t K, int64_t N, int64_t G, int64_t n0) {
  const int64_t groups = K / G;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    block<4, NB>(xq + m * K, a + m, X + m * groups, units, sz, y + m * N, K, N, G, n0);
  switch (M - m) {
    case 3: block<3, NB>(xq + m * K, a + m, X + m * groups, units, sz, y + m * N, K, N, G, n0); break;
    case 2: block<2, NB>(xq + m * K, a + m, X + m * groups, units, sz, y + m * N, K, N, G, n0); break;
    case 1: block<1, NB>(xq + m * K, a + m, X + m * groups, units, sz, y + m * N, K, N, G, n0); break;
    default: break;
  }
}

template <typename T>
void run(const int8_t* xqp, const float* ap, const int32_t* Xp, const uint8_t* wp, const T* szp, float* yp, int64_t M,
         int64_t K, int64_t N, int64_t G) {
  const int64_t stride_nb = (K / kIns) * kUnit;
  // tasks of two blocks of 16 columns on AVX-512 (x's loads shared), or of one for a few rows (decode: one stream of
  // units per task streams faster, see kPrefetch) and on AVX2, whose 16 registers hold fewer accumulators (at one
  // block 1.03-1.12x at 8-773 rows on Zen 3)
  phi3v_int_rows::column_tasks(N / kCols, M > 4 && kWideTiles ? 2 : 1, [&](int64_t b0, int64_t nb) {
    const uint8_t* units = wp + b0 * stride_nb;
    const T* terms = szp + b0 * (K / G) * 2 * kCols;
    if (nb == 2)
      columns<2>(xqp, ap, Xp, units, terms, yp, M, K, N, G, b0 * kCols);
    else
      columns<1>(xqp, ap, Xp, units, terms, yp, M, K, N, G, b0 * kCols);
  });
}

// x (M, K) float32 or bf16, packed (N/16, K/8, 64) uint8, sz (N/16, K/G, 2, 16) bf16 or float32 -> y (M, N) float32
at::Tensor matmul(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& sz, int64_t G) {
  TORCH_CHECK(x_in.dim() == 2 && packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_matmul: x (M, K) and the weight packed by int4_pack");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = packed.size(0) * kCols;
  TORCH_CHECK(packed.size(1) * kIns == K, "int4_matmul: x has ", K, " features, the weight ", packed.size(1) * kIns);
  TORCH_CHECK(G % kIns == 0 && K % G == 0, "int4_matmul: group size ", G, " must divide K and be a multiple of 8");
  TORCH_CHECK((sz.scalar_type() == at::kFloat || sz.scalar_type() == at::kBFloat16) && sz.is_contiguous() &&
                  sz.dim() == 4 && sz.size(0) == N / kCols && sz.size(1) == K / G && sz.size(2) == 2 &&
                  sz.size(3) == kCols,
              "int4_matmul: sz must be bf16 or float32 (N/16, K/G, 2, 16)");
  at::Tensor xq, a, X;
  phi3v_int_rows::quantize(x_in, G, xq, a, X);
  at::Tensor y = at::empty({M, N}, a.options());
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float* ap = a.data_ptr<float>();
  const int32_t* Xp = X.data_ptr<int32_t>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (sz.scalar_type() == at::kBFloat16)
    run(xqp, ap, Xp, wp, sz.data_ptr<at::BFloat16>(), yp, M, K, N, G);
  else
    run(xqp, ap, Xp, wp, sz.data_ptr<float>(), yp, M, K, N, G);
  return y;
}

}  // namespace phi3v_int4

#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(phi3v_native, m) {
  m.def("int4_pack(Tensor w) -> Tensor", &phi3v_int4::pack);
  m.def("int4_matmul(Tensor x, Tensor packed, Tensor sz, int group) -> Tensor");
}

// a CPU kernel (not a composite one) so that torch.compile can trace it through its fake (quant/native.py)
TORCH_LIBRARY_IMPL(phi3v_native, CPU, m) {
  m.impl("int4_matmul", &phi3v_int4::matmul);
}
