// Windowed block attention (CPU, bfloat16): exact local attention and sorted-window
// (routed) attention in one pass over blocks of queries, flash-style, with the products on
// oneDNN's batch-reduce GEMM micro-kernels (at::native::cpublas::brgemm, bf16 x bf16 ->
// fp32) and everything between them (mask, softmax, its gradient) in C++ on per-block
// buffers that stay in cache.
//
// Definition (the same as nn/local_attention.py and nn/sorted_window.py): over n places of a
// sequence (positions, or places in a (group, position) sorted order), query place i may
// attend key place j when
//     causal:  0 <= i - j < window        non-causal:  |i - j| < window
// and, with groups, groups[i] >= 0 and groups[j] == groups[i]; with exclude_self, i may
// attend itself only when no other key is allowed (shared q/k). A query with no key gets
// zeros. `order` (optional) maps place i to the row of q, k, v (and of the results) that
// holds it, so the caller's sort needs no gathered copies.
//
//   window_forward(q, k, v, groups, order, window, causal, exclude_self, block, ws,
//                  keep_probs, unit_eps) -> out (B, H, n, d), probs (bf16, probs_numel
//                  elements, or empty without keep_probs): each query block's
//                  probabilities, (block, kw) per (b, h, block), kw = the keys a block sees
//   window_backward(grad, q, k, v, out, probs, order, window, causal, block, ws, unit_eps)
//       -> dq, dk, dv
//   unit_eps >= 0: the keys are k's rows l2-normalised, k / max(|k|, unit_eps), rounded to
//       bf16 once (shared q/k attention passes k = q), and dk is the gradient through that
//   workspace_numel(B*H, n, d, window, causal, block): the scratch `ws` (bf16) both need;
//       the caller keeps it between calls (fresh multi-MB buffers cost their page faults)
//
// q, k, v: bf16 (B, H, n, d), any strides with a unit last one, d even. Queries go in blocks
// of `block` places; a block's keys are the blocks within the window before it (and after
// it, non-causal). The forward keeps the probabilities it multiplied V with (a block's
// (block x kw) is 5 x 32 keys per query at window 128, causal: under a tenth of what the
// ATen path keeps), so the backward neither recomputes scores nor takes an exponential,
// and needs no mask: P is zero wherever a query may not look. Pass A, per query block:
// dP = dO V^T, dS = scale P (dP - delta), dq = dS K, and P^T, dS^T written per key block
// (block x block tiles, transposed); pass B, per key block: dk = dS^T Q, dv = P^T dO. Four
// products in all, and no two threads add into one row.

// brgemm's B operand is read in the VNNI layout of bf16: element (k, j) of a (K, N) matrix
// at ((k / 2) * ldb + j) * 2 + k % 2. The packs below write K^T, V^T ("T": keys along N)
// and K, Q, V, dO ("N": keys or queries along K) that way for the whole sequence once, so
// a block's operand is a pointer and a leading dimension into them.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

using torch::Tensor;
using c10::BFloat16;

