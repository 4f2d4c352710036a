// Fused bf16 element-wise steps of the decoders for decode sizes (compiled with gemv.cpp; see its header): each is
// one call instead of 6-9 PyTorch ops, whose dispatch costs more than their arithmetic at one token (Zen 4, 8
// layers: 1.2 ms per token in RMSNorm's ops, 2.1 ms in the rotary embedding's).
//
// rms_norm_bf16(x, w, eps): models.layers.RMSNorm for bf16 x (M, C) and weight (C): h = x in float32,
//   h * (1 / sqrt(mean(h^2) + eps)) rounded to bf16, times w rounded to bf16 (the reference's two roundings; the
//   mean's float32 sum runs in another order than PyTorch's, so a value can differ by one bf16 rounding step).
// rope_bf16(x, cos, sin): models.rope.apply_rotary for bf16 x (B, nh, T, hd) (any strides, rows of hd
//   contiguous), cos and sin (B, T, hd) bf16: x * cos + rotate_half(x) * sin with PyTorch's bf16 rounding after
//   each product and after the sum (bit for bit the same), contiguous (B, nh, T, hd).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace phi3v_fused {

inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline at::BFloat16 to_bf16(float v) { return at::BFloat16(v); }  // round to nearest even, as PyTorch's ops
inline float round_bf16(float v) { return static_cast<float>(at::BFloat16(v)); }

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.dim() == 1 &&
                  x_in.size(-1) == w.size(0),
              "rms_norm_bf16: bf16 x (..., C) and weight (C)");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor wc = w.contiguous();
  const int64_t C = w.size(0), M = x.numel() / C;
  at::Tensor y = at::empty_like(x);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = wc.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const at::BFloat16* r = xp + m * C;
      float s[8] = {};  // eight partial sums (vectorizable), added pairwise
      int64_t c = 0;
      for (; c + 8 <= C; c += 8)
        for (int j = 0; j < 8; ++j) {
          const float v = to_float(r[c + j]);
          s[j] += v * v;
        }
      for (; c < C; ++c) {
        const float v = to_float(r[c]);
        s[0] += v * v;
      }
      const float total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
      const float inv = 1.f / std::sqrt(total * (1.f / static_cast<float>(C)) + e);  // mean as sum * (1/C)
      for (int64_t k = 0; k < C; ++k)
        yp[m * C + k] = to_bf16(to_float(wp[k]) * round_bf16(to_float(r[k]) * inv));
    }
  });
  return y;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1,
              "rope_bf16: bf16 x (B, nh, T, hd) with contiguous rows");
  const int64_t B = x.size(0), nh = x.size(1), T = x.size(2), hd = x.size(3), half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && cos_in.scalar_type() == at::kBFloat16 && sin_in.scalar_type() == at::kBFloat16 &&
                  cos_in.dim() == 3 && cos_in.size(0) == B && cos_in.size(1) == T && cos_in.size(2) == hd &&
                  sin_in.sizes() == cos_in.sizes(),
              "rope_bf16: cos and sin must be bf16 (B, T, hd) for x (B, nh, T, hd), hd even");
  const at::Tensor cs = cos_in.contiguous(), sn = sin_in.contiguous();
  at::Tensor y = at::empty({B, nh, T, hd}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* cp = cs.data_ptr<at::BFloat16>();
  const at::BFloat16* sp = sn.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  at::parallel_for(0, B * nh * T, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nh * T), h = i / T % nh, t = i % T;
      const at::BFloat16* r = xp + b * s0 + h * s1 + t * s2;
      const at::BFloat16* c = cp + (b * T + t) * hd;
      const at::BFloat16* s = sp + (b * T + t) * hd;
      at::BFloat16* out = yp + i * hd;
      for (int64_t d = 0; d < hd; ++d) {
        // rotate_half: (-x2, x1); negation is exact in bf16
        const float rot = d < half ? -to_float(r[d + half]) : to_float(r[d - half]);
        out[d] = to_bf16(round_bf16(to_float(r[d]) * to_float(c[d])) + round_bf16(rot * to_float(s[d])));
      }
    }
  });
  return y;
}

}  // namespace phi3v_fused

TORCH_LIBRARY_FRAGMENT(phi3v_native, m) {
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_bf16(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

// a CPU kernel (not a composite one) so that torch.compile can trace it through its fake (quant/native.py)
TORCH_LIBRARY_IMPL(phi3v_native, CPU, m) {
  m.impl("rms_norm_bf16", &phi3v_fused::rms_norm);
  m.impl("rope_bf16", &phi3v_fused::rope);
}
