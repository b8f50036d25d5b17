// GGUF k-quant weights (Q4_K, Q6_K) x int8 activations on AVX-512 VNNI (specdec.kernels, docs/cpu-fast-path.md).
//
// The weights are the GGUF file's own quantized values, never de-quantized to a dense copy. A super-block holds
// 256 columns of one row:
//   Q4_K: w = d * sc[j] * q - dmin * m[j]   q in 0..15, 8 sub-blocks j of 32 columns, sc and m 6-bit
//   Q6_K: w = d * sc[j] * (q - 32)          q in 0..63, 16 sub-blocks j of 16 columns, sc signed 8-bit
// Each token's activations are rounded per 256-column block, symmetric (llama.cpp's Q8_K does the same):
// a[t, k] = round(x[t, k] / s[t, b]), s[t, b] = max|x[t, block b]| / 127, and bsum[t, k/16] = sum of a over 16
// columns. Then for each row and super-block, with exact int32 sums:
//   Q4_K: y += s * (d * sum_j sc[j] * dot_j(q, a) - dmin * sum_j m[j] * bsum32_j)
//   Q6_K: y += s * d * sum_j sc[j] * (dot_j(q, a) - 32 * bsum16_j)
// VPDPBUSD multiplies the unsigned weight bytes by the signed activation bytes, 64 products per instruction.
//
// The layouts are the GGUF blocks regrouped for 16 output rows (kquant_linear.py packs them), per super-block:
//   Q4_K: qs [8 sub][4][64 B]: byte r*4+c holds column 4i+c (low nibble) and 16+4i+c (high) of sub-block j, row r;
//         sc, m [8][16] uint8; d, dmin [16] fp16.
//   Q6_K: qs [16 sub][3][64 B]: bytes 0 and 1 hold the low 4 bits of columns 4i+c for i = 0, 2 (first 64 B) and
//         1, 3 (second), bytes 2 the high 2 bits of all four at bits 2i; sc [16][16] int8; d [16] fp16.
// Both are exactly as many bytes as the GGUF blocks (Q4_K: 6-bit scales stored in bytes, 3% more).
// A token's result does not depend on which other tokens share the call.
#include "tiles.h"

namespace {

constexpr int64_t QK = 256;  // columns per super-block and per activation scale

// x [n, K] bf16 -> a [n, K] int8, s [n, K / 256], bsum [n, K / 16] int32.
void quantize_activations(const at::BFloat16* x, int64_t n, int64_t K, int8_t* a, float* s, int32_t* bsum) {
  const int64_t blocks = K / QK;
  at::parallel_for(0, n * blocks, 16, [&](int64_t i0, int64_t i1) {
    float v[QK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / blocks, b = i % blocks;
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x + t * K + b * QK);
      __m512 amax = _mm512_setzero_ps();
      for (int64_t c = 0; c < QK; c += 16) {
        const __m512 f = specdec::load_bf16x16(xr + c);
        _mm512_storeu_ps(v + c, f);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(f));
      }
      const float scale = _mm512_reduce_max_ps(amax) / 127.f;
      s[t * blocks + b] = scale;
      const __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      int8_t* out = a + t * K + b * QK;
      int32_t* sums = bsum + t * (K / 16) + b * (QK / 16);
      for (int64_t c = 0; c < QK; c += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + c), inv));  // round to nearest even
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + c), _mm512_cvtsepi32_epi8(q));
        sums[c / 16] = _mm512_reduce_add_epi32(q);
      }
    }
  });
}

struct Args {
  const int8_t* a;       // [n, K]
  const float* s;        // [n, K / 256]
  const int32_t* bsum;   // [n, K / 16]
  const uint8_t* qs;     // packed quants (layouts above)
  const uint8_t* sc;     // Q4_K: uint8 [.., 8, 16]; Q6_K: int8 [.., 16, 16]
  const uint8_t* mins;   // Q4_K: uint8 [.., 8, 16]; Q6_K: unused
  const uint16_t* d;     // fp16 [N/16, K/256, 16]
  const uint16_t* dmin;  // Q4_K: fp16 [N/16, K/256, 16]; Q6_K: unused
  const float* bias;     // [N] or null
  at::BFloat16* y;       // [n, N]
  int64_t n, K, N;
};

