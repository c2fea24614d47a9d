// Fused training kernels (CPU): the memory-bound steps between a transformer's matmuls,
// each one pass over its rows in the forward and one in the backward.
//
//   norm_shift_forward / _backward  RMSNorm or LayerNorm (with an optional bias) of x
//       (b, n, d) (float32 or bfloat16 with float32 parameters, or float64 throughout),
//       then a token shift: channels [split, d) of position t take the normed row t - shift
//       (zeros for t < shift), the others their own row; the result in any of float32 / float64 / bfloat16 (the dtype
//       the next matmul reads under autocast, so no separate cast), optionally written in
//       the sub-sequence-major layout of `axial` interleaved sub-sequences; per row 1/rms
//       (or 1/std, and the mean) saved.
//   rotary_forward / _backward  rotary embedding, "half" layout (channel c pairs with
//       c + r/2), of x (B, H, I, D) with any strides but a unit last one, by (I, r) fp32
//       cos/sin tables; channels [r, D) pass through.
//   cross_entropy_forward / _backward  per-row log-softmax cross-entropy of (N, V) logits
//       with an ignore label: the loss and log-sum-exp per row, then softmax minus one-hot
//       written straight in the logits' dtype.
//   gelu_forward / _backward  exact GELU of bf16 by 65,536-entry tables (computed once in
//       double); the backward also returns the column sums of its result (a bias gradient).
//   kmeans_assign / _backward  spherical k-means assignment of rows (nearest unit centroid,
//       its similarity, the clusters' sums and counts) without writing the unit vectors.
//   l2norm_forward / _backward  x / max(|x|, eps) per row of (B, H, I, D) with any strides
//       but a unit last one, the result in a chosen dtype (fp32 from bf16 for k-means).
//
// Arithmetic in float32 (float64 for float64 inputs); bfloat16 results are rounded to
// nearest even once, as a cast of the float32 value would be.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

using torch::Tensor;

namespace {

using namespace retrolm_kernels;

constexpr int64_t kRowGrain = 8;  // rows per task


// --- RMSNorm / LayerNorm + token shift---------------------------------------------------
// Row of the result that input row r = (sequence i, position t) goes to: r itself, or with
// `axial` a > 1 the sub-sequence-major layout (i a + t mod a, t / a) of a (b a, n / a, d)
// result, the interleaved sub-sequences of the hierarchical model's streams.
inline int64_t out_row(int64_t r, int64_t n, int64_t axial) {
  if (axial == 1) return r;
  const int64_t i = r / n, t = r % n;
  return (i * axial + t % axial) * (n / axial) + t / axial;
}

// x_t: the input (float, double or bf16); w_t: the weight and the statistics' type (float,
// or double for double x); out_t / g_t: the result's and its gradient's type.
template <typename x_t, typename w_t, typename out_t>
void norm_shift_fwd(const x_t* x, const w_t* w, const w_t* bias, double eps, int64_t b,
                    int64_t n, int64_t d, int64_t shift, int64_t split, int64_t axial, out_t* y,
                    w_t* rstd, w_t* mean) {
  using acc_t = w_t;
  const int64_t rows = b * n;
  // mean != null: LayerNorm (x - mean) / std * w + bias; else RMSNorm x / rms * w
  at::parallel_for(0, rows, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const x_t* xr = x + r * d;
      acc_t mu = 0;
      if (mean) {
#pragma omp simd reduction(+ : mu)
        for (int64_t c = 0; c < d; c++) mu += load<acc_t>(xr, c);
        mu /= static_cast<acc_t>(d);
        mean[r] = mu;
      }
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < d; c++) ss += (load<acc_t>(xr, c) - mu) * (load<acc_t>(xr, c) - mu);
      rstd[r] = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
    }
  });
  at::parallel_for(0, rows, kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const int64_t t = r % n;
      const x_t* xr = x + r * d;
      out_t* yr = y + out_row(r, n, axial) * d;
      const acc_t s0 = rstd[r], m0 = mean ? mean[r] : acc_t(0);
      if (bias) {
#pragma omp simd
        for (int64_t c = 0; c < split; c++)
          store(yr, c, (load<acc_t>(xr, c) - m0) * s0 * w[c] + bias[c]);
      } else {
#pragma omp simd
        for (int64_t c = 0; c < split; c++) store(yr, c, (load<acc_t>(xr, c) - m0) * s0 * w[c]);
      }
      if (t >= shift) {
        const x_t* xp = x + (r - shift) * d;
        const acc_t s1 = rstd[r - shift], m1 = mean ? mean[r - shift] : acc_t(0);
        if (bias) {
#pragma omp simd
          for (int64_t c = split; c < d; c++)
            store(yr, c, (load<acc_t>(xp, c) - m1) * s1 * w[c] + bias[c]);
        } else {
#pragma omp simd
          for (int64_t c = split; c < d; c++)
            store(yr, c, (load<acc_t>(xp, c) - m1) * s1 * w[c]);
        }
      } else {
#pragma omp simd
        for (int64_t c = split; c < d; c++) store(yr, c, acc_t(0));
      }
    }
  });
}

