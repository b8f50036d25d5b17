// Attention of a few bf16 queries over a KV cache, batch-invariant (specdec.attention, docs/cpu-fast-path.md).
//
// Each (batch, query, head) is computed alone, in an order fixed by the keys it may see and nothing else:
//   1. the keys it may attend, in cache order (masked keys are skipped, never added as exp(-inf));
//   2. a score per key: the dot product of query and key, 32 bf16 pairs at a time (VDPBF16PS, exact products,
//      fp32 sums in lane order), the 16 lanes summed in one fixed tree, times the scale (plus an additive mask);
//   3. softmax in fp32: the maximum, exp(score - max) per key (one vectorised exp, the same for every lane),
//      their sum in 16 lanes over the list of attended keys, then one fixed tree;
//   4. the output, sum over the attended keys in order of p * value, in fp32, rounded to bf16 once.
// So a query's output is bit-identical whether it is verified with 31 other tree tokens or decoded alone over the
// same cache, and whatever the number of keys it does not see. The query heads that share a key/value head are
// computed together (each key and value is converted once for all of them); work is split over (batch, key/value
// head, query), never inside one query's sums.
#include "tiles.h"

#include <cmath>
#include <vector>

namespace {

// exp(x) for x <= 0 (scores minus their maximum), about 1 ulp: 2^n * p(r), r = x - n ln2, degree-6 polynomial.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));  // below: exp underflows to (nearly) 0 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Which keys query ``qi`` may attend, in cache order, and the additive mask value of each (0 for bool masks).
void attended_keys(const torch::Tensor& mask, int64_t mb, int64_t qi, int64_t nq, int64_t nk,
                   std::vector<int32_t>& idx, std::vector<float>& add) {
  idx.clear();
  add.clear();
  if (!mask.defined() || mask.numel() == 0) {  // causal: the cache and the queries up to this one
    const int64_t last = nk - nq + qi;
    for (int64_t j = 0; j <= last; ++j) idx.push_back(static_cast<int32_t>(j));
    add.assign(idx.size(), 0.f);
    return;
  }
  if (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte) {
    const uint8_t* row = static_cast<const uint8_t*>(mask.data_ptr()) + (mb * nq + qi) * nk;
    for (int64_t j = 0; j < nk; ++j)
      if (row[j]) idx.push_back(static_cast<int32_t>(j));
    add.assign(idx.size(), 0.f);
    return;
  }
  const float* row = mask.data_ptr<float>() + (mb * nq + qi) * nk;
  for (int64_t j = 0; j < nk; ++j)
    if (row[j] > -1e30f) {  // -inf or the dtype's minimum: not attended
      idx.push_back(static_cast<int32_t>(j));
      add.push_back(row[j]);
    }
}

}  // namespace

