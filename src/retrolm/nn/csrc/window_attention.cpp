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
//   window_forward(q, k, v, groups, order, window, causal, exclude_self, block, ws)
//       -> out (B, H, n, d), lse (B*H, n) fp32 (log-sum-exp of each place's scaled scores)
//   window_backward(grad, q, k, v, out, lse, groups, order, ..., ws) -> dq, dk, dv
//   workspace_numel(B*H, n, d, window, causal, block): the scratch `ws` (bf16) both need;
//       the caller keeps it between calls (fresh multi-MB buffers cost their page faults)
//
// q, k, v: bf16 (B, H, n, d), any strides with a unit last one, d even. Queries go in blocks
// of `block` places; a block's keys are the blocks within the window before it (and after
// it, non-causal). The backward recomputes the probabilities from lse twice: per query
// block for dq, and per key block, from the keys' side (S^T = K Q^T), for dk and dv, so no
// two threads add into one row and nothing of (blocks x window) size goes through memory.
//
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

// scratch: 7 packs of (BH, np, d), then per place the backward's delta (fp32) and whether
// it attends itself alone (a byte), in bf16 elements
int64_t workspace_numel(int64_t BH, int64_t n, int64_t d, int64_t window, bool causal,
                        int64_t block) {
  const int64_t np = (n + block - 1) / block * block;
  return 7 * BH * np * d + 2 * BH * n + (BH * n + 1) / 2;
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
  for (int64_t r = 0; r < m; r++)
    std::memcpy(buf + r * G.d, x.row(bh, G.src(bh, i0 + r)), G.d * sizeof(BFloat16));
  *lda = G.d;
  return buf;
}

// --- the mask -----------------------------------------------------------------------------
// s: raw products with places [base, base + len) (keys of one query, or queries of one key).
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
void span(const float* s, int64_t base, int64_t lo, int64_t hi, int64_t* a, int64_t* z) {
  const float* w = s - base;
  lo = std::max(lo, base);
  hi = std::max(hi, lo);
  while (lo < hi && w[lo] == kNegInf) lo++;
  while (hi > lo && w[hi - 1] == kNegInf) hi--;
  *a = lo - base;
  *z = hi - base;
}

// The keys [ks, ks + nk) of query place i. Returns the row's maximum (-inf: no key).
// `alone` (shared q/k): whether it attends only itself.
float mask_row(const Geo& G, int64_t bh, int64_t i, int64_t ks, int64_t nk, float* s,
               int64_t* a, int64_t* z, bool* alone = nullptr) {
  if (alone) *alone = false;
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
  float mx = kNegInf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = std::max(lo, ks); j < hi; j++) mx = std::max(mx, w[j]);
  if (self && mx == kNegInf) {  // alone: it attends itself
    w[i] = self_v;
    mx = self_v;
    if (alone) *alone = true;
  }
  span(s, ks, lo, hi, a, z);
  return mx;
}

// The same mask seen from key place j, over query places [qa, qa + nq). `alone`: per query
// place, whether it attends only itself (shared q/k), as mask_row found.
void mask_col(const Geo& G, int64_t bh, int64_t j, int64_t qa, int64_t nq, float* s,
              const uint8_t* alone, int64_t* a, int64_t* z) {
  // causal: j <= i < j + window; non-causal: j - window < i < j + window
  const int64_t lo = std::max(qa, G.causal ? j : j - G.window + 1);
  int64_t hi = std::min({qa + nq, G.n, j + G.window});  // exclusive
  const int64_t* g = G.groups ? G.groups + bh * G.n : nullptr;
  const int64_t gj = g ? g[j] : 0;
  if (gj < 0) hi = lo;  // a padding key is seen by no query
  band(s, qa, nq, lo, hi, g, gj, G.scale);
  if (G.exclude_self && j >= lo && j < hi && !alone[bh * G.n + j]) s[j - qa] = kNegInf;
  span(s, qa, lo, hi, a, z);
}