// grad of x, of w and of the bias; g (b, n, d) is the gradient of the shifted output; mean:
// the forward's (LayerNorm) or null (RMSNorm)
template <typename x_t, typename w_t, typename g_t>
void norm_shift_bwd(const g_t* g, const x_t* x, const w_t* w, const w_t* rstd, const w_t* mean,
                    int64_t b, int64_t n, int64_t d, int64_t shift, int64_t split, int64_t axial,
                    x_t* gx, w_t* gw, w_t* gb) {
  using acc_t = w_t;
  const int64_t rows = b * n;
  const int64_t threads = at::get_num_threads();
  // per-thread sums of g * xhat (the weight's gradient) and of g (the bias's)
  std::vector<acc_t> part(2 * threads * d, acc_t(0));
  acc_t* const parts = part.data();
  // (captured by value: with references to the sizes and pointers the inner loops reloaded
  // them and ran ~2.5x slower)
  at::parallel_for(0, rows, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    acc_t* pk = parts + at::get_thread_num() * 2 * d;
    acc_t* pb = pk + d;
    for (int64_t r = r0; r < r1; r++) {
      const int64_t t = r % n;
      // the gradient reaching normed row r: channels [0, split) from its own output row,
      // [split, d) from the output row `shift` later (none past the end)
      const g_t* g0 = g + out_row(r, n, axial) * d;
      const bool later = t + shift < n;
      const g_t* g1 = later ? g + out_row(r + shift, n, axial) * d : g0;
      const int64_t hi = later ? d : split;  // channels that reached an output
      const x_t* xr = x + r * d;
      const acc_t s = rstd[r], mu = mean ? mean[r] : acc_t(0);
      acc_t dot = 0, gsum = 0;  // sum_c gy w xhat, sum_c gy w
#pragma omp simd reduction(+ : dot, gsum)
      for (int64_t c = 0; c < hi; c++) {
        const acc_t xh = (load<acc_t>(xr, c) - mu) * s;
        const acc_t gy = c < split ? load<acc_t>(g0, c) : load<acc_t>(g1, c);
        pk[c] += gy * xh;
        pb[c] += gy;
        dot += gy * w[c] * xh;
        gsum += gy * w[c];
      }
      const acc_t m = dot / static_cast<acc_t>(d);
      const acc_t mg = mean ? gsum / static_cast<acc_t>(d) : acc_t(0);
      x_t* gxr = gx + r * d;
#pragma omp simd
      for (int64_t c = 0; c < split; c++)
        store(gxr, c, s * (load<acc_t>(g0, c) * w[c] - mg - (load<acc_t>(xr, c) - mu) * s * m));
      if (later) {
#pragma omp simd
        for (int64_t c = split; c < d; c++)
          store(gxr, c,
                s * (load<acc_t>(g1, c) * w[c] - mg - (load<acc_t>(xr, c) - mu) * s * m));
      } else {  // these channels reached no output: only the normalisation's terms
#pragma omp simd
        for (int64_t c = split; c < d; c++)
          store(gxr, c, -s * (mg + (load<acc_t>(xr, c) - mu) * s * m));
      }
    }
  });
  for (int64_t c = 0; c < d; c++) {
    acc_t sw = 0, sb = 0;
    for (int64_t k = 0; k < threads; k++) {
      sw += part[k * 2 * d + c];
      sb += part[k * 2 * d + d + c];
    }
    gw[c] = sw;
    if (gb) gb[c] = sb;
  }
}

void check_norm_args(const Tensor& x, const Tensor& w, int64_t shift, int64_t split,
                     int64_t axial) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && x.is_contiguous(),
              "norm_shift: x must be a contiguous (b, n, d) CPU tensor");
  const bool f64 = x.scalar_type() == torch::kFloat64;
  TORCH_CHECK(f64 || x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "norm_shift: x must be float32, bfloat16 or float64");
  TORCH_CHECK(w.scalar_type() == (f64 ? torch::kFloat64 : torch::kFloat32) && w.is_contiguous() &&
                  w.dim() == 1 && w.size(0) == x.size(2),
              "norm_shift: weight must be a contiguous (d,) float32 tensor (float64 for float64 x)");
  TORCH_CHECK(shift >= 0 && split >= 0 && split <= x.size(2),
              "norm_shift: need shift >= 0 and 0 <= split <= d");
  TORCH_CHECK(axial >= 1 && x.size(1) % axial == 0,
              "norm_shift: axial must be >= 1 and divide the sequence length");
}