namespace {

using namespace retrolm_kernels;
namespace cpublas = at::native::cpublas;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// rows of a (B, H, n, d) tensor with a unit last stride
struct Rows {
  const BFloat16* p;
  int64_t s0, s1, s2, H;
  const BFloat16* row(int64_t bh, int64_t i) const {
    return p + (bh / H) * s0 + (bh % H) * s1 + i * s2;
  }
};

Rows rows_of(const Tensor& t) {
  return {t.data_ptr<BFloat16>(), t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

struct Geo {
  int64_t BH, n, d, c, nb, np, back, fwd, window;
  bool causal, exclude_self;
  float scale;
  const int64_t* order;   // (BH, n) row of place i, or null (place = row)
  const int64_t* groups;  // (BH, n) group of place i, or null (one group)

  int64_t src(int64_t bh, int64_t i) const { return order ? order[bh * n + i] : i; }
  int64_t key_lo(int64_t t) const { return std::max<int64_t>(0, t - back) * c; }
  int64_t key_hi(int64_t t) const { return std::min(nb, t + 1 + fwd) * c; }
  int64_t kw() const { return (back + 1 + fwd) * c; }  // keys a block sees, at most
};

Geo make_geo(const Tensor& q, const Tensor& groups, const Tensor& order, int64_t window,
             bool causal, bool exclude_self, int64_t block) {
  Geo G;
  G.BH = q.size(0) * q.size(1);
  G.n = q.size(2);
  G.d = q.size(3);
  G.c = block;
  G.nb = (G.n + block - 1) / block;
  G.np = G.nb * block;
  G.back = (window - 1 + block - 1) / block;
  G.fwd = causal ? 0 : G.back;
  G.window = window;
  G.causal = causal;
  G.exclude_self = exclude_self;
  G.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(G.d)));
  G.order = order.defined() ? order.data_ptr<int64_t>() : nullptr;
  G.groups = groups.defined() ? groups.data_ptr<int64_t>() : nullptr;
  return G;
}

void check(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.scalar_type() == at::kBFloat16 && t.stride(3) == 1,
              name, " must be a bfloat16 (B, H, n, d) tensor with a unit last stride");
}

// --- packs ------------------------------------------------------------------------------
// "T": X^T as a (d, np) B operand, [d/2][np][2] per (b, h); places >= n are zeros. Pairs of
// channels are one 32-bit word, so this is a transpose of (np, d/2) words.
// "N": X as an (np, d) B operand, [np/2][d][2] per (b, h): places 2p and 2p + 1 interleaved.
struct Pack {
  const Rows* x;
  BFloat16* out;
  bool transposed;  // "T", else "N"
};

#ifdef __AVX512F__
// 16 x 16 transpose of 32-bit words in registers: r[k] becomes column k
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#endif

void pack_t_block(const Rows& x, const Geo& G, int64_t bh, int64_t j0, BFloat16* out) {
  const int64_t half = G.d / 2, m = std::min(G.c, G.n - j0);
  const uint32_t* rows[256];  // c <= 256 places per block
  for (int64_t j = 0; j < m; j++)
    rows[j] = reinterpret_cast<const uint32_t*>(x.row(bh, G.src(bh, j0 + j)));
  uint32_t* o = reinterpret_cast<uint32_t*>(out + bh * G.d * G.np) + j0;
#ifdef __AVX512F__
  if (m == G.c && G.c % 16 == 0 && half % 16 == 0) {  // whole 16 x 16 tiles
    __m512i r[16];
    for (int64_t j = 0; j < m; j += 16)
      for (int64_t w = 0; w < half; w += 16) {
        for (int k = 0; k < 16; k++) r[k] = _mm512_loadu_si512(rows[j + k] + w);
        transpose16(r);
        for (int k = 0; k < 16; k++) _mm512_storeu_si512(o + (w + k) * G.np + j, r[k]);
      }
    return;
  }
#endif
  for (int64_t w = 0; w < half; w++) {  // one output row's c words at a time
    uint32_t* ow = o + w * G.np;
    for (int64_t j = 0; j < m; j++) ow[j] = rows[j][w];
    for (int64_t j = m; j < G.c; j++) ow[j] = 0u;
  }
}

void pack_n_block(const Rows& x, const Geo& G, int64_t bh, int64_t j0, BFloat16* out) {
  uint32_t* o = reinterpret_cast<uint32_t*>(out + bh * G.np * G.d);
  for (int64_t j = j0; j < j0 + G.c; j += 2) {
    uint32_t* dst = o + (j / 2) * G.d;  // word ch: (place j, place j + 1) at channel ch
    if (j + 1 < G.n) {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(x.row(bh, G.src(bh, j)));
      const uint16_t* r1 = reinterpret_cast<const uint16_t*>(x.row(bh, G.src(bh, j + 1)));
#pragma omp simd
      for (int64_t ch = 0; ch < G.d; ch++)
        dst[ch] = static_cast<uint32_t>(r0[ch]) | (static_cast<uint32_t>(r1[ch]) << 16);
    } else if (j < G.n) {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(x.row(bh, G.src(bh, j)));
      for (int64_t ch = 0; ch < G.d; ch++) dst[ch] = static_cast<uint32_t>(r0[ch]);
    } else {
      for (int64_t ch = 0; ch < G.d; ch++) dst[ch] = 0u;
    }
  }
}