void store_row(const float* x, int64_t d, BFloat16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
#pragma omp simd
  for (int64_t ch = 0; ch < d; ch++) o[ch] = float_to_bf16_bits(x[ch]);
}

// --- forward ------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> window_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const std::optional<Tensor>& groups_,
                                          const std::optional<Tensor>& order_, int64_t window,
                                          bool causal, bool exclude_self, int64_t block,
                                          const Tensor& ws) {
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
  const Rows Kr = rows_of(k), Vr = rows_of(v);
  run_packs(G, {{&Kr, kt, true}, {&Vr, vn, false}});
  Tensor out = at::empty({q.size(0), q.size(1), G.n, G.d}, opts);
  Tensor lse = at::empty({G.BH, G.n}, opts.dtype(at::kFloat));
  const Rows Q = rows_of(q);
  const BFloat16* KT = kt;
  const BFloat16* VN = vn;
  BFloat16* O = out.data_ptr<BFloat16>();
  float* L = lse.data_ptr<float>();
  const int64_t c = G.c, d = G.d, kwm = G.kw();
  at::parallel_for(0, G.BH * G.nb, 1, [=](int64_t s0, int64_t s1) {
    std::vector<float> S(c * kwm), acc(c * d);
    std::vector<BFloat16> P(c * kwm), abuf(c * d);
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / G.nb, t = idx % G.nb, i0 = t * c;
      const int64_t m = std::min(c, G.n - i0), ks = G.key_lo(t), nk = G.key_hi(t) - ks;
      int64_t lda;
      const BFloat16* a = block_rows(Q, G, bh, i0, m, abuf.data(), &lda);
      cpublas::brgemm(m, nk, d, lda, G.np, nk, false, a, KT + bh * d * G.np + ks * 2, S.data());
      for (int64_t r = 0; r < m; r++) {
        float* s = S.data() + r * nk;
        uint16_t* p = reinterpret_cast<uint16_t*>(P.data() + r * nk);
        int64_t a, z;
        const float mx = mask_row(G, bh, i0 + r, ks, nk, s, &a, &z);
        for (int64_t jj = 0; jj < a; jj++) p[jj] = 0;
        for (int64_t jj = z; jj < nk; jj++) p[jj] = 0;
        if (mx == kNegInf) {
          L[bh * G.n + i0 + r] = kNegInf;
          continue;
        }
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t jj = a; jj < z; jj++) {
          s[jj] = exp_f(s[jj] - mx);
          sum += s[jj];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t jj = a; jj < z; jj++) p[jj] = float_to_bf16_bits(s[jj] * inv);
        L[bh * G.n + i0 + r] = mx + std::log(sum);
      }
      cpublas::brgemm(m, d, nk, nk, d, d, false, P.data(), VN + bh * G.np * d + ks * d,
                      acc.data());
      for (int64_t r = 0; r < m; r++)
        store_row(acc.data() + r * d, d, O + (bh * G.n + G.src(bh, i0 + r)) * d);
    }
    cpublas::brgemm_release();
  });
  return {out, lse};
}

