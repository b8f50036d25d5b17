// int8 weights x int8 activations for CPUs with AVX-512 VNNI (specdec.kernels, docs/cpu-fast-path.md).
//
// Each token's activations are quantized per block of 128 columns, symmetric: a[t, k] = round(x[t, k] / s[t, b])
// with s[t, b] = max|x[t, block b]| / 127 (llama.cpp does the same with 256-column Q8_K blocks). Then
//   y[t, j] = scale[j] * sum_b s[t, b] * sum_{k in b} a[t, k] * q[j, k] + bias[j]
// The inner sums are exact int32 dot products (VPDPBUSD: 64 multiply-adds per instruction, no de-quantization of
// the weights at all), so a forward over 8-12 tokens costs little more compute than the weight reads of one.
// VPDPBUSD multiplies unsigned by signed bytes: activations are stored as a + 128 and the block sums carry
// wsum[j, b] = 128 * sum_{k in b} q[j, k] to take the offset back out.
// Weights are packed [N/16, K/4, 16, 4] (16 output rows x 4 columns per 64-byte load), K padded to 128.
// A token's result does not depend on which other tokens share the call.
#include "tiles.h"

namespace {

constexpr int64_t BLOCK = 128;

// x [n, K] bf16 -> a [n, Kp] (as unsigned a + 128), s [n, Kp / BLOCK]; columns K..Kp are zero.
void quantize_activations(const at::BFloat16* x, int64_t n, int64_t K, int64_t Kp, uint8_t* a, float* s) {
  const int64_t blocks = Kp / BLOCK;
  at::parallel_for(0, n * blocks, 16, [&](int64_t i0, int64_t i1) {
    float v[BLOCK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / blocks, b = i % blocks;
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x + t * K);
      __m512 amax = _mm512_setzero_ps();
      for (int64_t c = 0; c < BLOCK; c += 16) {
        const int64_t k = b * BLOCK + c;
        const __mmask16 m = k + 16 <= K ? 0xFFFF : k < K ? static_cast<__mmask16>((1u << (K - k)) - 1) : 0;
        const __m512 f = specdec::load_bf16x16(xr + k, m);
        _mm512_storeu_ps(v + c, f);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(f));
      }
      const float scale = _mm512_reduce_max_ps(amax) / 127.f;
      s[t * blocks + b] = scale;
      const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      uint8_t* out = a + t * Kp + b * BLOCK;
      for (int64_t c = 0; c < BLOCK; c += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + c), inv));  // round to nearest even
        q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtusepi32_epi8(q));
      }
    }
  });
}

struct Args {
  const uint8_t* a;     // [n, Kp] activations + 128
  const float* s;       // [n, Kp / BLOCK] activation scales
  const int8_t* w;      // [N/16, Kp/4, 16, 4]
  const int32_t* wsum;  // [N/16, Kp/BLOCK, 16]
  const float* scale;   // [N]
  const float* bias;    // [N] or null
  at::BFloat16* y;      // [n, N]
  int64_t n, Kp, N;
};

// Rows jb*16 .. jb*16+15 for the tokens t0 .. t0+tn-1 (tn <= T; unused slots repeat the last real token).
template <int T>
void tile(const Args& p, int64_t jb, int64_t t0, int tn) {
  const int64_t quads = p.Kp / 4, blocks = p.Kp / BLOCK, per_block = BLOCK / 4;
  const int8_t* wb = p.w + jb * quads * 64;
  const int32_t* ws = p.wsum + jb * blocks * 16;
  const specdec::TileRows<T> tile(p.a, p.Kp, t0, tn);
  const auto& rows = tile.act;
  const float* row_scales[T];
  for (int t = 0; t < T; ++t) row_scales[t] = p.s + tile.rows[t] * blocks;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dot[T];
    for (int t = 0; t < T; ++t) dot[t] = _mm512_setzero_si512();
    const int8_t* wq = wb + b * per_block * 64;
    const int64_t q0 = b * per_block;
    for (int64_t q = 0; q < per_block; ++q) {
      const __m512i wv = _mm512_loadu_si512(wq + q * 64);
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) dot[t] = _mm512_dpbusd_epi32(dot[t], _mm512_set1_epi32(rows[t][q0 + q]), wv);
    }
    const __m512i offset = _mm512_loadu_si512(ws + b * 16);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[t], offset)),
                               _mm512_set1_ps(row_scales[t][b]), acc[t]);
  }
  specdec::store_block(acc, tn, p.scale, p.bias, p.y, p.N, jb, t0);
}

// 2 x T accumulators (integer and float) live in the 32 vector registers: tiles of at most 12 tokens.
void run(const Args& p) {
  specdec::for_each_tile<12>(p.n, p.N / 16, [&](auto T, int64_t jb, int64_t t0, int tn) {
    tile<decltype(T)::value>(p, jb, t0, tn);
  });
}

}  // namespace

// x [n, K] bf16 contiguous; packed [N/16, Kp/4, 16, 4] int8 (Kp = K rounded up to 128); wsum [N/16, Kp/128, 16]
// int32; scale [N] fp32; bias [N] fp32 or empty. Returns y [n, N] bf16.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor wsum, torch::Tensor scale,
                          torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous [n, K] bf16");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(3) == 4, "packed: contiguous [N/16, Kp/4, 16, 4] int8");
  const int64_t n = x.size(0), K = x.size(1), row_blocks = packed.size(0), N = row_blocks * 16;
  const int64_t Kp = packed.size(1) * 4;
  TORCH_CHECK(Kp % BLOCK == 0 && K <= Kp && Kp - K < BLOCK, "packed weight expects K <= ", Kp, ", x has K=", K);
  TORCH_CHECK(wsum.scalar_type() == at::kInt && wsum.numel() == row_blocks * (Kp / BLOCK) * 16 &&
              wsum.is_contiguous(), "wsum: [N/16, Kp/128, 16] int32");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(), "scale: [N] fp32");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N && bias.is_contiguous()),
              "bias: [N] fp32 or empty");
  auto y = torch::empty({n, N}, x.options());
  if (n == 0) return y;
  auto a = torch::empty({n, Kp}, torch::kUInt8);
  auto s = torch::empty({n, Kp / BLOCK}, torch::kFloat32);
  quantize_activations(x.data_ptr<at::BFloat16>(), n, K, Kp, a.data_ptr<uint8_t>(), s.data_ptr<float>());
  run(Args{a.data_ptr<uint8_t>(), s.data_ptr<float>(), packed.data_ptr<int8_t>(), wsum.data_ptr<int32_t>(),
           scale.data_ptr<float>(), has_bias ? bias.data_ptr<float>() : nullptr, y.data_ptr<at::BFloat16>(), n, Kp,
           N});
  return y;
}
