// What the CPU kernels share: the store of a 16-row block for a tile of tokens, and the walk over row blocks and
// token tiles (specdec/kernels/*.cpp).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <type_traits>

namespace specdec {

// 16 bf16 values (the first ones under ``mask``, zeros elsewhere) as fp32: a bf16 is the top half of an fp32.
inline __m512 load_bf16x16(const uint16_t* p, __mmask16 mask = 0xFFFF) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// The tokens of a tile's T slots (unused slots repeat the last real token, so a tile of tn < T tokens computes
// nothing new): each slot's row index and its activations, read 4 bytes at a time (a bf16 pair or an int8 quad,
// broadcast as one dot-product operand). ``base`` points at row 0, rows are ``row_bytes`` apart.
template <int T>
struct TileRows {
  int64_t rows[T];
  const int32_t* act[T];
  TileRows(const void* base, int64_t row_bytes, int64_t t0, int tn) {
    for (int t = 0; t < T; ++t) {
      rows[t] = t0 + std::min(t, tn - 1);
      act[t] = reinterpret_cast<const int32_t*>(static_cast<const char*>(base) + rows[t] * row_bytes);
    }
  }
};

// y[t0 + t, jb*16 .. jb*16+15] = bf16(acc[t] * scale + bias) for t < tn (scale and bias may be null: 1 and 0).
inline void store_block(const __m512* acc, int tn, const float* scale, const float* bias, at::BFloat16* y,
                        int64_t N, int64_t jb, int64_t t0) {
  const __m512 sc = scale ? _mm512_loadu_ps(scale + jb * 16) : _mm512_set1_ps(1.f);
  const __m512 bi = bias ? _mm512_loadu_ps(bias + jb * 16) : _mm512_setzero_ps();
  for (int t = 0; t < tn; ++t) {
    const __m512 v = _mm512_fmadd_ps(acc[t], sc, bi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (t0 + t) * N + jb * 16), (__m256i)_mm512_cvtneps_pbh(v));
  }
}

// Calls tile(std::integral_constant<int, T>, jb, t0, tn) for every 16-row block jb (split over torch's threads)
// and every tile of at most MaxTile tokens, T the smallest of 1, 2, 4, 8, 12, 16, 24 that holds the tile's tn
// tokens (a tile's weights are re-read from cache, not memory, by the next tile of the same block).
template <int MaxTile, typename Tile>  // MaxTile: 8, 12 or 24
void for_each_tile(int64_t n, int64_t row_blocks, Tile tile) {
  at::parallel_for(0, row_blocks, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t jb = r0; jb < r1; ++jb) {
      for (int64_t t0 = 0; t0 < n; t0 += MaxTile) {
        const int tn = static_cast<int>(std::min<int64_t>(MaxTile, n - t0));
        if (tn == 1) tile(std::integral_constant<int, 1>{}, jb, t0, tn);
        else if (tn == 2) tile(std::integral_constant<int, 2>{}, jb, t0, tn);
        else if (tn <= 4) tile(std::integral_constant<int, 4>{}, jb, t0, tn);
        else if (tn <= 8) tile(std::integral_constant<int, 8>{}, jb, t0, tn);
        else if constexpr (MaxTile > 8) {
          if (tn <= 12) tile(std::integral_constant<int, 12>{}, jb, t0, tn);
          else if constexpr (MaxTile > 12) {
            if (tn <= 16) tile(std::integral_constant<int, 16>{}, jb, t0, tn);
            else tile(std::integral_constant<int, MaxTile>{}, jb, t0, tn);
          }
        }
      }
    }
  });
}

}  // namespace specdec