// --- backward -----------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> window_backward(
    const Tensor& grad, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const std::optional<Tensor>& groups_,
    const std::optional<Tensor>& order_, int64_t window, bool causal, bool exclude_self,
    int64_t block, const Tensor& ws) {
  check(grad, "grad");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous(), "out and lse as returned");
  const Tensor groups = groups_.has_value() ? groups_->contiguous() : Tensor();
  const Tensor order = order_.has_value() ? order_->contiguous() : Tensor();
  const Geo G = make_geo(q, groups, order, window, causal, exclude_self, block);
  const auto opts = q.options();
  const int64_t c = G.c, d = G.d, kwm = G.kw(), nb = G.nb, np = G.np;
  const int64_t P = G.BH * np * d;  // one pack
  BFloat16* kt = carve(ws, G);
  BFloat16 *vt = kt + P, *kn = kt + 2 * P, *qt = kt + 3 * P, *gt = kt + 4 * P;
  BFloat16 *qn = kt + 5 * P, *gn = kt + 6 * P;
  float* DELTA = reinterpret_cast<float*>(kt + 7 * P);  // (BH, n)
  uint8_t* ALONE = reinterpret_cast<uint8_t*>(DELTA + G.BH * G.n);  // (BH, n)
  const Rows Q = rows_of(q), K = rows_of(k), V = rows_of(v), GR = rows_of(grad);
  run_packs(G, {{&K, kt, true}, {&V, vt, true}, {&K, kn, false}, {&Q, qt, true},
                {&GR, gt, true}, {&Q, qn, false}, {&GR, gn, false}});
  Tensor dq = at::empty({q.size(0), q.size(1), G.n, d}, opts);
  Tensor dk = at::empty_like(dq), dv = at::empty_like(dq);
  const BFloat16 *KT = kt, *VT = vt, *KN = kn, *QT = qt, *GT = gt, *QN = qn, *GN = gn;
  const BFloat16* OUT = out.data_ptr<BFloat16>();
  const float* L = lse.data_ptr<float>();
  BFloat16 *DQ = dq.data_ptr<BFloat16>(), *DK = dk.data_ptr<BFloat16>();
  BFloat16* DV = dv.data_ptr<BFloat16>();
  const float scale = G.scale;

  // pass A, per query block: P, dS = scale * P * (dP - delta), dq = dS K; each place's
  // delta = dO . O and whether it attends itself alone, for pass B
  at::parallel_for(0, G.BH * nb, 1, [=](int64_t s0, int64_t s1) {
    std::vector<float> S(c * kwm), dP(c * kwm), acc(c * d);
    std::vector<BFloat16> dSb(c * kwm), abuf(c * d), gbuf(c * d);
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / nb, t = idx % nb, i0 = t * c;
      const int64_t m = std::min(c, G.n - i0), ks = G.key_lo(t), nk = G.key_hi(t) - ks;
      int64_t lda, ldg;
      const BFloat16* a = block_rows(Q, G, bh, i0, m, abuf.data(), &lda);
      const BFloat16* ga = block_rows(GR, G, bh, i0, m, gbuf.data(), &ldg);
      cpublas::brgemm(m, nk, d, lda, np, nk, false, a, KT + bh * d * np + ks * 2, S.data());
      cpublas::brgemm(m, nk, d, ldg, np, nk, false, ga, VT + bh * d * np + ks * 2, dP.data());
      for (int64_t r = 0; r < m; r++) {
        const int64_t i = i0 + r, row = G.src(bh, i);
        float* s = S.data() + r * nk;
        const float* dp = dP.data() + r * nk;
        uint16_t* ds = reinterpret_cast<uint16_t*>(dSb.data() + r * nk);
        const float l = L[bh * G.n + i];
        bool alone;
        int64_t a, z;
        mask_row(G, bh, i, ks, nk, s, &a, &z, &alone);
        ALONE[bh * G.n + i] = alone;
        const uint16_t* go = reinterpret_cast<const uint16_t*>(GR.row(bh, row));
        const uint16_t* o = reinterpret_cast<const uint16_t*>(OUT + (bh * G.n + row) * d);
        float delta = 0.f;
#pragma omp simd reduction(+ : delta)
        for (int64_t ch = 0; ch < d; ch++)
          delta += bf16_bits_to_float(go[ch]) * bf16_bits_to_float(o[ch]);
        DELTA[bh * G.n + i] = delta;
        if (l == kNegInf) a = z = 0;
        for (int64_t jj = 0; jj < a; jj++) ds[jj] = 0;
        for (int64_t jj = z; jj < nk; jj++) ds[jj] = 0;
#pragma omp simd
        for (int64_t jj = a; jj < z; jj++) {
          const float pv = exp_f(s[jj] - l);
          ds[jj] = float_to_bf16_bits(pv * (dp[jj] - delta) * scale);
        }
      }
      cpublas::brgemm(m, d, nk, nk, d, d, false, dSb.data(), KN + bh * np * d + ks * d,
                      acc.data());
      for (int64_t r = 0; r < m; r++)
        store_row(acc.data() + r * d, d, DQ + (bh * G.n + G.src(bh, i0 + r)) * d);
    }
    cpublas::brgemm_release();
  });

  // pass B, per key block: the same scores seen from the keys (recomputed, transposed:
  // S^T = K Q^T, dP^T = V dO^T), then dk = dS^T Q and dv = P^T dO over the queries that see
  // the block
  at::parallel_for(0, G.BH * nb, 1, [=](int64_t s0, int64_t s1) {
    std::vector<float> S(c * kwm), dP(c * kwm), acc(c * d);
    std::vector<BFloat16> Pb(c * kwm), dSb(c * kwm), kbuf(c * d), vbuf(c * d);
    for (int64_t idx = s0; idx < s1; idx++) {
      const int64_t bh = idx / nb, u = idx % nb, j0 = u * c;
      const int64_t mk = std::min(c, G.n - j0);
      const int64_t t_lo = std::max<int64_t>(0, u - G.fwd), t_hi = std::min(nb - 1, u + G.back);
      const int64_t qa = t_lo * c, nq = (t_hi - t_lo + 1) * c;
      int64_t ldk, ldv;
      const BFloat16* ka = block_rows(K, G, bh, j0, mk, kbuf.data(), &ldk);
      const BFloat16* va = block_rows(V, G, bh, j0, mk, vbuf.data(), &ldv);
      cpublas::brgemm(mk, nq, d, ldk, np, nq, false, ka, QT + bh * d * np + qa * 2, S.data());
      cpublas::brgemm(mk, nq, d, ldv, np, nq, false, va, GT + bh * d * np + qa * 2, dP.data());
      const float* l = L + bh * G.n + qa;
      const float* delta = DELTA + bh * G.n + qa;
      const int64_t nreal = std::min(nq, G.n - qa);  // query places < n
      for (int64_t r = 0; r < mk; r++) {
        float* s = S.data() + r * nq;
        const float* dp = dP.data() + r * nq;
        uint16_t* p = reinterpret_cast<uint16_t*>(Pb.data() + r * nq);
        uint16_t* ds = reinterpret_cast<uint16_t*>(dSb.data() + r * nq);
        int64_t a, z;
        mask_col(G, bh, j0 + r, qa, nq, s, ALONE, &a, &z);
        z = std::min(z, nreal);
        a = std::min(a, z);
        for (int64_t cc = 0; cc < a; cc++) p[cc] = ds[cc] = 0;
        for (int64_t cc = z; cc < nq; cc++) p[cc] = ds[cc] = 0;
#pragma omp simd
        for (int64_t cc = a; cc < z; cc++) {
          const float pv = s[cc] == kNegInf ? 0.f : exp_f(s[cc] - l[cc]);
          p[cc] = float_to_bf16_bits(pv);
          ds[cc] = float_to_bf16_bits(pv * (dp[cc] - delta[cc]) * scale);
        }
      }
      cpublas::brgemm(mk, d, nq, nq, d, d, false, dSb.data(), QN + bh * np * d + qa * d,
                      acc.data());
      for (int64_t r = 0; r < mk; r++)
        store_row(acc.data() + r * d, d, DK + (bh * G.n + G.src(bh, j0 + r)) * d);
      cpublas::brgemm(mk, d, nq, nq, d, d, false, Pb.data(), GN + bh * np * d + qa * d,
                      acc.data());
      for (int64_t r = 0; r < mk; r++)
        store_row(acc.data() + r * d, d, DV + (bh * G.n + G.src(bh, j0 + r)) * d);
    }
    cpublas::brgemm_release();
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
}