// every pack in one parallel region (one wake-up of the threads, not one per pack)
void run_packs(const Geo& G, const std::vector<Pack>& packs) {
  at::parallel_for(0, G.BH * G.nb, 1, [=](int64_t s0, int64_t s1) {
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / G.nb, j0 = (idx % G.nb) * G.c;
      for (const Pack& p : packs) {
        if (p.transposed)
          pack_t_block(*p.x, G, bh, j0, p.out);
        else
          pack_n_block(*p.x, G, bh, j0, p.out);
      }
    }
  });
}

// a block's probabilities: block rows of kw keys; every (b, h, block) has one such tile
int64_t probs_numel(int64_t BH, int64_t n, int64_t window, bool causal, int64_t block) {
  const int64_t nb = (n + block - 1) / block, back = (window - 1 + block - 1) / block;
  return BH * nb * block * (back + 1 + (causal ? 0 : back)) * block;
}

// scratch: the forward's 2 packs of (BH, np, d), or the backward's 4 and P^T and dS^T (as
// probs, per key block); then unit keys when asked; in bf16 elements
int64_t workspace_numel(int64_t BH, int64_t n, int64_t d, int64_t window, bool causal,
                        int64_t block) {
  const int64_t np = (n + block - 1) / block * block;
  // unit keys by row and their 1 / |k| (fp32), the backward's delta per row (fp32) and its
  // gradient of the unit keys by row (fp32)
  const int64_t unit = BH * n * d + 2 * BH * n + 2 * BH * n + 2 * BH * n * d;
  return 4 * BH * np * d + 2 * probs_numel(BH, n, window, causal, block) + unit;
}

BFloat16* carve(const Tensor& ws, const Geo& G) {
  TORCH_CHECK(ws.scalar_type() == at::kBFloat16 && ws.is_contiguous() &&
                  ws.numel() >= workspace_numel(G.BH, G.n, G.d, G.window, G.causal, G.c),
              "workspace: a contiguous bf16 tensor of workspace_numel elements");
  return ws.data_ptr<BFloat16>();
}

// a block's m query rows as a brgemm A operand: in place, or gathered through `order`
const BFloat16* block_rows(const Rows& x, const Geo& G, int64_t bh, int64_t i0, int64_t m,
                           BFloat16* buf, int64_t* lda) {
  if (!G.order) {
    *lda = x.s2;
    return x.row(bh, i0);
  }
  const int64_t words = G.d / 2;  // d is even: rows of 32-bit words, copied inline (a
  for (int64_t r = 0; r < m; r++) {  // memcpy call per 128-byte row costs more than it)
    const uint32_t* src = reinterpret_cast<const uint32_t*>(x.row(bh, G.src(bh, i0 + r)));
    uint32_t* dst = reinterpret_cast<uint32_t*>(buf + r * G.d);
#pragma omp simd
    for (int64_t w = 0; w < words; w++) dst[w] = src[w];
  }
  *lda = G.d;
  return buf;
}

// --- the mask -----------------------------------------------------------------------------
// s: raw products with places [base, base + len) (the keys of one query).
// On return scale * s where the place lies in [lo, hi) and, with groups, in group gref;
// -inf elsewhere (everywhere when hi <= lo).
void band(float* s, int64_t base, int64_t len, int64_t lo, int64_t hi, const int64_t* g,
          int64_t gref, float scale) {
  lo = std::max(lo, base);
  hi = std::max(hi, lo);
  for (int64_t x = 0; x < lo - base; x++) s[x] = kNegInf;
  for (int64_t x = hi - base; x < len; x++) s[x] = kNegInf;
  float* w = s - base;  // indexed by place
  if (g) {
#pragma omp simd
    for (int64_t p = lo; p < hi; p++) w[p] = g[p] == gref ? w[p] * scale : kNegInf;
  } else {
#pragma omp simd
    for (int64_t p = lo; p < hi; p++) w[p] *= scale;
  }
}