// calls f(T*) typed by a dtype among float, double, bf16
template <typename F>
void with_dtype(c10::ScalarType t, F&& f) {
  switch (t) {
    case torch::kFloat32: f(static_cast<float*>(nullptr)); break;
    case torch::kFloat64: f(static_cast<double*>(nullptr)); break;
    case torch::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// calls f(x_t*) with x's data as its C++ type (float, double or bf16)
template <typename F>
void with_x(const Tensor& x, F&& f) {
  with_dtype(x.scalar_type(), [&](auto* t) {
    using T = std::remove_pointer_t<decltype(t)>;
    f(x.data_ptr<T>());
  });
}

// bias / mean: optional (LayerNorm); without a mean tensor the norm is RMSNorm
std::tuple<Tensor, Tensor, Tensor> norm_shift_forward(const Tensor& x, const Tensor& w,
                                                      const std::optional<Tensor>& bias,
                                                      double eps, int64_t shift, int64_t split,
                                                      c10::ScalarType out_dtype, int64_t axial,
                                                      bool layer) {
  check_norm_args(x, w, shift, split, axial);
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == w.scalar_type() && bias->is_contiguous() &&
                    bias->sizes() == w.sizes(),
                "norm_shift: bias must be shaped and typed like the weight");
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2);
  const bool f64 = x.scalar_type() == torch::kFloat64;
  TORCH_CHECK(f64 ? out_dtype == torch::kFloat64
                  : (out_dtype == torch::kFloat32 || out_dtype == torch::kBFloat16),
              "norm_shift: results are float32 or bfloat16 (float64 for float64 x)");
  Tensor y = torch::empty({b * axial, n / axial, d}, x.options().dtype(out_dtype));
  Tensor rstd = torch::empty({b, n}, w.options());
  Tensor mean = layer ? torch::empty({b, n}, w.options()) : torch::empty({0}, w.options());
  with_x(x, [&](auto* xp) {
    using x_t = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    if constexpr (std::is_same_v<x_t, double>) {
      norm_shift_fwd(xp, w.data_ptr<double>(), bias ? bias->data_ptr<double>() : nullptr, eps,
                     b, n, d, shift, split, axial, y.data_ptr<double>(),
                     rstd.data_ptr<double>(), layer ? mean.data_ptr<double>() : nullptr);
    } else {
      with_x(y, [&](auto* yp) {
        using y_t = std::remove_pointer_t<decltype(yp)>;
        if constexpr (!std::is_same_v<y_t, double>)
          norm_shift_fwd(xp, w.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                         eps, b, n, d, shift, split, axial, yp, rstd.data_ptr<float>(),
                         layer ? mean.data_ptr<float>() : nullptr);
      });
    }
  });
  return {y, rstd, mean};
}

// -> (grad x, grad w, grad bias: empty unless has_bias)
std::tuple<Tensor, Tensor, Tensor> norm_shift_backward(const Tensor& g, const Tensor& x,
                                                       const Tensor& w, const Tensor& rstd,
                                                       const Tensor& mean, int64_t shift,
                                                       int64_t split, int64_t axial,
                                                       bool has_bias) {
  check_norm_args(x, w, shift, split, axial);
  TORCH_CHECK(g.numel() == x.numel() && g.size(-1) == x.size(2) && g.is_contiguous(),
              "norm_shift: the gradient must be contiguous and shaped like the result");
  const bool f64 = x.scalar_type() == torch::kFloat64;
  TORCH_CHECK(f64 ? g.scalar_type() == torch::kFloat64
                  : (g.scalar_type() == torch::kFloat32 || g.scalar_type() == torch::kBFloat16),
              "norm_shift: gradients are float32 or bfloat16 (float64 for float64 x)");
  TORCH_CHECK(rstd.scalar_type() == w.scalar_type() && rstd.numel() == x.size(0) * x.size(1),
              "norm_shift: rstd must be the forward's");
  const bool layer = mean.numel() > 0;
  TORCH_CHECK(!layer || (mean.scalar_type() == w.scalar_type() && mean.numel() == rstd.numel()),
              "norm_shift: mean must be the forward's");
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2);
  Tensor gx = torch::empty_like(x);
  Tensor gw = torch::empty_like(w);
  Tensor gb = has_bias ? torch::empty_like(w) : torch::empty({0}, w.options());
  with_x(x, [&](auto* xp) {
    using x_t = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    if constexpr (std::is_same_v<x_t, double>) {
      norm_shift_bwd(g.data_ptr<double>(), xp, w.data_ptr<double>(), rstd.data_ptr<double>(),
                     layer ? mean.data_ptr<double>() : nullptr, b, n, d, shift, split, axial,
                     gx.data_ptr<x_t>(), gw.data_ptr<double>(),
                     has_bias ? gb.data_ptr<double>() : nullptr);
    } else {
      with_x(g, [&](auto* gp) {
        using g_t = std::remove_pointer_t<decltype(gp)>;
        if constexpr (!std::is_same_v<g_t, double>)
          norm_shift_bwd(gp, xp, w.data_ptr<float>(), rstd.data_ptr<float>(),
                         layer ? mean.data_ptr<float>() : nullptr, b, n, d, shift, split, axial,
                         gx.data_ptr<x_t>(), gw.data_ptr<float>(),
                         has_bias ? gb.data_ptr<float>() : nullptr);
      });
    }
  });
  return {gx, gw, gb};
}

