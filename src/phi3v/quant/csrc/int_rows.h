// What the int4 x int8 and int8 x int8 GEMMs (int4.cpp, int8.cpp) share: the rounding of each input row to int8
// (one definition, so that both round exactly alike), the 4-byte broadcast of quantized inputs and the split of the
// output columns into tasks. quant/native.py hashes this header into the build key with the sources.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace phi3v_int_rows {

#if defined(__AVX2__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // exact: a bf16 is the high half of its float32
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
#endif

// x (M, K) float32 or bf16 -> xq (M, K) int8 with x ~ a_m * xq (127 levels over the row's largest magnitude,
// rounded to nearest even), and the sums X (M, K/G) int32 of xq over each group of G inputs (G = K: one per row).
// With AVX2 8 inputs at a time, the same values as the scalar loops (which do the tails): the largest magnitude is
// exact in any order and skips NaNs as std::max does (vmaxps returns its second operand then); vcvtps2dq rounds as
// std::nearbyint (the current rounding mode, nearest even), a NaN becoming INT32_MIN as in the scalar cast; each int8
// is the low byte of its int32, as static_cast takes it.
template <typename T>
void quantize(const T* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* a, int32_t* X) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* r = x + m * K;
      float amax = 0.f;
      int64_t k = 0;
#if defined(__AVX2__)
      const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      __m256 vmax = _mm256_setzero_ps();
      for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(_mm256_and_ps(load8(r + k), magnitude), vmax);
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      for (float v : lanes) amax = std::max(amax, v);
#endif
      for (; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(r[k])));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      a[m] = amax / 127.f;
      for (int64_t g = 0; g < K / G; ++g) {
        int32_t sum = 0;
        k = g * G;
#if defined(__AVX2__)
        const __m256 vinv = _mm256_set1_ps(inv);
        // byte 0 of each int32 to bytes 0..3 of its 128-bit lane, then the two lanes' 4 bytes side by side
        const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                   0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m256i join = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
        __m256i vsum = _mm256_setzero_si256();
        for (; k + 8 <= (g + 1) * G; k += 8) {
          const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load8(r + k), vinv));
          vsum = _mm256_add_epi32(vsum, v);
          const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, low_bytes), join);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(xq + m * K + k), _mm256_castsi256_si128(bytes));
        }
        alignas(32) int32_t parts[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(parts), vsum);
        for (int32_t v : parts) sum = static_cast<int32_t>(static_cast<uint32_t>(sum) + static_cast<uint32_t>(v));
#endif
        for (; k < (g + 1) * G; ++k) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(r[k]) * inv));
          xq[m * K + k] = static_cast<int8_t>(v);
          sum = static_cast<int32_t>(static_cast<uint32_t>(sum) + static_cast<uint32_t>(v));
        }
        X[m * (K / G) + g] = sum;
      }
    }
  });
}

// quantize() for x (M, K) float32 or bf16 (others go through float32) into fresh xq, a, X tensors
inline void quantize(const at::Tensor& x_in, int64_t G, at::Tensor& xq, at::Tensor& a, at::Tensor& X) {
  const at::Tensor x = x_in.scalar_type() == at::kBFloat16 ? x_in.contiguous() : x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  xq = at::empty({M, K}, x.options().dtype(at::kChar));
  a = at::empty({M}, x.options().dtype(at::kFloat));
  X = at::empty({M, K / G}, x.options().dtype(at::kInt));
  if (x.scalar_type() == at::kBFloat16)
    quantize(x.data_ptr<at::BFloat16>(), M, K, G, xq.data_ptr<int8_t>(), a.data_ptr<float>(), X.data_ptr<int32_t>());
  else
    quantize(x.data_ptr<float>(), M, K, G, xq.data_ptr<int8_t>(), a.data_ptr<float>(), X.data_ptr<int32_t>());
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Whether tasks of several column blocks may share x's loads at many rows: on AVX-512 (32 registers) they do; AVX2's
// 16 cannot hold a tile of 4 rows x several blocks of sums without spilling, so there every task is one block
#if defined(__AVX512F__)
constexpr bool kWideTiles = true;
#else
constexpr bool kWideTiles = false;
#endif

// Tasks of `wide` consecutive blocks of output columns over the intra-op threads, the blocks left over one at a
// time: fn(first block, blocks in the task).
template <typename F>
void column_tasks(int64_t blocks, int64_t wide, const F& fn) {
  const int64_t full = blocks / wide, tasks = full + blocks % wide;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t < full)
        fn(t * wide, wide);
      else
        fn(full * wide + (t - full), int64_t{1});
    }
  });
}

}  // namespace phi3v_int_rows