// [*a, *z): [lo, hi) narrowed to the entries band left finite, relative to base, so the
// softmax's passes can skip the rest (a routed row's other clusters)
// (the scans step 16 entries at a time while all of them are -inf: a routed row's run of
// other clusters is long)
void span(const float* s, int64_t base, int64_t lo, int64_t hi, int64_t* a, int64_t* z) {
  const float* w = s - base;
  lo = std::max(lo, base);
  hi = std::max(hi, lo);
  for (; lo + 16 <= hi; lo += 16) {
    int none = 1;
#pragma omp simd reduction(& : none)
    for (int l = 0; l < 16; l++) none &= w[lo + l] == kNegInf;
    if (!none) break;
  }
  while (lo < hi && w[lo] == kNegInf) lo++;
  for (; hi - 16 >= lo; hi -= 16) {
    int none = 1;
#pragma omp simd reduction(& : none)
    for (int l = 0; l < 16; l++) none &= w[hi - 16 + l] == kNegInf;
    if (!none) break;
  }
  while (hi > lo && w[hi - 1] == kNegInf) hi--;
  *a = lo - base;
  *z = hi - base;
}

// max of x[0, len) (-inf when empty), in 16 lanes: gcc leaves a `reduction(max)` over
// std::max scalar, a chain of dependent maxima that cost a third of the forward
float row_max(const float* x, int64_t len) {
  float m[16];
  for (int l = 0; l < 16; l++) m[l] = kNegInf;
  int64_t j = 0;
  for (; j + 16 <= len; j += 16)
#pragma omp simd
    for (int l = 0; l < 16; l++) m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
  for (; j < len; j++) m[0] = x[j] > m[0] ? x[j] : m[0];
  float mx = kNegInf;
  for (int l = 0; l < 16; l++) mx = m[l] > mx ? m[l] : mx;
  return mx;
}

// The keys [ks, ks + nk) of query place i. Returns the row's maximum (-inf: no key).
float mask_row(const Geo& G, int64_t bh, int64_t i, int64_t ks, int64_t nk, float* s,
               int64_t* a, int64_t* z) {
  int64_t lo = std::max(ks, i - G.window + 1);
  int64_t hi = std::min({ks + nk, G.n, G.causal ? i + 1 : i + G.window});  // exclusive
  const int64_t* g = G.groups ? G.groups + bh * G.n : nullptr;
  const int64_t gi = g ? g[i] : 0;
  if (gi < 0) hi = lo;  // padding attends nothing
  band(s, ks, nk, lo, hi, g, gi, G.scale);
  float* w = s - ks;
  const bool self = G.exclude_self && i >= lo && i < hi && w[i] != kNegInf;
  const float self_v = self ? w[i] : kNegInf;
  if (self) w[i] = kNegInf;
  float mx = row_max(w + std::max(lo, ks), hi - std::max(lo, ks));
  if (self && mx == kNegInf) {  // alone: it attends itself
    w[i] = self_v;
    mx = self_v;
  }
  span(s, ks, lo, hi, a, z);
  return mx;
}

void store_row(const float* x, int64_t d, BFloat16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t ch = 0; ch < d; ch++) o[ch] = float_to_bf16_bits(x[ch]);
}