// --- rotary ------------------------------------------------------------------------------
// out = x cos + partner(x) sign sin, partner(x)[c] = x[c + h], partner(x)[c + h] = x[c],
// sign -1 on the first half (h = r / 2). The backward is the transposed rotation:
// gx[c] = g[c] cos[c] + g[c + h] sin[c + h], gx[c + h] = g[c + h] cos[c + h] - g[c] sin[c].
template <typename T, bool kBackward>
void rotary_impl(const Tensor& x, const Tensor& cos, const Tensor& sin, Tensor& y) {
  using acc_t = typename Acc<T>::type;
  const int64_t B = x.size(0), H = x.size(1), I = x.size(2), D = x.size(3), r = cos.size(1);
  const int64_t h = r / 2;
  const auto xs = x.strides(), ys = y.strides();
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, B * H * I, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    std::vector<acc_t> buf(r);
    for (int64_t row = r0; row < r1; row++) {
      // rows in (b, i, h) order: a position's cos/sin row serves its heads from L1 (head by
      // head, the (I, r) tables went through memory once per head: most of the pass)
      const int64_t hh = row % H, i = (row / H) % I, bb = row / (H * I);
      const T* xr = xp + bb * xs[0] + hh * xs[1] + i * xs[2];
      T* yr = yp + bb * ys[0] + hh * ys[1] + i * ys[2];
      const float* cr = cp + i * r;
      const float* sr = sp + i * r;
      acc_t* a = buf.data();  // first halves of the pairs, then the second halves
      acc_t* p = a + h;
#pragma omp simd
      for (int64_t c = 0; c < r; c++) a[c] = load<acc_t>(xr, c);
#pragma omp simd
      for (int64_t c = 0; c < h; c++) {
        const acc_t x1 = a[c], x2 = p[c];
        if (kBackward) {
          store(yr, c, x1 * cr[c] + x2 * sr[c + h]);
          store(yr, c + h, x2 * cr[c + h] - x1 * sr[c]);
        } else {
          store(yr, c, x1 * cr[c] - x2 * sr[c]);
          store(yr, c + h, x2 * cr[c + h] + x1 * sr[c + h]);
        }
      }
      for (int64_t c = r; c < D; c++) yr[c] = xr[c];
    }
  });
}

template <bool kBackward>
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1,
              "rotary: x must be a (B, H, I, D) CPU tensor with a unit last stride");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == x.size(2) &&
                  cos.size(1) % 2 == 0 && cos.size(1) <= x.size(3),
              "rotary: cos/sin must be contiguous float32 (I, r) tables, r even and <= D");
  Tensor y = torch::empty_like(x);  // the same memory layout as x
  switch (x.scalar_type()) {
    case torch::kFloat32: rotary_impl<float, kBackward>(x, cos, sin, y); break;
    case torch::kFloat64: rotary_impl<double, kBackward>(x, cos, sin, y); break;
    case torch::kBFloat16: rotary_impl<c10::BFloat16, kBackward>(x, cos, sin, y); break;
    default: TORCH_CHECK(false, "rotary: x must be float32, float64 or bfloat16");
  }
  return y;
}

// --- cross-entropy over rows of logits ---------------------------------------------------
// forward: (per-row loss lse - logit[label], 0 where label == ignore; per-row lse), in float32
// (float64 for float64 logits); backward: dlogits = (softmax - onehot) * scale[row], in the
// logits' dtype (scale: d loss / d row loss, 0 for ignored rows)
template <typename T>
void ce_fwd(const T* x, const int64_t* labels, int64_t ignore, int64_t rows, int64_t V,
            typename Acc<T>::type* loss, typename Acc<T>::type* lse) {
  using acc_t = typename Acc<T>::type;
  at::parallel_for(0, rows, kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const T* xr = x + r * V;
      acc_t m = load<acc_t>(xr, 0);
      for (int64_t c = 1; c < V; c++) m = std::max(m, load<acc_t>(xr, c));
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < V; c++) sum += exp_f(load<acc_t>(xr, c) - m);
      lse[r] = m + std::log(sum);
      const int64_t lab = labels[r];
      if (lab == ignore) {
        loss[r] = 0;
      } else {
        TORCH_CHECK(lab >= 0 && lab < V, "cross_entropy: label ", lab, " outside [0, ", V, ")");
        loss[r] = lse[r] - load<acc_t>(xr, lab);
      }
    }
  });
}

template <typename T>
void ce_bwd(const typename Acc<T>::type* scale, const T* x, const int64_t* labels, int64_t ignore,
            const typename Acc<T>::type* lse, int64_t rows, int64_t V, T* gx) {
  using acc_t = typename Acc<T>::type;
  at::parallel_for(0, rows, kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const T* xr = x + r * V;
      T* gr = gx + r * V;
      const acc_t sc = labels[r] == ignore ? acc_t(0) : scale[r], l = lse[r];
#pragma omp simd
      for (int64_t c = 0; c < V; c++) store(gr, c, exp_f(load<acc_t>(xr, c) - l) * sc);
      if (labels[r] != ignore) store(gr, labels[r], (exp_f(load<acc_t>(xr, labels[r]) - l) - 1) * sc);
    }
  });
}