inline __m512 half16(const uint16_t* p) {  // 16 fp16 -> fp32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i unsigned16(const uint8_t* p) {  // 16 uint8 -> int32
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512i signed16(const uint8_t* p) {  // 16 int8 -> int32
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <int T>
void tile_q4_k(const Args& p, int64_t jb, int64_t t0, int tn) {
  const int64_t blocks = p.K / QK;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const specdec::TileRows<T> tile(p.a, p.K, t0, tn);
  const auto& rows = tile.rows;
  const auto& act = tile.act;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t sb = jb * blocks + b;
    const uint8_t* qs = p.qs + sb * 2048;
    __m512i dots[T];
    for (int t = 0; t < T; ++t) dots[t] = _mm512_setzero_si512();
    for (int j = 0; j < 8; ++j) {
      __m512i q[8];
      for (int i = 0; i < 4; ++i) {
        const __m512i v = _mm512_loadu_si512(qs + (j * 4 + i) * 64);
        q[i] = _mm512_and_si512(v, low4);
        q[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      const __m512i scale = unsigned16(p.sc + (sb * 8 + j) * 16);
      const int64_t quad = b * (QK / 4) + j * 8;
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        __m512i dot = _mm512_setzero_si512();
        for (int i = 0; i < 8; ++i) dot = _mm512_dpbusd_epi32(dot, q[i], _mm512_set1_epi32(act[t][quad + i]));
        dots[t] = _mm512_add_epi32(dots[t], _mm512_mullo_epi32(dot, scale));
      }
    }
    const __m512 d = half16(p.d + sb * 16), dmin = half16(p.dmin + sb * 16);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const int32_t* bs = p.bsum + rows[t] * (p.K / 16) + b * (QK / 16);
      __m512i msum = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        const __m512i m = unsigned16(p.mins + (sb * 8 + j) * 16);
        msum = _mm512_add_epi32(msum, _mm512_mullo_epi32(m, _mm512_set1_epi32(bs[2 * j] + bs[2 * j + 1])));
      }
      const __m512 st = _mm512_set1_ps(p.s[rows[t] * blocks + b]);
      const __m512 part =
          _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), dmin, _mm512_mul_ps(_mm512_cvtepi32_ps(dots[t]), d));
      acc[t] = _mm512_fmadd_ps(part, st, acc[t]);
    }
  }
  specdec::store_block(acc, tn, nullptr, p.bias, p.y, p.N, jb, t0);
}

template <int T>
void tile_q6_k(const Args& p, int64_t jb, int64_t t0, int tn) {
  const int64_t blocks = p.K / QK;
  const __m512i low4 = _mm512_set1_epi8(0x0F), high2 = _mm512_set1_epi8(0x30);
  const specdec::TileRows<T> tile(p.a, p.K, t0, tn);
  const auto& rows = tile.rows;
  const auto& act = tile.act;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t sb = jb * blocks + b;
    const uint8_t* qs = p.qs + sb * 3072;
    __m512i dots[T];
    for (int t = 0; t < T; ++t) dots[t] = _mm512_setzero_si512();
    for (int j = 0; j < 16; ++j) {
      const __m512i v0 = _mm512_loadu_si512(qs + j * 192), v1 = _mm512_loadu_si512(qs + j * 192 + 64);
      const __m512i h = _mm512_loadu_si512(qs + j * 192 + 128);
      __m512i q[4];
      q[0] = _mm512_or_si512(_mm512_and_si512(v0, low4), _mm512_and_si512(_mm512_slli_epi16(h, 4), high2));
      q[1] = _mm512_or_si512(_mm512_and_si512(v1, low4), _mm512_and_si512(_mm512_slli_epi16(h, 2), high2));
      q[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v0, 4), low4), _mm512_and_si512(h, high2));
      q[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v1, 4), low4),
                             _mm512_and_si512(_mm512_srli_epi16(h, 2), high2));
      const __m512i scale = signed16(p.sc + (sb * 16 + j) * 16);
      const int64_t quad = b * (QK / 4) + j * 4;
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const int32_t offset = -32 * p.bsum[rows[t] * (p.K / 16) + b * (QK / 16) + j];
        __m512i dot = _mm512_set1_epi32(offset);
        for (int i = 0; i < 4; ++i) dot = _mm512_dpbusd_epi32(dot, q[i], _mm512_set1_epi32(act[t][quad + i]));
        dots[t] = _mm512_add_epi32(dots[t], _mm512_mullo_epi32(dot, scale));
      }
    }
    const __m512 d = half16(p.d + sb * 16);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots[t]), d),
                               _mm512_set1_ps(p.s[rows[t] * blocks + b]), acc[t]);
  }
  specdec::store_block(acc, tn, nullptr, p.bias, p.y, p.N, jb, t0);
}

}  // namespace

