// Fused one-token decoding blocks for CPU, fp32 (see retrolm/nn/fused_decode.py): pre-norm
// self-attention, cross-attention and feed-forward blocks, and the Routing Transformer's
// attention sub-layer; DeLighT's DExTra with its mixers and shuffles folded (dextra_step, at
// the end).
//
// A decoding step multiplies a few rows by every weight of the model. Through ATen each
// block of a pre-norm transformer layer is 15-40 kernel calls whose fixed costs (dispatch,
// allocation, thread wake-ups, cold caches after the weights stream past) exceed their
// arithmetic; here each block is one call: plain loops over the rows, one pass over each
// weight (out, in) row-major as nn.Linear stores it, threads over output rows.
//
// Weights may be float32 or bfloat16 (``set_weight_dtype`` on the Python side: half the
// bytes to stream per token); activations, norms, attention and accumulation are float32.
//
// Shapes: b rows, d model width, h heads, dh head width, r rotated channels (<= dh, the
// "half" layout: channel c pairs with c + r/2), cap cache slots, s cross-attention keys.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <tuple>
#include <vector>

#include "vec_math.h"

using torch::Tensor;

namespace {

constexpr int64_t kGrain = 16;  // output rows per task: a few KB of weight each

void check_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor");
}

// y (b, d) = x / rms(x) * w, statistics per row
void rms_norm(const float* x, const float* w, double eps, float* y, int64_t b, int64_t d) {
  for (int64_t i = 0; i < b; i++) {
    const float* xi = x + i * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < d; c++) ss += xi[c] * xi[c];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
    float* yi = y + i * d;
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yi[c] = xi[c] * inv * w[c];
  }
}

// y (b, d) = (x - mean(x)) / sqrt(var(x) + eps) * w + bias, statistics per row (biased var)
void layer_norm(const float* x, const float* w, const float* bias, double eps, float* y,
                int64_t b, int64_t d) {
  for (int64_t i = 0; i < b; i++) {
    const float* xi = x + i * d;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < d; c++) sum += xi[c];
    const float mean = sum / static_cast<float>(d);
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < d; c++) ss += (xi[c] - mean) * (xi[c] - mean);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + static_cast<float>(eps));
    float* yi = y + i * d;
#pragma omp simd
    for (int64_t c = 0; c < d; c++) yi[c] = (xi[c] - mean) * inv * w[c] + bias[c];
  }
}

// y (b, out) = x (b, in) @ W.T + bias, W (out, in) row-major float32; bias may be null. Each
// weight row is read once for all b rows.
void linear_rows(const float* x, const float* W, const float* bias, float* y, int64_t b,
                 int64_t in, int64_t out) {
  at::parallel_for(0, out, kGrain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++) {
      const float* wo = W + o * in;
      for (int64_t i = 0; i < b; i++) {
        const float* xi = x + i * in;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t c = 0; c < in; c++) acc += wo[c] * xi[c];
        y[i * out + o] = acc + (bias ? bias[o] : 0.f);
      }
    }
  });
}

inline float widen(uint16_t w) {  // bfloat16 bits -> float: they are its high half
  const uint32_t u = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// sum_c widen(w[c]) * x[c]
inline float dot_bf16(const uint16_t* w, const float* x, int64_t n) {
  int64_t c = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; c + 32 <= n; c += 32) {
    const __m512i w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + c)));
    const __m512i w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + c + 16)));
    a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(x + c),
                         a0);
    a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)),
                         _mm512_loadu_ps(x + c + 16), a1);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
  for (; c < n; c++) s += widen(w[c]) * x[c];
  return s;
}

// the same with W as bfloat16 bits, read as float
void linear_rows(const float* x, const uint16_t* W, const float* bias, float* y, int64_t b,
                 int64_t in, int64_t out) {
  at::parallel_for(0, out, kGrain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; o++)
      for (int64_t i = 0; i < b; i++)
        y[i * out + o] = dot_bf16(W + o * in, x + i * in, in) + (bias ? bias[o] : 0.f);
  });
}

void check_weight(const Tensor& w, int64_t out, int64_t in, const char* name) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() &&
                  (w.scalar_type() == torch::kFloat32 || w.scalar_type() == torch::kBFloat16),
              name, " must be a contiguous float32 or bfloat16 CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == out && w.size(1) == in, name, " must be (", out,
              ", ", in, "), got ", w.sizes());
}

// linear_rows over W's dtype
void linear(const float* x, const Tensor& W, const float* bias, float* y, int64_t b) {
  const int64_t out = W.size(0), in = W.size(1);
  if (W.scalar_type() == torch::kBFloat16)
    linear_rows(x, reinterpret_cast<const uint16_t*>(W.data_ptr()), bias, y, b, in, out);
  else
    linear_rows(x, W.data_ptr<float>(), bias, y, b, in, out);
}

// rotate the first r channels of v (dh) in place: v*cos + (-v2, v1)*sin
void rotate(float* v, const float* cos, const float* sin, int64_t r) {
  const int64_t half = r / 2;
  for (int64_t c = 0; c < half; c++) {
    const float a = v[c], p = v[c + half];
    v[c] = a * cos[c] - p * sin[c];
    v[c + half] = p * cos[c + half] + a * sin[c + half];
  }
}

// rotate the first r channels of each of `rows` queries q and keys k (dh each), then append
// each key and value at slot `end` of its row of the cache buffers K, V (cap slots a row)
void rotate_and_append(float* q, float* k, const float* v, float* K, float* V, int64_t rows,
                       int64_t dh, int64_t cap, int64_t end, const float* cp, const float* sp,
                       int64_t r) {
  for (int64_t i = 0; i < rows; i++) {
    rotate(q + i * dh, cp, sp, r);  // r == 0: no rotary, nothing to do
    rotate(k + i * dh, cp, sp, r);
    std::copy(k + i * dh, k + (i + 1) * dh, K + (i * cap + end) * dh);
    std::copy(v + i * dh, v + (i + 1) * dh, V + (i * cap + end) * dh);
  }
}