// A c x c tile of bf16, transposed: dst[j * ldd + i] = src[i * lds + j].
void transpose_tile(const BFloat16* src, int64_t lds, BFloat16* dst, int64_t ldd, int64_t c) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* o = reinterpret_cast<uint16_t*>(dst);
#ifdef __AVX512BW__
  if (c % 32 == 0) {
    // per 32 x 32 sub-tile: rows 2w and 2w + 1 interleaved into 32-bit words
    // (src[2w][j], src[2w + 1][j]), j < 16 and j >= 16, are two 16 x 16 word matrices
    // whose transposes are the output rows j
    alignas(64) static const uint16_t lo_idx[32] = {
        0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_load_si512(lo_idx);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t i0 = 0; i0 < c; i0 += 32)
      for (int64_t j0 = 0; j0 < c; j0 += 32) {
        __m512i a[16], b[16];
        for (int w = 0; w < 16; w++) {
          const __m512i r0 = _mm512_loadu_si512(s + (i0 + 2 * w) * lds + j0);
          const __m512i r1 = _mm512_loadu_si512(s + (i0 + 2 * w + 1) * lds + j0);
          a[w] = _mm512_permutex2var_epi16(r0, lo, r1);
          b[w] = _mm512_permutex2var_epi16(r0, hi, r1);
        }
        transpose16(a);
        transpose16(b);
        for (int j = 0; j < 16; j++) {
          _mm512_storeu_si512(o + (j0 + j) * ldd + i0, a[j]);
          _mm512_storeu_si512(o + (j0 + 16 + j) * ldd + i0, b[j]);
        }
      }
    return;
  }
#endif
  for (int64_t j = 0; j < c; j++)
    for (int64_t i = 0; i < c; i++) o[j * ldd + i] = s[i * lds + j];
}

// --- unit keys ----------------------------------------------------------------------------
// k's rows l2-normalised into `out` (BH, n, d) by row, as train_kernels.cpp's l2norm rounds
// them; inv: 1 / max(|k|, eps) per row, negative where the clamp took eps. Returns the rows.
Rows unit_rows(const Rows& k, const Geo& G, float eps, BFloat16* out, float* inv) {
  at::parallel_for(0, G.BH * G.n, 64, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const BFloat16* kr = k.row(r / G.n, r % G.n);
      const float iv = inv_norm(kr, G.d, eps), a = std::abs(iv);
      inv[r] = iv;
      uint16_t* o = reinterpret_cast<uint16_t*>(out + r * G.d);
#pragma omp simd
      for (int64_t ch = 0; ch < G.d; ch++) o[ch] = float_to_bf16_bits(load<float>(kr, ch) * a);
    }
  });
  return {out, G.n * G.d, 0, G.d, 1};
}

// where the workspace keeps the unit keys (BH, n, d), then their inverse norms (fp32)
BFloat16* unit_area(BFloat16* ws, const Geo& G) {
  return ws + 4 * G.BH * G.np * G.d + 2 * probs_numel(G.BH, G.n, G.window, G.causal, G.c);
}
float* unit_inv(BFloat16* unit, const Geo& G) {
  return reinterpret_cast<float*>(unit + G.BH * G.n * G.d);
}
float* delta_area(BFloat16* unit, const Geo& G) { return unit_inv(unit, G) + G.BH * G.n; }
float* unit_grad_area(BFloat16* unit, const Geo& G) { return delta_area(unit, G) + G.BH * G.n; }

// g: the gradient of one unit key, in place -> of its row k (inv as unit_rows wrote it):
// inv (g - u (g . u)) with u = k inv, or g / eps where the clamp took eps
void unit_backward(const BFloat16* k, float inv, int64_t d, float* g) {
  if (inv < 0) {
#pragma omp simd
    for (int64_t ch = 0; ch < d; ch++) g[ch] *= -inv;
    return;
  }
  float dot = 0.f;
#pragma omp simd reduction(+ : dot)
  for (int64_t ch = 0; ch < d; ch++) dot += g[ch] * load<float>(k, ch) * inv;
#pragma omp simd
  for (int64_t ch = 0; ch < d; ch++) g[ch] = inv * (g[ch] - load<float>(k, ch) * inv * dot);
}