void check_ce_args(const Tensor& logits, const Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous() &&
                  logits.size(1) > 0,
              "cross_entropy: logits must be a contiguous (N, V) CPU tensor");
  TORCH_CHECK(labels.scalar_type() == torch::kInt64 && labels.is_contiguous() && labels.dim() == 1 &&
                  labels.size(0) == logits.size(0),
              "cross_entropy: labels must be a contiguous (N,) int64 tensor");
}

std::tuple<Tensor, Tensor> cross_entropy_forward(const Tensor& logits, const Tensor& labels,
                                                 int64_t ignore) {
  check_ce_args(logits, labels);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  Tensor loss = torch::empty({N}, logits.options().dtype(acc));
  Tensor lse = torch::empty({N}, logits.options().dtype(acc));
  with_x(logits, [&](auto* xp) {
    using x_t = std::remove_pointer_t<decltype(xp)>;
    using acc_t = typename Acc<x_t>::type;
    ce_fwd(xp, labels.data_ptr<int64_t>(), ignore, N, V, loss.data_ptr<acc_t>(),
           lse.data_ptr<acc_t>());
  });
  return {loss, lse};
}

Tensor cross_entropy_backward(const Tensor& scale, const Tensor& logits, const Tensor& labels,
                              const Tensor& lse, int64_t ignore) {
  check_ce_args(logits, labels);
  TORCH_CHECK(scale.is_contiguous() && scale.numel() == logits.size(0) &&
                  scale.scalar_type() == lse.scalar_type(),
              "cross_entropy: scale must be a contiguous (N,) tensor of lse's dtype");
  const int64_t N = logits.size(0), V = logits.size(1);
  Tensor gx = torch::empty_like(logits);
  with_x(logits, [&](auto* xp) {
    using x_t = std::remove_pointer_t<decltype(xp)>;
    using acc_t = typename Acc<x_t>::type;
    ce_bwd(scale.data_ptr<acc_t>(), xp, labels.data_ptr<int64_t>(), ignore,
           lse.data_ptr<acc_t>(), N, V, gx.data_ptr<x_t>());
  });
  return gx;
}



// --- l2 normalisation of rows ------------------------------------------------------------
// y = x / max(|x|, eps) per row of a (B, H, I, D) tensor with a unit last stride, the result
// in out's dtype; inv = 1 / max(|x|, eps) per row, negative where the clamp took eps (there
// the gradient is g / eps, else inv (g - y (g . y))).
template <typename T, typename out_t>
void l2norm_fwd(const Tensor& x, double eps, Tensor& y, Tensor& inv) {
  using acc_t = typename Acc<T>::type;
  const int64_t B = x.size(0), H = x.size(1), I = x.size(2), D = x.size(3);
  const auto xs = x.strides();
  const T* xp = x.data_ptr<T>();
  out_t* yp = y.data_ptr<out_t>();
  acc_t* ip = inv.data_ptr<acc_t>();
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, B * H * I, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      const int64_t i = row % I, bh = row / I;
      const T* xr = xp + (bh / H) * xs[0] + (bh % H) * xs[1] + i * xs[2];
      ip[row] = inv_norm(xr, D, e);
      const acc_t k = std::abs(ip[row]);
      out_t* yr = yp + row * D;
#pragma omp simd
      for (int64_t c = 0; c < D; c++) store(yr, c, load<acc_t>(xr, c) * k);
    }
  });
}

template <typename T, typename g_t>
void l2norm_bwd(const Tensor& g, const Tensor& x, const Tensor& inv, Tensor& gx) {
  using acc_t = typename Acc<T>::type;
  const int64_t B = x.size(0), H = x.size(1), I = x.size(2), D = x.size(3);
  const auto xs = x.strides(), gs = g.strides();
  const T* xp = x.data_ptr<T>();
  const g_t* gp = g.data_ptr<g_t>();
  const acc_t* ip = inv.data_ptr<acc_t>();
  T* op = gx.data_ptr<T>();
  at::parallel_for(0, B * H * I, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      const int64_t i = row % I, bh = row / I, b = bh / H, h = bh % H;
      const T* xr = xp + b * xs[0] + h * xs[1] + i * xs[2];
      const g_t* gr = gp + b * gs[0] + h * gs[1] + i * gs[2];
      T* orow = op + row * D;
      const acc_t k = ip[row];
      if (k < 0) {  // clamped: y = x / eps
#pragma omp simd
        for (int64_t c = 0; c < D; c++) store(orow, c, load<acc_t>(gr, c) * -k);
        continue;
      }
      acc_t dot = 0;  // g . y
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < D; c++) dot += load<acc_t>(gr, c) * load<acc_t>(xr, c) * k;
#pragma omp simd
      for (int64_t c = 0; c < D; c++)
        store(orow, c, k * (load<acc_t>(gr, c) - load<acc_t>(xr, c) * k * dot));
    }
  });
}