// softmax attention of one query q (dh) over n keys K[j*ks], values V[j*vs], scale; keys
// with allow[j] == false are skipped (allow may be null). Writes dh values to out; zeros
// when no key is allowed.
void attend_one(const float* q, const float* K, int64_t ks, const float* V, int64_t vs,
                const bool* allow, int64_t n, int64_t dh, float scale, float* scores,
                float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; j++) {
    if (allow && !allow[j]) continue;
    const float* kj = K + j * ks;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < dh; c++) s += q[c] * kj[c];
    scores[j] = s * scale;
    mx = std::max(mx, scores[j]);
  }
  for (int64_t c = 0; c < dh; c++) out[c] = 0.f;
  if (mx == -std::numeric_limits<float>::infinity()) return;  // nothing to attend: zeros
  float total = 0.f;
  for (int64_t j = 0; j < n; j++) {
    if (allow && !allow[j]) continue;
    const float p = std::exp(scores[j] - mx);
    total += p;
    const float* vj = V + j * vs;
#pragma omp simd
    for (int64_t c = 0; c < dh; c++) out[c] += p * vj[c];
  }
  const float inv = 1.f / total;
  for (int64_t c = 0; c < dh; c++) out[c] *= inv;
}

// softmax attention of each of `rows` queries q (dh each) over slots start … end of its row of
// the cache buffers K, V (cap slots a row), into out (rows, dh); threads over rows when
// `parallel`
void attend_cache(const float* q, const float* K, const float* V, int64_t rows, int64_t dh,
                  int64_t cap, int64_t start, int64_t end, float* out, bool parallel) {
  const int64_t nk = end - start + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  auto run = [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(nk);
    for (int64_t i = i0; i < i1; i++)
      attend_one(q + i * dh, K + (i * cap + start) * dh, dh, V + (i * cap + start) * dh, dh,
                 nullptr, nk, dh, scale, scores.data(), out + i * dh);
  };
  if (parallel)
    at::parallel_for(0, rows, 1, run);
  else
    run(0, rows);
}

// n = rmsnorm(x), or layernorm(x) when norm_b is given (x itself when norm_w is empty). Then,
// with a token-shift state past (b, a, d) (any batch/row strides, rows contiguous; empty = no
// shift): channels shift_from … d-1 of n take their values from past's oldest row (the normed
// input a steps back), and the next state (past's rows 1 … a-1, then this step's unshifted n)
// is returned (an empty tensor without a shift).
Tensor norm_and_shift(const Tensor& x, const Tensor& norm_w, const Tensor& norm_b, double eps,
                      const Tensor& past, int64_t shift_from, float* n) {
  const int64_t b = x.size(0), d = x.size(1);
  if (norm_w.numel()) {
    check_f32(norm_w, "norm_w");
    TORCH_CHECK(norm_w.size(0) == d, "norm_w must have x's width");
    if (norm_b.defined() && norm_b.numel()) {  // LayerNorm
      check_f32(norm_b, "norm_b");
      TORCH_CHECK(norm_b.size(0) == d, "norm_b must have x's width");
      layer_norm(x.data_ptr<float>(), norm_w.data_ptr<float>(), norm_b.data_ptr<float>(), eps, n,
                 b, d);
    } else {
      rms_norm(x.data_ptr<float>(), norm_w.data_ptr<float>(), eps, n, b, d);
    }
  } else {
    std::copy(x.data_ptr<float>(), x.data_ptr<float>() + b * d, n);
  }
  if (!past.numel()) return past;
  TORCH_CHECK(past.device().is_cpu() && past.scalar_type() == torch::kFloat32 &&
                  past.dim() == 3 && past.size(0) == b && past.size(2) == d &&
                  past.stride(2) == 1 && 0 <= shift_from && shift_from <= d,
              "shift state must be a float32 (b, a, d) tensor with contiguous rows and "
              "0 <= shift_from <= d");
  const int64_t a = past.size(1), s0 = past.stride(0), s1 = past.stride(1);
  auto next = torch::empty({b, a, d}, x.options());
  const float* p = past.data_ptr<float>();
  float* q = next.data_ptr<float>();
  for (int64_t i = 0; i < b; i++) {
    for (int64_t r = 1; r < a; r++) std::copy(p + i * s0 + r * s1, p + i * s0 + r * s1 + d,
                                              q + (i * a + r - 1) * d);
    std::copy(n + i * d, n + (i + 1) * d, q + (i * a + a - 1) * d);  // unshifted n
    std::copy(p + i * s0 + shift_from, p + i * s0 + d, n + i * d + shift_from);
  }
  return next;
}

}  // namespace

// Pre-norm causal self-attention for one new position per row, x + out(attn(norm(x))).
// kbuf/vbuf (b, h, cap, dh): the rotated keys and values of the cache; this position's are
// written at slot `end` and the query attends slots start..end. cos/sin (r,) or (1, r): its
// rotary row.
// shift_past/shift_from: token shift of the normed input (norm_and_shift). Returns (x + out,
// the next shift state).
std::tuple<Tensor, Tensor> self_attention_block(const Tensor& x, const Tensor& norm_w,
                                                double eps, const Tensor& wq,
                            const Tensor& wk, const Tensor& wv, const Tensor& wo,
                            const Tensor& cos, const Tensor& sin, Tensor kbuf, Tensor vbuf,
                            int64_t start, int64_t end, const Tensor& shift_past,
                            int64_t shift_from) {
  for (auto* t : {&x, &cos, &sin}) check_f32(*t, "input");
  check_f32(kbuf, "kbuf");
  check_f32(vbuf, "vbuf");
  const int64_t b = x.size(0), d = x.size(1), h = kbuf.size(1), cap = kbuf.size(2),
                dh = kbuf.size(3), r = cos.numel(), hd = h * dh;
  TORCH_CHECK(kbuf.size(0) == b && vbuf.sizes() == kbuf.sizes() && 0 <= start &&
                  start <= end && end < cap && r <= dh,
              "self_attention_block: inconsistent shapes");
  check_weight(wq, hd, d, "wq");
  check_weight(wk, hd, d, "wk");
  check_weight(wv, hd, d, "wv");
  check_weight(wo, d, hd, "wo");
  auto n = torch::empty({b, d}, x.options());
  auto qkv = torch::empty({3, b, hd}, x.options());
  auto next = norm_and_shift(x, norm_w, torch::Tensor(), eps, shift_past, shift_from,
                             n.data_ptr<float>());
  float* q = qkv.data_ptr<float>();
  float* k = q + b * hd;
  float* v = k + b * hd;
  linear(n.data_ptr<float>(), wq, nullptr, q, b);
  linear(n.data_ptr<float>(), wk, nullptr, k, b);
  linear(n.data_ptr<float>(), wv, nullptr, v, b);
  float* K = kbuf.data_ptr<float>();
  float* Vb = vbuf.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  rotate_and_append(q, k, v, K, Vb, b * h, dh, cap, end, cp, sp, r);
  auto att = torch::empty({b, hd}, x.options());
  float* ap = att.data_ptr<float>();
  attend_cache(q, K, Vb, b * h, dh, cap, start, end, ap, true);
  auto y = torch::empty({b, d}, x.options());
  linear(ap, wo, nullptr, y.data_ptr<float>(), b);
  y.add_(x);
  return {y, next};
}