// --- forward ------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> window_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const std::optional<Tensor>& groups_,
                                          const std::optional<Tensor>& order_, int64_t window,
                                          bool causal, bool exclude_self, int64_t block,
                                          const Tensor& ws, bool keep_probs,
                                          double unit_eps) {
  check(q, "q");
  check(k, "k");
  check(v, "v");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v: one shape");
  TORCH_CHECK(q.size(3) % 2 == 0 && block % 2 == 0 && block <= 256 && window >= 1,
              "d even, block even and <= 256, window >= 1");
  const Tensor groups = groups_.has_value() ? groups_->contiguous() : Tensor();
  const Tensor order = order_.has_value() ? order_->contiguous() : Tensor();
  const Geo G = make_geo(q, groups, order, window, causal, exclude_self, block);
  const auto opts = q.options();
  const int64_t P = G.BH * G.np * G.d;  // one pack
  BFloat16* kt = carve(ws, G);
  BFloat16* vn = kt + P;
  BFloat16* unit = unit_area(kt, G);
  const Rows Kr = unit_eps >= 0 ? unit_rows(rows_of(k), G, unit_eps, unit, unit_inv(unit, G))
                                : rows_of(k);
  const Rows Vr = rows_of(v);
  run_packs(G, {{&Kr, kt, true}, {&Vr, vn, false}});
  Tensor out = at::empty({q.size(0), q.size(1), G.n, G.d}, opts);
  Tensor probs = at::empty({keep_probs ? probs_numel(G.BH, G.n, window, causal, block) : 0},
                           opts);
  const Rows Q = rows_of(q);
  const BFloat16* KT = kt;
  const BFloat16* VN = vn;
  BFloat16* O = out.data_ptr<BFloat16>();
  BFloat16* PR = keep_probs ? probs.data_ptr<BFloat16>() : nullptr;
  const int64_t c = G.c, d = G.d, kwm = G.kw();
  at::parallel_for(0, G.BH * G.nb, 1, [=](int64_t s0, int64_t s1) {
    std::vector<float> S(c * kwm), acc(c * d);
    std::vector<BFloat16> Pbuf(PR ? 0 : c * kwm), abuf(c * d);
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / G.nb, t = idx % G.nb, i0 = t * c;
      const int64_t m = std::min(c, G.n - i0), ks = G.key_lo(t), nk = G.key_hi(t) - ks;
      BFloat16* Pt = PR ? PR + idx * c * kwm : Pbuf.data();  // (c, kwm), rows >= m zero
      int64_t lda;
      const BFloat16* a = block_rows(Q, G, bh, i0, m, abuf.data(), &lda);
      cpublas::brgemm(m, nk, d, lda, G.np, kwm, false, a, KT + bh * d * G.np + ks * 2,
                      S.data());
      for (int64_t r = 0; r < m; r++) {
        float* s = S.data() + r * kwm;
        uint16_t* p = reinterpret_cast<uint16_t*>(Pt + r * kwm);
        int64_t a, z;
        const float mx = mask_row(G, bh, i0 + r, ks, nk, s, &a, &z);
        // the span widened to whole 16-lane strips within the row (the -inf entries it
        // takes in give exp 0): no scalar tails in the passes below (routed rows' spans
        // are short)
        a &= ~int64_t(15);
        z = std::min(nk, (z + 15) & ~int64_t(15));
        if (mx == kNegInf) a = z = 0;  // no key: a zero row, so zeros out
        for (int64_t jj = 0; jj < a; jj++) p[jj] = 0;
        for (int64_t jj = z; jj < kwm; jj++) p[jj] = 0;
        if (mx == kNegInf) continue;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t jj = a; jj < z; jj++) {
          s[jj] = exp_f(s[jj] - mx);
          sum += s[jj];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t jj = a; jj < z; jj++) p[jj] = float_to_bf16_bits(s[jj] * inv);
      }
      if (PR && m < c) std::memset(Pt + m * kwm, 0, (c - m) * kwm * sizeof(BFloat16));
      cpublas::brgemm(m, d, nk, kwm, d, d, false, Pt, VN + bh * G.np * d + ks * d,
                      acc.data());
      for (int64_t r = 0; r < m; r++)
        store_row(acc.data() + r * d, d, O + (bh * G.n + G.src(bh, i0 + r)) * d);
    }
    cpublas::brgemm_release();
  });
  return {out, probs};
}

