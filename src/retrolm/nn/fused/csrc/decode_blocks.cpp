// Fused one-token decoding blocks for CPU, fp32 (see retrolm/nn/fused_decode.py): pre-norm
// self-attention, cross-attention and feed-forward blocks, and the Routing Transformer's
// attention sub-layer.
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

#include <cmath>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <limits>
#include <tuple>
#include <vector>

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
  for (int64_t i = 0; i < b * h; i++) {  // rotate q and k, append k and v to the cache
    rotate(q + i * dh, cp, sp, r);
    rotate(k + i * dh, cp, sp, r);
    std::copy(k + i * dh, k + (i + 1) * dh, K + (i * cap + end) * dh);
    std::copy(v + i * dh, v + (i + 1) * dh, Vb + (i * cap + end) * dh);
  }
  auto att = torch::empty({b, hd}, x.options());
  float* ap = att.data_ptr<float>();
  const int64_t nk = end - start + 1;
  const float scale = 1.f / std::sqrt(static_cast<float>(dh));
  at::parallel_for(0, b * h, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(nk);
    for (int64_t i = i0; i < i1; i++)
      attend_one(q + i * dh, K + (i * cap + start) * dh, dh, Vb + (i * cap + start) * dh, dh,
                 nullptr, nk, dh, scale, scores.data(), ap + i * dh);
  });
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
// (w2's rows) may differ from x's.
std::tuple<Tensor, Tensor> feed_forward_block(const Tensor& x, const Tensor& norm_w,
                                              const Tensor& norm_b, double eps, const Tensor& w1,
                          const Tensor& b1, const Tensor& w2, const Tensor& b2, int64_t act,
                          bool residual, const Tensor& shift_past, int64_t shift_from) {
  check_f32(x, "x");
  const int64_t b = x.size(0), d = x.size(1), hid = w1.size(0), out = w2.size(0);
  check_weight(w1, hid, d, "w1");
  check_weight(w2, out, hid, "w2");
  TORCH_CHECK((!residual || out == d) && (act == 0 || act == 1),
              "feed_forward_block: inconsistent shapes");
  for (auto* t : {&b1, &b2}) if (t->numel()) check_f32(*t, "bias");
  TORCH_CHECK((!b1.numel() || b1.numel() == hid) && (!b2.numel() || b2.numel() == out),
              "feed_forward_block: bias sizes");
  auto n = torch::empty({b, d}, x.options());
  auto hbuf = torch::empty({b, hid}, x.options());
  auto next = norm_and_shift(x, norm_w, norm_b, eps, shift_past, shift_from, n.data_ptr<float>());
  float* hp = hbuf.data_ptr<float>();
  linear(n.data_ptr<float>(), w1, b1.numel() ? b1.data_ptr<float>() : nullptr, hp, b);
  if (act == 0) {
    const float inv_sqrt2 = 0.70710678118654752440f;
    for (int64_t i = 0; i < b * hid; i++)
      hp[i] = 0.5f * hp[i] * (1.f + std::erf(hp[i] * inv_sqrt2));
  } else {
    for (int64_t i = 0; i < b * hid; i++) hp[i] = hp[i] / (1.f + std::exp(-hp[i]));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("self_attention_block", &self_attention_block);
  m.def("cross_attention_block", &cross_attention_block);
  m.def("feed_forward_block", &feed_forward_block);
  m.def("routing_attention_block", &routing_attention_block);
}