// Pre-norm cross-attention of one position per row to s precomputed (rotated) keys:
// x + out(attn(rotate(q(norm(x))), kk, vv)). kk/vv (b, h, s, dh), any strides with the last
// dim contiguous; allow (b, s) bool or an empty tensor (every key present); a row with no
// allowed key adds nothing.
Tensor cross_attention_block(const Tensor& x, const Tensor& norm_w, double eps, const Tensor& wq,
                             const Tensor& wo, const Tensor& cos, const Tensor& sin,
                             const Tensor& kk, const Tensor& vv, const Tensor& allow) {
  for (auto* t : {&x, &cos, &sin}) check_f32(*t, "input");
  TORCH_CHECK(kk.scalar_type() == torch::kFloat32 && vv.scalar_type() == torch::kFloat32 &&
                  kk.stride(3) == 1 && vv.stride(3) == 1,
              "cross_attention_block: keys/values must be float32 with contiguous rows");
  const int64_t b = x.size(0), d = x.size(1), h = kk.size(1), s = kk.size(2), dh = kk.size(3),
                r = cos.numel(), hd = h * dh;
  const bool masked = allow.numel() > 0;
  check_weight(wq, hd, d, "wq");
  check_weight(wo, d, hd, "wo");
  TORCH_CHECK(kk.size(0) == b && vv.sizes() == kk.sizes() && r <= dh &&
                  (!masked || (allow.scalar_type() == torch::kBool && allow.is_contiguous() &&
                               allow.size(0) == b && allow.size(1) == s)),
              "cross_attention_block: inconsistent shapes");
  auto n = torch::empty({b, d}, x.options());
  auto q = torch::empty({b, hd}, x.options());
  check_f32(norm_w, "norm_w");
  rms_norm(x.data_ptr<float>(), norm_w.data_ptr<float>(), eps, n.data_ptr<float>(), b, d);
  float* qp = q.data_ptr<float>();
  linear(n.data_ptr<float>(), wq, nullptr, qp, b);
  for (int64_t i = 0; i < b * h; i++) rotate(qp + i * dh, cos.data_ptr<float>(),
                                             sin.data_ptr<float>(), r);
  auto att = torch::empty({b, hd}, x.options());
  float* ap = att.data_ptr<float>();
  const float *K = kk.data_ptr<float>(), *V = vv.data_ptr<float>();
  const bool* al = masked ? allow.data_ptr<bool>() : nullptr;
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  at::parallel_for(0, b * h, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(s);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t row = i / h, head = i % h;
      attend_one(qp + i * dh, K + row * kk.stride(0) + head * kk.stride(1), kk.stride(2),
                 V + row * vv.stride(0) + head * vv.stride(1), vv.stride(2),
                 al ? al + row * s : nullptr, s, dh, scale, scores.data(), ap + i * dh);
    }
  });
  auto y = torch::empty({b, d}, x.options());
  linear(ap, wo, nullptr, y.data_ptr<float>(), b);
  y.add_(x);
  return y;
}

// Pre-norm feed-forward: [x +] W_2 act(W_1 n + b_1) + b_2 with n = rmsnorm(x), layernorm(x)
// (with norm_b) or x, token-shifted as in norm_and_shift. Returns (out, the next shift state).
// act 0 = exact GELU, 1 = SiLU; biases may be empty. Without the residual the output width
// (w2's rows) may differ from x's. glu: W_1 n + b_1 is [u ; g] (2 * hidden rows) and the
// hidden layer u * act(g) (nn.FeedForward(glu=True): GEGLU, SwiGLU).
std::tuple<Tensor, Tensor> feed_forward_block(const Tensor& x, const Tensor& norm_w,
                                              const Tensor& norm_b, double eps, const Tensor& w1,
                          const Tensor& b1, const Tensor& w2, const Tensor& b2, int64_t act,
                          bool residual, const Tensor& shift_past, int64_t shift_from, bool glu) {
  check_f32(x, "x");
  const int64_t b = x.size(0), d = x.size(1), up = w1.size(0), hid = glu ? up / 2 : up,
                out = w2.size(0);
  TORCH_CHECK(!glu || up % 2 == 0, "feed_forward_block: a GLU's w1 has an even row count");
  check_weight(w1, up, d, "w1");
  check_weight(w2, out, hid, "w2");
  TORCH_CHECK((!residual || out == d) && (act == 0 || act == 1),
              "feed_forward_block: inconsistent shapes");
  for (auto* t : {&b1, &b2}) if (t->numel()) check_f32(*t, "bias");
  TORCH_CHECK((!b1.numel() || b1.numel() == up) && (!b2.numel() || b2.numel() == out),
              "feed_forward_block: bias sizes");
  auto n = torch::empty({b, d}, x.options());
  auto hbuf = torch::empty({b, up}, x.options());
  auto next = norm_and_shift(x, norm_w, norm_b, eps, shift_past, shift_from, n.data_ptr<float>());
  float* hp = hbuf.data_ptr<float>();
  linear(n.data_ptr<float>(), w1, b1.numel() ? b1.data_ptr<float>() : nullptr, hp, b);
  // row i's hidden layer lands at hp + i * hid: (a GLU packs rows in place, reading each
  // value at or after where it writes it)
  const float inv_sqrt2 = 0.70710678118654752440f;
  for (int64_t i = 0; i < b; i++) {
    const float* a = hp + i * up + (glu ? hid : 0);  // what the activation reads
    const float* u = hp + i * up;                     // what a GLU multiplies it with
    float* o = hp + i * hid;
    for (int64_t c = 0; c < hid; c++) {
      const float g = act == 0 ? 0.5f * a[c] * (1.f + std::erf(a[c] * inv_sqrt2))
                               : a[c] / (1.f + std::exp(-a[c]));
      o[c] = glu ? u[c] * g : g;
    }
  }
  auto y = torch::empty({b, out}, x.options());
  linear(hp, w2, b2.numel() ? b2.data_ptr<float>() : nullptr, y.data_ptr<float>(), b);
  if (residual) y.add_(x);
  return {y, next};
}