std::tuple<Tensor, Tensor> l2norm_forward(const Tensor& x, double eps,
                                          c10::ScalarType out_dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1,
              "l2norm: x must be a (B, H, I, D) CPU tensor with a unit last stride");
  const bool f64 = x.scalar_type() == torch::kFloat64;
  TORCH_CHECK(f64 == (out_dtype == torch::kFloat64), "l2norm: float64 in and out, or neither");
  Tensor y = torch::empty(x.sizes(), x.options().dtype(out_dtype));
  Tensor inv = torch::empty({x.size(0) * x.size(1) * x.size(2)},
                            x.options().dtype(f64 ? torch::kFloat64 : torch::kFloat32));
  with_dtype(x.scalar_type(), [&](auto* xt) {
    using T = std::remove_pointer_t<decltype(xt)>;
    with_dtype(out_dtype, [&](auto* ot) {
      using O = std::remove_pointer_t<decltype(ot)>;
      if constexpr (std::is_same_v<T, double> == std::is_same_v<O, double>)
        l2norm_fwd<T, O>(x, eps, y, inv);
    });
  });
  return {y, inv};
}

Tensor l2norm_backward(const Tensor& g, const Tensor& x, const Tensor& inv) {
  TORCH_CHECK(g.sizes() == x.sizes() && g.stride(3) == 1 && x.stride(3) == 1,
              "l2norm: the gradient must be shaped like x, with a unit last stride");
  Tensor gx = torch::empty(x.sizes(), x.options());
  with_dtype(x.scalar_type(), [&](auto* xt) {
    using T = std::remove_pointer_t<decltype(xt)>;
    with_dtype(g.scalar_type(), [&](auto* gt) {
      using G = std::remove_pointer_t<decltype(gt)>;
      if constexpr (std::is_same_v<T, double> == std::is_same_v<G, double>)
        l2norm_bwd<T, G>(g, x, inv, gx);
    });
  });
  return gx;
}

// --- GELU of bf16 by table ------------------------------------------------------------
// A bf16 input has 65,536 possible values, so exact GELU (0.5 x (1 + erf(x / sqrt 2))) and
// its slope are tables computed once in double: the forward is one lookup per element (the
// bf16 result rounded once from the exact value), the backward one lookup and one multiply,
// with the bias gradient (the column sums of its result) in the same pass.
struct GeluTables {
  std::vector<uint16_t> value;  // bf16 bits of gelu(x)
  std::vector<float> slope;     // gelu'(x)
  GeluTables() : value(65536), slope(65536) {
    for (uint32_t b = 0; b < 65536; b++) {
      const double x = bf16_bits_to_float(static_cast<uint16_t>(b));
      const double cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
      const double pdf = std::exp(-0.5 * x * x) * 0.39894228040143267794;
      value[b] = float_to_bf16_bits(static_cast<float>(x * cdf));
      slope[b] = static_cast<float>(cdf + x * pdf);
      if (std::isinf(x)) {  // the limits: gelu(+inf) = inf, gelu(-inf) = -0; slopes 1, 0
        value[b] = float_to_bf16_bits(x > 0 ? static_cast<float>(x) : -0.f);
        slope[b] = x > 0 ? 1.f : 0.f;
      }
    }
  }
};

const GeluTables& gelu_tables() {
  static const GeluTables t;  // built once, thread-safe
  return t;
}

Tensor gelu_forward(const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "gelu: contiguous bf16");
  const uint16_t* tab = gelu_tables().value.data();
  Tensor y = at::empty_like(x);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  uint16_t* ys = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  at::parallel_for(0, x.numel(), 1 << 14, [=](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) ys[i] = tab[xs[i]];
  });
  return y;
}

// grad, x: (rows, h) bf16 -> (grad * gelu'(x) in bf16, its column sums in fp32)
std::tuple<Tensor, Tensor> gelu_backward(const Tensor& grad, const Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && grad.scalar_type() == at::kBFloat16 &&
                  x.is_contiguous() && grad.is_contiguous() && x.sizes() == grad.sizes() &&
                  x.dim() == 2,
              "gelu: grad and x must be contiguous bf16 (rows, h) of one shape");
  const float* slope = gelu_tables().slope.data();
  const int64_t rows = x.size(0), h = x.size(1);
  Tensor gx = at::empty_like(x);
  // the column sums: one partial row per chunk of rows, then their sum
  const int64_t chunk = std::max<int64_t>(64, (rows + 63) / 64);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  Tensor partial = at::zeros({chunks, h}, x.options().dtype(at::kFloat));
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const uint16_t* gs = reinterpret_cast<const uint16_t*>(grad.data_ptr<c10::BFloat16>());
  uint16_t* out = reinterpret_cast<uint16_t*>(gx.data_ptr<c10::BFloat16>());
  float* part = partial.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [=](int64_t c0, int64_t c1) {
    std::vector<float> row(h);
    for (int64_t c = c0; c < c1; c++) {
      float* acc = part + c * h;
      for (int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); r++) {
        const uint16_t* xr = xs + r * h;
        const uint16_t* gr = gs + r * h;
        uint16_t* o = out + r * h;
        for (int64_t j = 0; j < h; j++) row[j] = slope[xr[j]];  // the lookups
#pragma omp simd
        for (int64_t j = 0; j < h; j++) {
          const uint16_t bits = float_to_bf16_bits(bf16_bits_to_float(gr[j]) * row[j]);
          o[j] = bits;
          acc[j] += bf16_bits_to_float(bits);  // the bias gradient sums what dx reads
        }
      }
    }
  });
  return {gx, partial.sum(0)};
}

