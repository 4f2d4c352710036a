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

namespace phi3v_int_rows {

// x (M, K) float32 or bf16 -> xq (M, K) int8 with x ~ a_m * xq (127 levels over the row's largest magnitude,
// rounded to nearest even), and the sums X (M, K/G) int32 of xq over each group of G inputs (G = K: one per row)
template <typename T>
void quantize(const T* x, int64_t M, int64_t K, int64_t G, int8_t* xq, float* a, int32_t* X) {
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* r = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(r[k])));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      a[m] = amax / 127.f;
      for (int64_t g = 0; g < K / G; ++g) {
        int32_t sum = 0;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const int32_t v = static_cast<int32_t>(std::nearbyint(static_cast<float>(r[k]) * inv));
          xq[m * K + k] = static_cast<int8_t>(v);
          sum += v;
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
