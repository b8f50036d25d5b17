// RMSNorm of bf16 rows for the lean draft forward (specdec/models/lean_runner.py): one call instead of the six
// small torch ops (and two dtype copies) of transformers' RMSNorm. The order of transformers' Llama / Qwen2 norm:
// normalised in fp32, rounded to bf16, times the weight, rounded again. Each row is reduced alone.
#include "tiles.h"

#include <cmath>

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "rms_norm: x contiguous [n, d] bf16");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == d && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "rms_norm: weight [d] bf16");
  auto y = torch::empty_like(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const float e = static_cast<float>(eps);
  auto rows = [&](int64_t r0, int64_t r1) {
    for (int64_t t = r0; t < r1; ++t) {
      const uint16_t* xr = xp + t * d;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; c += 16) {
        const __mmask16 m = d - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - c)) - 1);
        const __m512 v = specdec::load_bf16x16(xr + c, m);
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(d) + e));
      for (int64_t c = 0; c < d; c += 16) {
        const __mmask16 m = d - c >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (d - c)) - 1);
        const __m512 normed = _mm512_mul_ps(specdec::load_bf16x16(xr + c, m), inv);
        const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(normed);  // to bf16, as transformers rounds it
        const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
        const __m512 out = _mm512_mul_ps(back, specdec::load_bf16x16(wp + c, m));
        _mm256_mask_storeu_epi16(yp + t * d + c, m, (__m256i)_mm512_cvtneps_pbh(out));
      }
    }
  };
  if (n < 8) rows(0, n);  // a few rows: a parallel region costs more than it saves
  else at::parallel_for(0, n, 4, rows);
  return y;
}