// --- spherical k-means assignment ----------------------------------------------------------
// Per row of x (B, H, I, D) (any strides, unit last one): xn = x / max(|x|, eps), its nearest
// of the head's K unit centroids (the first of equal ones), best = xn . c; with stats, the
// per-(head, cluster) sums of xn and counts over the rows `real` marks (all when absent),
// without writing xn. inv as l2norm's (negative where the clamp took eps). The backward of
// best: gx = g inv (c - best xn), or g c / eps where clamped.
template <typename T>
void kmeans_assign_impl(const Tensor& x, const Tensor& means, const bool* real, double eps,
                        bool stats, Tensor& best, Tensor& bucket, Tensor& inv, Tensor& sums,
                        Tensor& counts) {
  const int64_t B = x.size(0), H = x.size(1), I = x.size(2), D = x.size(3), K = means.size(1);
  const auto xs = x.strides();
  const T* xp = x.data_ptr<T>();
  const float* mp = means.data_ptr<float>();
  float* bp = best.data_ptr<float>();
  int64_t* kp = bucket.data_ptr<int64_t>();
  float* ip = inv.data_ptr<float>();
  const int64_t threads = at::get_num_threads();
  std::vector<float> part(stats ? threads * H * K * (D + 1) : 0, 0.f);  // sums | counts
  float* parts = part.data();
  const float e = static_cast<float>(eps);
  // the centroids transposed, (H, D, KP) with K padded to whole 16-lane strips: a row's K
  // similarities then build up as D multiply-adds into one register per strip, not K dot
  // products that each end in a horizontal sum
  const int64_t KP = (K + 15) / 16 * 16;
  std::vector<float> mtv(H * D * KP, 0.f);
  for (int64_t h = 0; h < H; h++)
    for (int64_t j = 0; j < K; j++)
      for (int64_t c = 0; c < D; c++) mtv[(h * D + c) * KP + j] = mp[(h * K + j) * D + c];
  const float* mt = mtv.data();
  at::parallel_for(0, B * H * I, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    std::vector<float> xn(D);
    float* pk = stats ? parts + at::get_thread_num() * H * K * (D + 1) : nullptr;
    for (int64_t row = r0; row < r1; row++) {
      const int64_t i = row % I, bh = row / I, h = bh % H, b = bh / H;
      const T* xr = xp + b * xs[0] + h * xs[1] + i * xs[2];
      ip[row] = inv_norm(xr, D, e);
      const float k = std::abs(ip[row]);
#pragma omp simd
      for (int64_t c = 0; c < D; c++) xn[c] = load<float>(xr, c) * k;
      const float* mh = mt + h * D * KP;
      float top = -std::numeric_limits<float>::infinity();
      int64_t arg = 0;
      for (int64_t j0 = 0; j0 < K; j0 += 16) {
        // four partial sums over the channels, so that four multiply-add chains overlap
        // (one chain waits out each multiply-add's latency: a quarter of the rate)
        float d4[4][16] = {};
        int64_t c = 0;
        for (; c + 4 <= D; c += 4)
          for (int u = 0; u < 4; u++) {
            const float xc = xn[c + u];
            const float* m = mh + (c + u) * KP + j0;
#pragma omp simd
            for (int j = 0; j < 16; j++) d4[u][j] += xc * m[j];
          }
        for (; c < D; c++) {
          const float xc = xn[c];
          const float* m = mh + c * KP + j0;
#pragma omp simd
          for (int j = 0; j < 16; j++) d4[0][j] += xc * m[j];
        }
        float dot[16];
#pragma omp simd
        for (int j = 0; j < 16; j++) dot[j] = (d4[0][j] + d4[1][j]) + (d4[2][j] + d4[3][j]);
        for (int64_t j = 0; j < std::min<int64_t>(16, K - j0); j++)
          if (dot[j] > top) {  // the first of equal ones
            top = dot[j];
            arg = j0 + j;
          }
      }
      bp[row] = top;
      kp[row] = arg;
      if (stats && (real == nullptr || real[b * I + i])) {
        float* sk = pk + (h * K + arg) * (D + 1);
#pragma omp simd
        for (int64_t c = 0; c < D; c++) sk[c] += xn[c];
        sk[D] += 1.f;
      }
    }
  });
  if (stats) {
    float* sp = sums.data_ptr<float>();
    float* cp = counts.data_ptr<float>();
    for (int64_t hk = 0; hk < H * K; hk++) {
      for (int64_t c = 0; c <= D; c++) {
        float acc = 0;
        for (int64_t t = 0; t < threads; t++) acc += part[(t * H * K + hk) * (D + 1) + c];
        if (c < D) sp[hk * D + c] = acc;
        else cp[hk] = acc;
      }
    }
  }
}

