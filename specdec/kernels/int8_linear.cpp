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
#include "tiles.h"

namespace {

inline __m512bh dequant32(const int8_t* p) {
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

struct Args {
  const at::BFloat16* x;  // [n, K]
  const int8_t* w;        // [N/16, K/2, 16, 2]
  const float* scale;     // [N]
  const float* bias;      // [N] or null
  at::BFloat16* y;        // [n, N]
  int64_t n, K, N;
};

// Rows jb*16 .. jb*16+15 for the tokens t0 .. t0+tn-1 (tn <= T; unused slots repeat the last real token).
template <int T>
void tile(const Args& p, int64_t jb, int64_t t0, int tn) {
  const int64_t kpairs = p.K / 2;
  const int8_t* wb = p.w + jb * kpairs * 32;
  const specdec::TileRows<T> tile(p.x, p.K * static_cast<int64_t>(sizeof(at::BFloat16)), t0, tn);
  const auto& rows = tile.act;  // bf16 pairs
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const __m512bh w = dequant32(wb + kp * 32);
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) acc[t] = _mm512_dpbf16_ps(acc[t], w, (__m512bh)_mm512_set1_epi32(rows[t][kp]));
  }
  specdec::store_block(acc, tn, p.scale, p.bias, p.y, p.N, jb, t0);
}

// T accumulators live in the 32 vector registers: tiles of at most 24 tokens.
void run(const Args& p) {
  specdec::for_each_tile<24>(p.n, p.N / 16, [&](auto T, int64_t jb, int64_t t0, int tn) {
    tile<decltype(T)::value>(p, jb, t0, tn);
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
  run(Args{x.data_ptr<at::BFloat16>(), packed.data_ptr<int8_t>(), scale.data_ptr<float>(),
           has_bias ? bias.data_ptr<float>() : nullptr, y.data_ptr<at::BFloat16>(), n, K, N});
  return y;
}