// x [n, K] bf16 contiguous, K a multiple of 256; qtype 12 (Q4_K) or 14 (Q6_K), GGML's type ids; the packed tensors
// as kquant_linear.py makes them (N a multiple of 16); bias [N] fp32 or empty. Returns y [n, N] bf16.
torch::Tensor kquant_linear(torch::Tensor x, int64_t qtype, torch::Tensor qs, torch::Tensor sc, torch::Tensor mins,
                            torch::Tensor d, torch::Tensor dmin, torch::Tensor bias) {
  TORCH_CHECK(qtype == 12 || qtype == 14, "kquant_linear: qtype must be 12 (Q4_K) or 14 (Q6_K), got ", qtype);
  const bool q4 = qtype == 12;
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous [n, K] bf16");
  TORCH_CHECK(d.dim() == 3 && d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(2) == 16,
              "d: contiguous [N/16, K/256, 16] fp16");
  const int64_t n = x.size(0), K = x.size(1), row_blocks = d.size(0), blocks = d.size(1), N = row_blocks * 16;
  TORCH_CHECK(K == blocks * QK, "the packed weight expects K=", blocks * QK, ", x has K=", K);
  const int64_t sbs = row_blocks * blocks;
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && qs.numel() == sbs * (q4 ? 2048 : 3072),
              "qs: the packed quants of ", q4 ? "Q4_K" : "Q6_K");
  TORCH_CHECK(sc.is_contiguous() && sc.element_size() == 1 && sc.numel() == sbs * (q4 ? 8 : 16) * 16, "sc: scales");
  TORCH_CHECK(!q4 || (mins.scalar_type() == at::kByte && mins.is_contiguous() && mins.numel() == sbs * 8 * 16 &&
                      dmin.scalar_type() == at::kHalf && dmin.is_contiguous() && dmin.numel() == sbs * 16),
              "Q4_K needs mins [.., 8, 16] uint8 and dmin [N/16, K/256, 16] fp16");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N && bias.is_contiguous()),
              "bias: [N] fp32 or empty");
  auto y = torch::empty({n, N}, x.options());
  if (n == 0) return y;
  auto a = torch::empty({n, K}, torch::kInt8);
  auto s = torch::empty({n, K / QK}, torch::kFloat32);
  auto bsum = torch::empty({n, K / 16}, torch::kInt32);
  quantize_activations(x.data_ptr<at::BFloat16>(), n, K, a.data_ptr<int8_t>(), s.data_ptr<float>(),
                       bsum.data_ptr<int32_t>());
  const Args p{a.data_ptr<int8_t>(), s.data_ptr<float>(), bsum.data_ptr<int32_t>(), qs.data_ptr<uint8_t>(),
               static_cast<const uint8_t*>(sc.data_ptr()), q4 ? mins.data_ptr<uint8_t>() : nullptr,
               reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()),
               q4 ? reinterpret_cast<const uint16_t*>(dmin.data_ptr<at::Half>()) : nullptr,
               has_bias ? bias.data_ptr<float>() : nullptr, y.data_ptr<at::BFloat16>(), n, K, N};
  // T accumulators, T integer sums and the unpacked quants fit the 32 vector registers up to 8 tokens a tile.
  if (q4) {
    specdec::for_each_tile<8>(n, row_blocks, [&](auto T, int64_t jb, int64_t t0, int tn) {
      tile_q4_k<decltype(T)::value>(p, jb, t0, tn);
    });
  } else {
    specdec::for_each_tile<8>(n, row_blocks, [&](auto T, int64_t jb, int64_t t0, int tn) {
      tile_q6_k<decltype(T)::value>(p, jb, t0, tn);
    });
  }
  return y;
}