// Pre-norm routing self-attention (retrolm.models.routing, sorted routing, causal, eval) for
// one real token per row: x + W_o [local heads ; routed heads], n = layernorm(x).
//   projections: q (h heads), k (hk = hl [+ hr unless shared_qk] heads), v (h heads) of n;
//   rotary on every q and k head (cos/sin (d,)).
//   local heads 0 … hl-1: this token's key/value written at slot lend of lk_buf/lv_buf
//     (b, hl, cap, d); the query attends slots lstart … lend.
//   routed heads j = hl … h-1: the cluster of a vector is argmax over the k means (hr, k, d)
//     of its l2-normalised direction; the query routes by its unrotated q, the key by its
//     unrotated k (shared_qk: the query's cluster, and the key is the l2-normalised rotated
//     q). The key goes into its cluster's ring (kring/vring (b*hr*k, w, d), cnt (b*hr*k,)
//     keys seen per ring) at slot seen % w; the query attends the filled slots of its
//     cluster's ring (shared_qk: all but its own key, which it sees only when nothing else
//     is there and there is no memory) and the m memory key/values (mem_k/mem_v (hr, m, d),
//     always visible, or empty).
// Returns (x + out, the mean over rows and routed heads of (2 - 2 cos(query, its centroid)) / d
// (shared_qk) or that mean over queries and keys: the commitment loss before its factor).
std::tuple<Tensor, Tensor> routing_attention_block(
    const Tensor& x, const Tensor& norm_w, const Tensor& norm_b, double eps, const Tensor& wq,
    const Tensor& wk, const Tensor& wv, const Tensor& wo, const Tensor& cos, const Tensor& sin,
    Tensor lk_buf, Tensor lv_buf, int64_t lstart, int64_t lend, Tensor kring, Tensor vring,
    Tensor cnt, const Tensor& means, int64_t hl, bool shared_qk, const Tensor& mem_k,
    const Tensor& mem_v) {
  for (auto* t : {&x, &norm_w, &norm_b, &cos, &sin, &means}) check_f32(*t, "input");
  const int64_t b = x.size(0), d = x.size(1), h = wv.size(0) / cos.numel(), dh = cos.numel(),
                hr = h - hl, hk = hl + (shared_qk ? 0 : hr);
  check_weight(wq, h * dh, d, "wq");
  check_weight(wv, h * dh, d, "wv");
  check_weight(wo, d, h * dh, "wo");
  if (hk) check_weight(wk, hk * dh, d, "wk");
  const int64_t k = hr ? means.size(1) : 0, w = hr ? kring.size(1) : 0;
  const int64_t m = mem_k.numel() ? mem_k.size(1) : 0;
  if (hl) {
    check_f32(lk_buf, "lk_buf");
    check_f32(lv_buf, "lv_buf");
    TORCH_CHECK(lk_buf.size(0) == b && lk_buf.size(1) == hl && lk_buf.size(3) == dh &&
                    0 <= lstart && lstart <= lend && lend < lk_buf.size(2),
                "routing_attention_block: inconsistent local cache");
  }
  if (hr) {
    check_f32(kring, "kring");
    check_f32(vring, "vring");
    TORCH_CHECK(cnt.scalar_type() == torch::kLong && cnt.is_contiguous() &&
                    cnt.numel() == b * hr * k && kring.size(0) == b * hr * k &&
                    kring.size(2) == dh && means.size(0) == hr && means.size(2) == dh,
                "routing_attention_block: inconsistent rings");
    if (m) {
      check_f32(mem_k, "mem_k");
      check_f32(mem_v, "mem_v");
    }
  }
  auto n = torch::empty({b, d}, x.options());
  layer_norm(x.data_ptr<float>(), norm_w.data_ptr<float>(), norm_b.data_ptr<float>(), eps,
             n.data_ptr<float>(), b, d);
  auto q = torch::empty({b, h * dh}, x.options());
  auto kk = torch::empty({b, std::max<int64_t>(hk, 1) * dh}, x.options());
  auto v = torch::empty({b, h * dh}, x.options());
  float *qp = q.data_ptr<float>(), *kp = kk.data_ptr<float>(), *vp = v.data_ptr<float>();
  linear(n.data_ptr<float>(), wq, nullptr, qp, b);
  if (hk) linear(n.data_ptr<float>(), wk, nullptr, kp, b);
  linear(n.data_ptr<float>(), wv, nullptr, vp, b);
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* M = means.data_ptr<float>();
  // route the unrotated vectors first: cluster ids and the commitment error
  std::vector<int64_t> qg(b * hr), kg(b * hr);
  float err = 0.f;
  auto route = [&](const float* vec, int64_t j) {  // -> (cluster, 2 - 2 best) of head j
    float nn = 0.f;
    for (int64_t c = 0; c < dh; c++) nn += vec[c] * vec[c];
    const float inv = 1.f / std::max(std::sqrt(nn), 1e-12f);
    int64_t best_i = 0;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t g = 0; g < k; g++) {
      const float* mu = M + (j * k + g) * dh;
      float s = 0.f;
      for (int64_t c = 0; c < dh; c++) s += vec[c] * inv * mu[c];
      if (s > best) best = s, best_i = g;
    }
    return std::make_pair(best_i, 2.f - 2.f * best);
  };
  for (int64_t i = 0; i < b; i++)
    for (int64_t j = 0; j < hr; j++) {
      auto [g, e] = route(qp + (i * h + hl + j) * dh, j);
      qg[i * hr + j] = g;
      err += e;
      if (shared_qk) {
        kg[i * hr + j] = g;
      } else {
        auto [gk, ek] = route(kp + (i * hk + hl + j) * dh, j);
        kg[i * hr + j] = gk;
        err += ek;
      }
    }
  const float commit = hr ? err / static_cast<float>(dh) /
                                static_cast<float>(b * hr * (shared_qk ? 1 : 2))
                          : 0.f;
  for (int64_t i = 0; i < b; i++) {  // rotary on every q and k head
    for (int64_t j = 0; j < h; j++) rotate(qp + (i * h + j) * dh, cp, sp, dh);
    for (int64_t j = 0; j < hk; j++) rotate(kp + (i * hk + j) * dh, cp, sp, dh);
  }
  auto att = torch::zeros({b, h * dh}, x.options());
  float* ap = att.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  if (hl) {  // local heads: write this key/value, attend the window
    float *LK = lk_buf.data_ptr<float>(), *LV = lv_buf.data_ptr<float>();
    const int64_t cap = lk_buf.size(2);
    for (int64_t i = 0; i < b; i++)
      for (int64_t j = 0; j < hl; j++) {
        std::copy(kp + (i * hk + j) * dh, kp + (i * hk + j + 1) * dh,
                  LK + ((i * hl + j) * cap + lend) * dh);
        std::copy(vp + (i * h + j) * dh, vp + (i * h + j + 1) * dh,
                  LV + ((i * hl + j) * cap + lend) * dh);
      }
    const int64_t nk = lend - lstart + 1;
    std::vector<float> scores(nk);
    for (int64_t i = 0; i < b; i++)
      for (int64_t j = 0; j < hl; j++)
        attend_one(qp + (i * h + j) * dh, LK + ((i * hl + j) * cap + lstart) * dh, dh,
                   LV + ((i * hl + j) * cap + lstart) * dh, dh, nullptr, nk, dh, scale,
                   scores.data(), ap + (i * h + j) * dh);
  }
  if (hr) {  // routed heads: the key into its ring, the query reads its cluster's ring
    float *KR = kring.data_ptr<float>(), *VR = vring.data_ptr<float>();
    int64_t* C = cnt.data_ptr<int64_t>();
    const float *MK = m ? mem_k.data_ptr<float>() : nullptr, *MV = m ? mem_v.data_ptr<float>()
                                                                       : nullptr;
    std::vector<float> key(dh), keys((m + w) * dh), vals((m + w) * dh), scores(m + w);
    std::vector<char> allow(m + w);
    for (int64_t i = 0; i < b; i++)
      for (int64_t j = 0; j < hr; j++) {
        const float* qj = qp + (i * h + hl + j) * dh;
        if (shared_qk) {  // the key: the l2-normalised rotated query
          float nn = 0.f;
          for (int64_t c = 0; c < dh; c++) nn += qj[c] * qj[c];
          const float inv = 1.f / std::max(std::sqrt(nn), 1e-12f);
          for (int64_t c = 0; c < dh; c++) key[c] = qj[c] * inv;
        } else {
          std::copy(kp + (i * hk + hl + j) * dh, kp + (i * hk + hl + j + 1) * dh, key.data());
        }
        const int64_t ring = (i * hr + j) * k + kg[i * hr + j];
        const int64_t seen = C[ring], slot = seen % w;
        std::copy(key.begin(), key.end(), KR + (ring * w + slot) * dh);
        std::copy(vp + (i * h + hl + j) * dh, vp + (i * h + hl + j + 1) * dh,
                  VR + (ring * w + slot) * dh);
        C[ring] = seen + 1;
        const int64_t qring = shared_qk ? ring : (i * hr + j) * k + qg[i * hr + j];
        const int64_t filled = std::min<int64_t>(C[qring], w);
        bool any = false;
        for (int64_t s2 = 0; s2 < w; s2++) {
          bool ok = s2 < filled;
          if (shared_qk && s2 == slot) ok = false;  // not its own key ...
          allow[m + s2] = ok;
          any |= ok;
        }
        if (shared_qk && !any && !m) allow[m + slot] = true;  // ... unless it is alone
        for (int64_t t = 0; t < m; t++) {
          allow[t] = true;
          std::copy(MK + (j * m + t) * dh, MK + (j * m + t + 1) * dh, keys.data() + t * dh);
          std::copy(MV + (j * m + t) * dh, MV + (j * m + t + 1) * dh, vals.data() + t * dh);
        }
        std::copy(KR + qring * w * dh, KR + (qring + 1) * w * dh,
                  keys.data() + m * dh);
        std::copy(VR + qring * w * dh, VR + (qring + 1) * w * dh, vals.data() + m * dh);
        attend_one(qj, keys.data(), dh, vals.data(), dh, reinterpret_cast<bool*>(allow.data()),
                   m + w, dh, scale, scores.data(), ap + (i * h + hl + j) * dh);
      }
  }
  auto y = torch::empty({b, d}, x.options());
  linear(ap, wo, nullptr, y.data_ptr<float>(), b);
  y.add_(x);
  return {y, torch::full({}, commit, x.options())};
}