// --- backward -----------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> window_backward(
    const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& probs, const std::optional<Tensor>& order_, int64_t window, bool causal,
    int64_t block, const Tensor& ws, double unit_eps) {
  check(grad, "grad");
  TORCH_CHECK(grad.sizes() == q.sizes(), "grad: the shape of q");
  const Tensor order = order_.has_value() ? order_->contiguous() : Tensor();
  const Geo G = make_geo(q, Tensor(), order, window, causal, false, block);
  TORCH_CHECK(out.is_contiguous() && probs.is_contiguous() &&
                  probs.numel() == probs_numel(G.BH, G.n, window, causal, block),
              "out and probs as window_forward(keep_probs=True) returned them");
  const auto opts = q.options();
  const int64_t c = G.c, d = G.d, kwm = G.kw(), nb = G.nb, np = G.np;
  const int64_t P = G.BH * np * d;  // one pack
  BFloat16* vt = carve(ws, G);
  BFloat16 *kn = vt + P, *qn = vt + 2 * P, *gn = vt + 3 * P;
  BFloat16* PT = vt + 4 * P;  // (BH * nb, c, kwm): per key block, its keys' probabilities
  BFloat16* DST = PT + G.BH * nb * c * kwm;  // the same for dS
  BFloat16* unit = unit_area(vt, G);
  float* UINV = unit_eps >= 0 ? unit_inv(unit, G) : nullptr;  // null: keys as given
  float* GU = UINV ? unit_grad_area(unit, G) : nullptr;
  const Rows Q = rows_of(q), KR = rows_of(k), V = rows_of(v), GR = rows_of(grad);
  const Rows K = UINV ? unit_rows(KR, G, unit_eps, unit, UINV) : KR;
  run_packs(G, {{&V, vt, true}, {&K, kn, false}, {&Q, qn, false}, {&GR, gn, false}});
  Tensor dq = at::empty({q.size(0), q.size(1), G.n, d}, opts);
  Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  const BFloat16 *VT = vt, *KN = kn, *QN = qn, *GN = gn;
  const BFloat16* OUT = out.data_ptr<BFloat16>();
  const BFloat16* PR = probs.data_ptr<BFloat16>();
  BFloat16 *DQ = dq.data_ptr<BFloat16>(), *DK = dk.data_ptr<BFloat16>();
  BFloat16* DV = dv.data_ptr<BFloat16>();
  const float scale = G.scale;

  // delta = dO . O per row, in row order (read through a routed sort, O's rows miss cache)
  float* DELTA = delta_area(unit, G);
  at::parallel_for(0, G.BH * G.n, 256, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const uint16_t* go = reinterpret_cast<const uint16_t*>(GR.row(r / G.n, r % G.n));
      const uint16_t* o = reinterpret_cast<const uint16_t*>(OUT + r * d);
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t ch = 0; ch < d; ch++) dot += bf16_bits_to_float(go[ch]) * bf16_bits_to_float(o[ch]);
      DELTA[r] = dot;
    }
  });

  // pass A, per query block: dP = dO V^T, dS = scale P (dP - delta) with delta = dO . O,
  // dq = dS K; P's and dS's (c x c) tiles transposed into their key blocks' rows, at the
  // columns of this query block among the queries that see that key block
  at::parallel_for(0, G.BH * nb, 1, [=](int64_t s0, int64_t s1) {
    std::vector<float> dP(c * kwm), acc(c * d);
    std::vector<BFloat16> dSb(c * kwm), gbuf(c * d);
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / nb, t = idx % nb, i0 = t * c;
      const int64_t m = std::min(c, G.n - i0), ks = G.key_lo(t), nk = G.key_hi(t) - ks;
      const BFloat16* Pt = PR + idx * c * kwm;
      int64_t ldg;
      const BFloat16* ga = block_rows(GR, G, bh, i0, m, gbuf.data(), &ldg);
      cpublas::brgemm(m, nk, d, ldg, np, kwm, false, ga, VT + bh * d * np + ks * 2, dP.data());
      for (int64_t r = 0; r < m; r++) {
        const int64_t row = G.src(bh, i0 + r);
        const float* dp = dP.data() + r * kwm;
        const uint16_t* p = reinterpret_cast<const uint16_t*>(Pt + r * kwm);
        uint16_t* ds = reinterpret_cast<uint16_t*>(dSb.data() + r * kwm);
        const float delta = DELTA[bh * G.n + row];
#pragma omp simd
        for (int64_t jj = 0; jj < nk; jj++)
          ds[jj] = float_to_bf16_bits(bf16_bits_to_float(p[jj]) * (dp[jj] - delta) * scale);
      }
      if (m < c) std::memset(dSb.data() + m * kwm, 0, (c - m) * kwm * sizeof(BFloat16));
      cpublas::brgemm(m, d, nk, kwm, d, d, false, dSb.data(), KN + bh * np * d + ks * d,
                      acc.data());
      for (int64_t r = 0; r < m; r++)
        store_row(acc.data() + r * d, d, DQ + (bh * G.n + G.src(bh, i0 + r)) * d);
      for (int64_t u = ks / c; u < (ks + nk) / c; u++) {  // the key blocks this block sees
        const int64_t col = (t - std::max<int64_t>(0, u - G.fwd)) * c;
        const int64_t tile = (bh * nb + u) * c * kwm + col;
        transpose_tile(Pt + (u * c - ks), kwm, PT + tile, kwm, c);
        transpose_tile(dSb.data() + (u * c - ks), kwm, DST + tile, kwm, c);
      }
    }
    cpublas::brgemm_release();
  });

  // pass B, per key block, over the queries that see it: dk = dS^T Q, dv = P^T dO
  at::parallel_for(0, G.BH * nb, 1, [=](int64_t s0, int64_t s1) {
    std::vector<float> acc(c * d);
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / nb, u = idx % nb, j0 = u * c;
      const int64_t mk = std::min(c, G.n - j0);
      const int64_t t_lo = std::max<int64_t>(0, u - G.fwd), t_hi = std::min(nb - 1, u + G.back);
      const int64_t qa = t_lo * c, nq = (t_hi - t_lo + 1) * c;
      cpublas::brgemm(mk, d, nq, kwm, d, d, false, DST + idx * c * kwm, QN + bh * np * d + qa * d,
                      acc.data());
      for (int64_t r = 0; r < mk; r++) {
        const int64_t row = G.src(bh, j0 + r);
        if (GU)  // through the normalisation below, in row order
          std::memcpy(GU + (bh * G.n + row) * d, acc.data() + r * d, d * sizeof(float));
        else
          store_row(acc.data() + r * d, d, DK + (bh * G.n + row) * d);
      }
      cpublas::brgemm(mk, d, nq, kwm, d, d, false, PT + idx * c * kwm, GN + bh * np * d + qa * d,
                      acc.data());
      for (int64_t r = 0; r < mk; r++)
        store_row(acc.data() + r * d, d, DV + (bh * G.n + G.src(bh, j0 + r)) * d);
    }
    cpublas::brgemm_release();
  });
  if (GU)  // unit keys: dk from the unit keys' gradient, row by row (k's rows in order)
    at::parallel_for(0, G.BH * G.n, 64, [=](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        float* g = GU + r * d;
        unit_backward(KR.row(r / G.n, r % G.n), UINV[r], d, g);
        store_row(g, d, DK + r * d);
      }
    });
  return {dq, dk, dv};
}

// whether oneDNN's bf16 micro-kernels run on this CPU (they need AVX-512 BF16 or AMX): a
// 2 x 2 product, compared with its known value
bool available() {
  try {
    const BFloat16 a[4] = {1.f, 2.f, 3.f, 4.f};           // A = [[1, 2], [3, 4]]
    const BFloat16 b[4] = {5.f, 7.f, 6.f, 8.f};           // B = [[5, 6], [7, 8]] in VNNI
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c);
    cpublas::brgemm_release();
    return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("window_forward", &window_forward);
  m.def("window_backward", &window_backward);
  m.def("available", &available);
  m.def("workspace_numel", &workspace_numel);
  m.def("probs_numel", &probs_numel);
}