// -> best (B, H, I) fp32, bucket (B, H, I) int64, inv (B*H*I) fp32, sums (H, K, D) fp32,
// counts (H, K) fp32 (the last two empty without stats)
std::vector<Tensor> kmeans_assign(const Tensor& x, const Tensor& means,
                                  const std::optional<Tensor>& real, double eps, bool stats) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1,
              "kmeans_assign: x must be a (B, H, I, D) CPU tensor with a unit last stride");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "kmeans_assign: x must be float32 or bfloat16");
  TORCH_CHECK(means.scalar_type() == torch::kFloat32 && means.is_contiguous() &&
                  means.dim() == 3 && means.size(0) == x.size(1) && means.size(2) == x.size(3),
              "kmeans_assign: means must be contiguous float32 (H, K, D)");
  if (real.has_value())
    TORCH_CHECK(real->scalar_type() == torch::kBool && real->is_contiguous() &&
                    real->dim() == 2 && real->size(0) == x.size(0) && real->size(1) == x.size(2),
                "kmeans_assign: the mask must be a contiguous bool (B, I)");
  const auto fopt = x.options().dtype(torch::kFloat32);
  Tensor best = torch::empty({x.size(0), x.size(1), x.size(2)}, fopt);
  Tensor bucket = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options().dtype(torch::kInt64));
  Tensor inv = torch::empty({x.size(0) * x.size(1) * x.size(2)}, fopt);
  Tensor sums = stats ? torch::empty({means.size(0), means.size(1), x.size(3)}, fopt)
                      : torch::empty({0}, fopt);
  Tensor counts = stats ? torch::empty({means.size(0), means.size(1)}, fopt)
                        : torch::empty({0}, fopt);
  const bool* rp = real.has_value() ? real->data_ptr<bool>() : nullptr;
  if (x.scalar_type() == torch::kFloat32)
    kmeans_assign_impl<float>(x, means, rp, eps, stats, best, bucket, inv, sums, counts);
  else
    kmeans_assign_impl<c10::BFloat16>(x, means, rp, eps, stats, best, bucket, inv, sums, counts);
  return {best, bucket, inv, sums, counts};
}

template <typename T>
void kmeans_assign_bwd_impl(const Tensor& g, const Tensor& x, const Tensor& means,
                            const Tensor& best, const Tensor& bucket, const Tensor& inv,
                            Tensor& gx) {
  const int64_t B = x.size(0), H = x.size(1), I = x.size(2), D = x.size(3), K = means.size(1);
  const auto xs = x.strides();
  const T* xp = x.data_ptr<T>();
  const float* mp = means.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* bp = best.data_ptr<float>();
  const int64_t* kp = bucket.data_ptr<int64_t>();
  const float* ip = inv.data_ptr<float>();
  T* op = gx.data_ptr<T>();
  at::parallel_for(0, B * H * I, 4 * kRowGrain, [=](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; row++) {
      const int64_t i = row % I, bh = row / I, h = bh % H, b = bh / H;
      const T* xr = xp + b * xs[0] + h * xs[1] + i * xs[2];
      const float* cr = mp + (h * K + kp[row]) * D;
      const float gv = gp[row], k = ip[row], bt = bp[row];
      T* o = op + row * D;
      if (k < 0) {  // clamped: best = (x / eps) . c
#pragma omp simd
        for (int64_t c = 0; c < D; c++) store(o, c, gv * cr[c] * -k);
        continue;
      }
#pragma omp simd
      for (int64_t c = 0; c < D; c++)
        store(o, c, gv * k * (cr[c] - bt * load<float>(xr, c) * k));
    }
  });
}

Tensor kmeans_assign_backward(const Tensor& g, const Tensor& x, const Tensor& means,
                              const Tensor& best, const Tensor& bucket, const Tensor& inv) {
  TORCH_CHECK(g.scalar_type() == torch::kFloat32 && g.is_contiguous() &&
                  g.numel() == best.numel(),
              "kmeans_assign: the gradient must be a contiguous float32 (B, H, I)");
  Tensor gx = torch::empty(x.sizes(), x.options());
  if (x.scalar_type() == torch::kFloat32)
    kmeans_assign_bwd_impl<float>(g, x, means, best, bucket, inv, gx);
  else
    kmeans_assign_bwd_impl<c10::BFloat16>(g, x, means, best, bucket, inv, gx);
  return gx;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("norm_shift_forward", &norm_shift_forward);
  m.def("norm_shift_backward", &norm_shift_backward);
  m.def("rotary_forward", &rotary<false>);
  m.def("rotary_backward", &rotary<true>);
  m.def("cross_entropy_forward", &cross_entropy_forward);
  m.def("cross_entropy_backward", &cross_entropy_backward);
  m.def("l2norm_forward", &l2norm_forward);
  m.def("l2norm_backward", &l2norm_backward);
  m.def("gelu_forward", &gelu_forward);
  m.def("kmeans_assign", &kmeans_assign);
  m.def("kmeans_assign_backward", &kmeans_assign_backward);
  m.def("gelu_backward", &gelu_backward);
}