// --- DeLighT's DExTra for a few rows, mixers and shuffles folded (models/delight/dextra_decode.py)
namespace {

// y (b, n) += x (b, k) @ W (k, n), W row-major with row stride ws, x/y row strides xs/ys; each
// weight row is read once for all b rows (threads over column blocks)
void add_xw(const float* x, int64_t xs, const float* W, int64_t ws, float* y, int64_t ys,
            int64_t b, int64_t k, int64_t n) {
  at::parallel_for(0, n, 256, [&](int64_t n0, int64_t n1) {
    for (int64_t c = 0; c < k; c++) {
      const float* wc = W + c * ws;
      for (int64_t i = 0; i < b; i++) {
        const float xv = x[i * xs + c];
        float* yi = y + i * ys;
#pragma omp simd
        for (int64_t o = n0; o < n1; o++) yi[o] += xv * wc[o];
      }
    }
  });
}

enum NormKind : int64_t { kLayer = 0, kRms = 1, kScale = 2 };

// each of the rows (b * g slices of n) normed in place with one shared norm: LayerNorm (w, bias
// (n,), bias may be empty), RMSNorm (w (n,)) or ScaleNorm (w one scalar, g * y / max(|y|, eps))
void slice_norm(float* y, int64_t rows, int64_t n, int64_t kind, const Tensor& w,
                const Tensor& bias, double eps) {
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float fe = static_cast<float>(eps), fn = static_cast<float>(n);
  for (int64_t r = 0; r < rows; r++) {
    float* yr = y + r * n;
    float mean = 0.f, ss = 0.f;
    if (kind == kLayer) {
#pragma omp simd reduction(+ : mean)
      for (int64_t c = 0; c < n; c++) mean += yr[c];
      mean /= fn;
    }
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < n; c++) ss += (yr[c] - mean) * (yr[c] - mean);
    if (kind == kScale) {
      const float k = wp[0] / std::max(std::sqrt(ss), fe);
#pragma omp simd
      for (int64_t c = 0; c < n; c++) yr[c] *= k;
      continue;
    }
    const float inv = 1.f / std::sqrt(ss / fn + fe);
#pragma omp simd
    for (int64_t c = 0; c < n; c++) yr[c] = (yr[c] - mean) * inv * wp[c] + (bp ? bp[c] : 0.f);
  }
}

