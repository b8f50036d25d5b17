// Weight-only int8 linear layer for CPUs with AVX-512 BF16 (specdec.kernels, docs/cpu-fast-path.md).
//
// y[t, j] = scale[j] * sum_k x[t, k] * q[j, k] + bias[j]   (x bf16, q int8, scale/bias fp32, y bf16)
//
// Weights are packed as [N/16, K/2, 16, 2]: one 32-byte load holds 16 output rows x one pair of input columns.
// Each such load is de-quantized once (int8 -> fp32 -> bf16, exact: |q| <= 127) and then applied to every token
// of the tile with one AVX-512 BF16 dot-product instruction, so a forward over 1 token reads the weights once
// (memory-bound, half the bytes of bf16) and a forward over 8-24 tokens de-quantizes them once, not once per token.
// Every token's result is summed in the same order whatever the tile size, so a token's output does not depend on
// how many tokens share the call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline __m512bh dequant32(const int8_t* p) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// One block of 16 output rows for the tokens rows[0..T) (T a compile-time tile; unused slots repeat a real row).
template <int T>
inline void block(const int32_t* const* rows, const int8_t* wb, int64_t kpairs, __m512 acc[T]) {
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    __m512bh w = dequant32(wb + kp * 32);
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t)
      acc[t] = _mm512_dpbf16_ps(acc[t], w, (__m512bh)_mm512_set1_epi32(rows[t][kp]));
  }
}

template <int T>
void run_tiles(const at::BFloat16* x, const int8_t* w, const float* scale, const float* bias, at::BFloat16* y,
               int64_t n, int64_t t0, int64_t t1, int64_t K, int64_t N, int64_t blocks) {
  const int64_t kpairs = K / 2;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int32_t* rows[T];
    __m512 acc[T];
    for (int64_t jb = b0; jb < b1; ++jb) {
      const int8_t* wb = w + jb * kpairs * 32;
      const __m512 sc = _mm512_loadu_ps(scale + jb * 16);
      const __m512 bi = bias ? _mm512_loadu_ps(bias + jb * 16) : _mm512_setzero_ps();
      for (int64_t s = t0; s < t1; s += T) {
        const int tn = static_cast<int>(std::min<int64_t>(T, t1 - s));
        for (int t = 0; t < T; ++t)
          rows[t] = reinterpret_cast<const int32_t*>(x + (s + std::min(t, tn - 1)) * K);
        block<T>(rows, wb, kpairs, acc);
        for (int t = 0; t < tn; ++t) {
          __m512 v = _mm512_fmadd_ps(acc[t], sc, bi);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (s + t) * N + jb * 16), (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
  });
}

}  // namespace

// x [n, K] bf16 contiguous; packed [N/16, K/2, 16, 2] int8; scale [N] fp32; bias [N] fp32 or empty.
// N % 16 == 0 and K % 2 == 0 (the Python side pads). Returns y [n, N] bf16.
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous [n, K] bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(3) == 2, "packed: contiguous [N/16, K/2, 16, 2] int8");
  const int64_t n = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * 16;
  TORCH_CHECK(packed.size(1) * 2 == K, "packed weight expects K=", packed.size(1) * 2, ", x has K=", K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(), "scale: [N] fp32");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N && bias.is_contiguous()),
              "bias: [N] fp32 or empty");
  auto y = torch::empty({n, N}, x.options());
  if (n == 0) return y;
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  auto* yp = y.data_ptr<at::BFloat16>();
  // Small calls are one tile (the smallest template that holds them); bigger ones go in tiles of 24 tokens.
  if (n == 1) run_tiles<1>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  else if (n == 2) run_tiles<2>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  else if (n <= 4) run_tiles<4>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  else if (n <= 8) run_tiles<8>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  else if (n <= 12) run_tiles<12>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  else if (n <= 16) run_tiles<16>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  else run_tiles<24>(xp, wp, sp, bp, yp, n, 0, n, K, N, blocks);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "weight-only int8 linear (AVX-512 BF16), packed [N/16, K/2, 16, 2] weights");
}