// q [B, H, nq, D] bf16 contiguous, k and v [B, KVH, nk, D] bf16 with contiguous [nk, D] rows per head (a slice of
// a longer preallocated cache is fine); mask empty (causal, the queries last), or bool / uint8
// [Bm, nq, nk] (true = may attend) or fp32 [Bm, nq, nk] additive (<= -1e30 = masked), Bm 1 or B. Returns the
// output [B, nq, H, D] bf16 (the layout transformers' attention functions return).
torch::Tensor cached_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "cached_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && q.is_contiguous(), "cached_attention: contiguous bf16 q");
  for (const auto* t : {&k, &v})  // rows of one head contiguous; heads and batches may lie further apart (a cache
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->stride(3) == 1 && t->stride(2) == t->size(3) &&  // slice)
                    t->stride(1) >= t->size(2) * t->size(3) && t->stride(0) >= t->size(1) * t->stride(1),
                "cached_attention: bf16 k, v with contiguous rows per head");
  TORCH_CHECK(k.strides() == v.strides(), "cached_attention: k and v with the same strides");
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), D = q.size(3);
  const int64_t KVH = k.size(1), nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D && H % KVH == 0 && nk >= nq,
              "cached_attention: k, v [B, KVH, nk >= nq, D] with KVH dividing H");
  TORCH_CHECK(D <= 512, "cached_attention: head_dim up to 512");
  int64_t Bm = 1;
  if (mask.defined() && mask.numel() > 0) {
    TORCH_CHECK(mask.dim() == 3 && mask.size(1) == nq && mask.size(2) == nk && mask.is_contiguous() &&
                    (mask.size(0) == 1 || mask.size(0) == B),
                "cached_attention: mask [1 or B, nq, nk] contiguous");
    TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte ||
                    mask.scalar_type() == at::kFloat,
                "cached_attention: bool, uint8 or fp32 mask");
    Bm = mask.size(0);
  }
  const int64_t G = H / KVH;
  auto out = torch::empty({B, nq, H, D}, q.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t chunks32 = (D + 31) / 32, chunks16 = (D + 15) / 16;
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * KVH * nq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> idx;
    std::vector<float> add;
    std::vector<float> p;          // [G, M] scores, then probabilities
    std::vector<__m512i> qv(G * chunks32);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / (KVH * nq), kh = (item / nq) % KVH, qi = item % nq;
      attended_keys(mask, Bm == 1 ? 0 : b, qi, nq, nk, idx, add);
      const int64_t M = static_cast<int64_t>(idx.size());
      const uint16_t* kbase = kp + b * k.stride(0) + kh * k.stride(1);
      const uint16_t* vbase = vp + b * v.stride(0) + kh * v.stride(1);
      for (int64_t g = 0; g < G; ++g) {  // the group's queries as bf16 pairs (zeros past D)
        const uint16_t* qrow = qp + ((b * H + kh * G + g) * nq + qi) * D;
        for (int64_t c = 0; c < chunks32; ++c) {
          const int64_t rest = std::min<int64_t>(32, D - c * 32);
          const __mmask32 m = rest == 32 ? 0xFFFFFFFFu : ((1u << rest) - 1);
          qv[g * chunks32 + c] = _mm512_maskz_loadu_epi16(m, qrow + c * 32);
        }
      }
      p.resize(G * M);
      // 2. scores
      for (int64_t m = 0; m < M; ++m) {
        const uint16_t* krow = kbase + static_cast<int64_t>(idx[m]) * D;
        for (int64_t g = 0; g < G; ++g) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t c = 0; c < chunks32; ++c) {
            const int64_t rest = std::min<int64_t>(32, D - c * 32);
            const __mmask32 mk = rest == 32 ? 0xFFFFFFFFu : ((1u << rest) - 1);
            const __m512i kv = _mm512_maskz_loadu_epi16(mk, krow + c * 32);
            acc = _mm512_dpbf16_ps(acc, (__m512bh)kv, (__m512bh)qv[g * chunks32 + c]);
          }
          p[g * M + m] = _mm512_reduce_add_ps(acc) * sc + add[m];
        }
      }
      // 3. softmax per query head, over the attended keys in order
      for (int64_t g = 0; g < G; ++g) {
        float* s = p.data() + g * M;
        float mx = -INFINITY;
        for (int64_t m = 0; m < M; ++m) mx = std::max(mx, s[m]);
        const __m512 vmx = _mm512_set1_ps(mx);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t m = 0; m < M; m += 16) {
          const __mmask16 mk = M - m >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (M - m)) - 1);
          const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + m), vmx));
          _mm512_mask_storeu_ps(s + m, mk, e);
          sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mk, e));
        }
        const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
        for (int64_t m = 0; m < M; m += 16) {
          const __mmask16 mk = M - m >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (M - m)) - 1);
          _mm512_mask_storeu_ps(s + m, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, s + m), inv));
        }
      }
      // 4. output: per 16 columns, the attended values in order, for every head of the group
      for (int64_t c = 0; c < chunks16; ++c) {
        const int64_t rest = std::min<int64_t>(16, D - c * 16);
        const __mmask16 mk = rest == 16 ? 0xFFFF : static_cast<__mmask16>((1u << rest) - 1);
        constexpr int kMaxGroup = 16;
        for (int64_t g0 = 0; g0 < G; g0 += kMaxGroup) {
          const int64_t gn = std::min<int64_t>(kMaxGroup, G - g0);
          __m512 acc[kMaxGroup];
          for (int64_t g = 0; g < gn; ++g) acc[g] = _mm512_setzero_ps();
          for (int64_t m = 0; m < M; ++m) {
            const __m512 val = specdec::load_bf16x16(vbase + static_cast<int64_t>(idx[m]) * D + c * 16, mk);
            for (int64_t g = 0; g < gn; ++g)
              acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[(g0 + g) * M + m]), val, acc[g]);
          }
          for (int64_t g = 0; g < gn; ++g) {
            at::BFloat16* dst = op + ((b * nq + qi) * H + kh * G + g0 + g) * D + c * 16;
            _mm256_mask_storeu_epi16(dst, mk, (__m256i)_mm512_cvtneps_pbh(acc[g]));
          }
        }
      }
    }
  });
  return out;
}