// in place: 0 exact GELU, 1 SiLU, 2 ReLU
void activate(float* y, int64_t n, int64_t act) {
  if (act == 0) {
    const float inv_sqrt2 = 0.70710678118654752440f;
    for (int64_t i = 0; i < n; i++) y[i] = 0.5f * y[i] * (1.f + std::erf(y[i] * inv_sqrt2));
  } else if (act == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = y[i] / (1.f + retrolm_kernels::exp_f(-y[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = y[i] > 0.f ? y[i] : 0.f;
  }
}

// a GLT kept grouped (too wide to fold): y (b, o) = shuffle(per group j: [x_j, h_j] @ W[j]) +
// bias, W (g, i/g, o/g), x (b, p), h (b, hw) (hw = 0 for GLT 1, which reads x alone); with the
// shuffle, output k of group j lands at k * g + j, else at j * o/g + k
void grouped_glt(const float* x, int64_t p, const float* h, int64_t hw, const Tensor& W,
                 const Tensor& bias, int64_t g, bool shuffle, float* y, int64_t b) {
  const int64_t pg = p / g, hg = hw / g, og = W.size(2);
  TORCH_CHECK(W.dim() == 3 && W.size(0) == g && W.size(1) == pg + hg && p % g == 0 &&
                  hw % g == 0 && bias.numel() == g * og,
              "dextra_step: a grouped GLT's weight must be (g, (p + h) / g, o / g), got ",
              W.sizes());
  const float* wp = W.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  std::vector<float> acc(og);
  for (int64_t i = 0; i < b; i++)
    for (int64_t j = 0; j < g; j++) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* wj = wp + j * (pg + hg) * og;
      add_xw(x + i * p + j * pg, 0, wj, og, acc.data(), 0, 1, pg, og);
      if (hg) add_xw(h + i * hw + j * hg, 0, wj + pg * og, og, acc.data(), 0, 1, hg, og);
      for (int64_t k = 0; k < og; k++) {
        const int64_t at = shuffle ? k * g + j : j * og + k;
        y[i * g * og + at] = acc[k] + bp[at];
      }
    }
}

}  // namespace

// DExTra (models/delight/dextra.py) for b rows in one call, with the folded weights of
// dextra_decode.fold: x = act(norm(in_w inp + in_b)) (b, p); xc = x @ X + x_bias (b, S), every
// folded layer's columns side by side; then for each GLT l (and last the output layer, index N):
//   folded (cols[l] >= 0): y = xc[:, cols : cols + widths[l]] (+ h @ weights[l], (h_w, width),
//     absent for GLT 1); kept grouped (cols[l] < 0): grouped_glt with weights[l], biases[l];
//   then the norm of each of the groups[l] slices (one for the output layer) with
//   norm_w/norm_b/eps[l + 1] (index 0: the input layer's) and the activation; h = y.
// norm_kind: 0 LayerNorm, 1 RMSNorm, 2 ScaleNorm; act: 0 GELU, 1 SiLU, 2 ReLU.
Tensor dextra_step(const Tensor& inp, const Tensor& in_w, const Tensor& in_b, int64_t norm_kind,
                   int64_t act, const std::vector<Tensor>& norm_w,
                   const std::vector<Tensor>& norm_b, const std::vector<double>& eps,
                   const Tensor& x_weight, const Tensor& x_bias, const std::vector<int64_t>& cols,
                   const std::vector<int64_t>& widths, const std::vector<int64_t>& groups,
                   const std::vector<int64_t>& shuffle, const std::vector<Tensor>& weights,
                   const std::vector<Tensor>& biases) {
  check_f32(inp, "inp");
  const int64_t b = inp.size(0), p = in_w.size(0), S = x_weight.size(1);
  const size_t layers = widths.size();  // N GLTs + the output layer
  TORCH_CHECK(layers >= 2 && cols.size() == layers && groups.size() == layers &&
                  shuffle.size() == layers && weights.size() == layers &&
                  biases.size() == layers && norm_w.size() == layers + 1 &&
                  norm_b.size() == layers + 1 && eps.size() == layers + 1,
              "dextra_step: one entry per layer in every list");
  TORCH_CHECK(norm_kind >= 0 && norm_kind <= 2 && act >= 0 && act <= 2,
              "dextra_step: unknown norm kind or activation");
  check_weight(in_w, p, inp.size(1), "in_w");
  for (auto* t : {&in_b, &x_weight, &x_bias}) check_f32(*t, "dextra_step input");
  TORCH_CHECK(x_weight.size(0) == p && x_bias.numel() == S, "dextra_step: x_weight (p, S)");
  for (size_t l = 0; l <= layers; l++) {
    check_f32(norm_w[l], "norm_w");
    if (norm_b[l].numel()) check_f32(norm_b[l], "norm_b");
  }
  const int64_t widest = *std::max_element(widths.begin(), widths.end());
  auto opts = inp.options();
  auto xb = torch::empty({b, p}, opts), xcb = torch::empty({b, S}, opts);
  auto hb = torch::empty({b, widest}, opts), yb = torch::empty({b, widest}, opts);
  float *x = xb.data_ptr<float>(), *xc = xcb.data_ptr<float>();
  float *h = hb.data_ptr<float>(), *y = yb.data_ptr<float>();
  linear(inp.data_ptr<float>(), in_w, in_b.data_ptr<float>(), x, b);
  slice_norm(x, b, p, norm_kind, norm_w[0], norm_b[0], eps[0]);
  activate(x, b * p, act);
  const float* xbias = x_bias.data_ptr<float>();
  for (int64_t i = 0; i < b; i++) std::copy(xbias, xbias + S, xc + i * S);
  add_xw(x, p, x_weight.data_ptr<float>(), S, xc, S, b, p, S);
  int64_t hw = 0;  // h's width: none before GLT 1
  for (size_t l = 0; l < layers; l++) {
    const int64_t w = widths[l], g = l + 1 < layers ? groups[l] : 1;
    if (cols[l] >= 0) {
      TORCH_CHECK(cols[l] + w <= S, "dextra_step: columns past the x product");
      for (int64_t i = 0; i < b; i++)
        std::copy(xc + i * S + cols[l], xc + i * S + cols[l] + w, y + i * w);
      if (l) {
        check_f32(weights[l], "H");
        TORCH_CHECK(weights[l].dim() == 2 && weights[l].size(0) == hw && weights[l].size(1) == w,
                    "dextra_step: H must be (", hw, ", ", w, "), got ", weights[l].sizes());
        add_xw(h, hw, weights[l].data_ptr<float>(), w, y, w, b, hw, w);
      }
    } else {
      check_f32(weights[l], "grouped weight");
      check_f32(biases[l], "grouped bias");
      grouped_glt(x, p, l ? h : nullptr, l ? hw : 0, weights[l], biases[l], g, shuffle[l] != 0, y,
                  b);
    }
    TORCH_CHECK(w % g == 0, "dextra_step: a width not a multiple of its groups");
    slice_norm(y, b * g, w / g, norm_kind, norm_w[l + 1], norm_b[l + 1], eps[l + 1]);
    activate(y, b * w, act);
    std::swap(h, y);
    hw = w;
  }
  // h holds the (b, hw) result packed at its start
  return (h == hb.data_ptr<float>() ? hb : yb).view(-1).narrow(0, 0, b * hw).view({b, hw}).clone();
}

// x + W_o attn(q, cache + k, v) + b_o for one new position per row, with q, k, v = W h + b read
// from an input h (b, e) other than x (DeLighT: h = DExTra(norm(x)), x (b, d)); wq/wk/wv
// (heads * dh, e), wo (d, heads * dh), biases of their rows or empty; kbuf/vbuf, start, end,
// cos/sin (r = 0: no rotary) as in self_attention_block.
Tensor projected_attention_block(const Tensor& x, const Tensor& hin, const Tensor& wq,
                                 const Tensor& bq, const Tensor& wk, const Tensor& bk,
                                 const Tensor& wv, const Tensor& bv, const Tensor& wo,
                                 const Tensor& bo, const Tensor& cos, const Tensor& sin,
                                 Tensor kbuf, Tensor vbuf, int64_t start, int64_t end) {
  for (auto* t : {&x, &hin, &cos, &sin}) check_f32(*t, "input");
  check_f32(kbuf, "kbuf");
  check_f32(vbuf, "vbuf");
  const int64_t b = x.size(0), d = x.size(1), e = hin.size(1), h = kbuf.size(1),
                cap = kbuf.size(2), dh = kbuf.size(3), r = cos.numel(), hd = h * dh;
  TORCH_CHECK(hin.size(0) == b && kbuf.size(0) == b && vbuf.sizes() == kbuf.sizes() &&
                  0 <= start && start <= end && end < cap && r <= dh && sin.numel() == r,
              "projected_attention_block: inconsistent shapes");
  check_weight(wq, hd, e, "wq");
  check_weight(wk, hd, e, "wk");
  check_weight(wv, hd, e, "wv");
  check_weight(wo, d, hd, "wo");
  for (auto* t : {&bq, &bk, &bv}) {
    if (t->numel()) check_f32(*t, "bias");
    TORCH_CHECK(!t->numel() || t->numel() == hd, "projected_attention_block: bias sizes");
  }
  if (bo.numel()) check_f32(bo, "bo");
  TORCH_CHECK(!bo.numel() || bo.numel() == d, "projected_attention_block: bo size");
  auto bias = [](const Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; };
  auto qkv = torch::empty({3, b, hd}, x.options());
  float* q = qkv.data_ptr<float>();
  float* k = q + b * hd;
  float* v = k + b * hd;
  const float* hp = hin.data_ptr<float>();
  linear(hp, wq, bias(bq), q, b);
  linear(hp, wk, bias(bk), k, b);
  linear(hp, wv, bias(bv), v, b);
  float* K = kbuf.data_ptr<float>();
  float* Vb = vbuf.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  rotate_and_append(q, k, v, K, Vb, b * h, dh, cap, end, cp, sp, r);
  auto att = torch::empty({b, hd}, x.options());
  float* ap = att.data_ptr<float>();
  attend_cache(q, K, Vb, b * h, dh, cap, start, end, ap, false);
  auto y = torch::empty({b, d}, x.options());
  linear(ap, wo, bias(bo), y.data_ptr<float>(), b);
  y.add_(x);
  return y;
}

// sigma(q) M / max(sigma(q) z, 1e-10) for each of `rows` queries q (dk each), sigma = ELU + 1,
// with its own M (dk, dv) and z (dk) (models/infini/memory.py, eq. 3) into out (rows, dv)
void memory_read(const float* q, const float* M, const float* z, int64_t rows, int64_t dk,
                 int64_t dv, float* out) {
  std::vector<float> sq(dk);
  for (int64_t i = 0; i < rows; i++) {
    const float* qi = q + i * dk;
    const float* Mi = M + i * dk * dv;
    const float* zi = z + i * dk;
    float den = 0.f;
    for (int64_t c = 0; c < dk; c++) {
      sq[c] = qi[c] > 0.f ? qi[c] + 1.f : std::exp(qi[c]);  // ELU(q) + 1
      den += sq[c] * zi[c];
    }
    float* o = out + i * dv;
    std::fill(o, o + dv, 0.f);
    for (int64_t c = 0; c < dk; c++) {
      const float s = sq[c];
      const float* row = Mi + c * dv;
#pragma omp simd
      for (int64_t e = 0; e < dv; e++) o[e] += s * row[e];
    }
    const float inv = 1.f / std::max(den, 1e-10f);
    for (int64_t e = 0; e < dv; e++) o[e] *= inv;
  }
}

// Infini-attention (models/infini) for one new position per row: x + W_o [g A_local +
// (1 - g) A_mem] per head, g = sigmoid(gates) (h,), with q, k, v = W_{q,k,v} rmsnorm(x).
//   A_local: rotary on q and k, this position's k/v written at slot `end` of kbuf/vbuf
//     (b, h, cap, dh), the query attends slots start … end (as in self_attention_block);
//   A_mem: memory_read of the unrotated q with M (b, h, dh, dh) and z (b, h, dh) float32; an
//     empty M reads 0 (no past memory);
//   what the segment's memory write needs later (the caller writes once the segment is
//     complete): the unrotated k at slot raw_end of rkbuf (b, h, rcap, dh) and the write
//     strength beta = sigmoid(wbeta n + bbeta) (wbeta (h, d), bbeta (h,)), or 1 when wbeta is
//     empty, at slot raw_end of rbbuf (b, h, rcap, 1).
Tensor infini_attention_block(const Tensor& x, const Tensor& norm_w, double eps, const Tensor& wq,
                              const Tensor& wk, const Tensor& wv, const Tensor& wo,
                              const Tensor& cos, const Tensor& sin, Tensor kbuf, Tensor vbuf,
                              int64_t start, int64_t end, const Tensor& mem, const Tensor& mem_z,
                              const Tensor& gates, Tensor rkbuf, Tensor rbbuf, int64_t raw_end,
                              const Tensor& wbeta, const Tensor& bbeta) {
  for (auto* t : {&x, &norm_w, &cos, &sin, &gates}) check_f32(*t, "input");
  for (auto* t : {&kbuf, &vbuf, &rkbuf, &rbbuf}) check_f32(*t, "cache buffer");
  const int64_t b = x.size(0), d = x.size(1), h = kbuf.size(1), cap = kbuf.size(2),
                dh = kbuf.size(3), r = cos.numel(), hd = h * dh, rcap = rkbuf.size(2);
  TORCH_CHECK(kbuf.size(0) == b && vbuf.sizes() == kbuf.sizes() && 0 <= start &&
                  start <= end && end < cap && r <= dh && sin.numel() == r &&
                  gates.numel() == h && rkbuf.size(0) == b && rkbuf.size(1) == h &&
                  rkbuf.size(3) == dh && rbbuf.size(0) == b && rbbuf.size(1) == h &&
                  rbbuf.size(2) == rcap && rbbuf.size(3) == 1 && 0 <= raw_end && raw_end < rcap,
              "infini_attention_block: inconsistent shapes");
  const bool has_mem = mem.numel() > 0, learned = wbeta.numel() > 0;
  if (has_mem) {
    check_f32(mem, "mem");
    check_f32(mem_z, "mem_z");
    TORCH_CHECK(mem.numel() == b * h * dh * dh && mem_z.numel() == b * hd,
                "infini_attention_block: the memory must be (b, h, dh, dh) and (b, h, dh)");
  }
  check_weight(wq, hd, d, "wq");
  check_weight(wk, hd, d, "wk");
  check_weight(wv, hd, d, "wv");
  check_weight(wo, d, hd, "wo");
  if (learned) {
    check_weight(wbeta, h, d, "wbeta");
    check_f32(bbeta, "bbeta");
    TORCH_CHECK(bbeta.numel() == h, "infini_attention_block: bbeta must be (h,)");
  }
  auto n = torch::empty({b, d}, x.options());
  auto qkv = torch::empty({3, b, hd}, x.options());
  check_f32(norm_w, "norm_w");
  rms_norm(x.data_ptr<float>(), norm_w.data_ptr<float>(), eps, n.data_ptr<float>(), b, d);
  float* q = qkv.data_ptr<float>();
  float* k = q + b * hd;
  float* v = k + b * hd;
  linear(n.data_ptr<float>(), wq, nullptr, q, b);
  linear(n.data_ptr<float>(), wk, nullptr, k, b);
  linear(n.data_ptr<float>(), wv, nullptr, v, b);
  // the memory's part, from the unrotated q and k, before rotate_and_append rotates them
  auto mem_out = torch::zeros({b, hd}, x.options());
  float* mp = mem_out.data_ptr<float>();
  if (has_mem)
    memory_read(q, mem.data_ptr<float>(), mem_z.data_ptr<float>(), b * h, dh, dh, mp);
  std::vector<float> beta(b * h, 1.f);
  if (learned) {
    linear(n.data_ptr<float>(), wbeta, bbeta.data_ptr<float>(), beta.data(), b);
    for (auto& e : beta) e = 1.f / (1.f + std::exp(-e));
  }
  float* RK = rkbuf.data_ptr<float>();
  float* RB = rbbuf.data_ptr<float>();
  for (int64_t i = 0; i < b * h; i++) {
    std::copy(k + i * dh, k + (i + 1) * dh, RK + (i * rcap + raw_end) * dh);
    RB[i * rcap + raw_end] = beta[i];
  }
  float* K = kbuf.data_ptr<float>();
  float* Vb = vbuf.data_ptr<float>();
  rotate_and_append(q, k, v, K, Vb, b * h, dh, cap, end, cos.data_ptr<float>(),
                    sin.data_ptr<float>(), r);
  auto att = torch::empty({b, hd}, x.options());
  float* ap = att.data_ptr<float>();
  attend_cache(q, K, Vb, b * h, dh, cap, start, end, ap, true);
  const float* gp = gates.data_ptr<float>();
  for (int64_t i = 0; i < b * h; i++) {
    const float g = 1.f / (1.f + std::exp(-gp[i % h]));
    for (int64_t c = 0; c < dh; c++) ap[i * dh + c] = g * ap[i * dh + c] + (1.f - g) * mp[i * dh + c];
  }
  auto y = torch::empty({b, d}, x.options());
  linear(ap, wo, nullptr, y.data_ptr<float>(), b);
  y.add_(x);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("self_attention_block", &self_attention_block);
  m.def("cross_attention_block", &cross_attention_block);
  m.def("feed_forward_block", &feed_forward_block);
  m.def("routing_attention_block", &routing_attention_block);
  m.def("dextra_step", &dextra_step);
  m.def("projected_attention_block", &projected_attention_block);
  m.def("infini_attention_block", &infini_attention_block);
}
