// Fused CPU kernel for the memory layers' short causal depthwise convolution
// (nl_lightning/models/titans.py, CausalDepthwiseConv), optionally followed by the L2 normalisation
// of its first channels in groups (Titans normalises q and k per head), forward and backward.
//
//   c[t, ch] = Σ_j w[j, ch] x[t - K + 1 + j, ch]        (zero before the sequence)
//   y[t, ch] = c[t, ch] / max(|c[t, group(ch)]|, eps)   for ch < normalized, else c[t, ch]
//
// Why: oneDNN's depthwise backward on the channels-last view takes ~8x its forward (12 of 175 ms
// of a Titans memory layer's fwd+bwd at B=4, T=1024, D=576, one thread), and the normalisation
// after it is six more passes over the tensor forward and backward. Here every row (b, t) is one
// pass over its channels, vectorised, with the weights in (K, C) order.

#include "../cpu/common.h"

#include <ATen/Parallel.h>

namespace nl_cpu {
namespace {

// Rows [begin, end) of the flattened (B·T) sequence: the convolution (and normalisation) forward.
template <typename T>
void conv_rows(int64_t begin, int64_t end, int64_t T_len, int C, int K, int normalized, int group, const T* x,
               const T* w, T* y, T* inv_norm) {
  const int groups = normalized / group;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t t = row % T_len;
    T* __restrict__ out = y + row * C;
    for (int ch = 0; ch < C; ++ch) out[ch] = T(0);
    for (int j = 0; j < K; ++j) {
      const int64_t shift = K - 1 - j;  // tap j reads x[t - shift]
      if (t < shift) continue;
      const T* __restrict__ in = x + (row - shift) * C;
      const T* __restrict__ wj = w + j * C;
#pragma omp simd
      for (int ch = 0; ch < C; ++ch) out[ch] += wj[ch] * in[ch];
    }
    for (int g = 0; g < groups; ++g) {
      T* __restrict__ seg = out + g * group;
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int i = 0; i < group; ++i) sq += seg[i] * seg[i];
      const T inv = T(1) / std::max(std::sqrt(sq), T(kNormEps));
      for (int i = 0; i < group; ++i) seg[i] *= inv;
      inv_norm[row * groups + g] = inv;
    }
  }
}

}  // namespace

// x (B, T, C), w (K, C) (tap K-1 is the current token) -> y (B, T, C) and inv_norm (B, T, normalized /
// group), the normalised groups' 1 / max(|c|, eps) kept for the backward.
std::vector<Tensor> causal_conv_forward(Tensor x, Tensor w, int64_t normalized, int64_t group) {
  check_inputs({x, w}, "causal_conv");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && w.size(1) == x.size(2), "causal_conv: x (B, T, C), w (K, C)");
  TORCH_CHECK(normalized >= 0 && normalized <= x.size(2) && (normalized == 0 || (group > 0 && normalized % group == 0)),
              "causal_conv: normalized channels must be a multiple of the group and at most C");
  const int64_t B = x.size(0), T_len = x.size(1);
  const int C = x.size(2), K = w.size(0);
  auto y = at::empty_like(x);
  auto inv_norm = at::empty({B, T_len, normalized ? normalized / group : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_forward", [&] {
    at::parallel_for(0, B * T_len, 64, [&](int64_t begin, int64_t end) {
      conv_rows<scalar_t>(begin, end, T_len, C, K, normalized, group, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                          y.data_ptr<scalar_t>(), inv_norm.data_ptr<scalar_t>());
    });
  });
  return {y, inv_norm};
}

namespace {

// dc = dL/dc of one row through the normalisation into `out`. y = c / n with n = max(|c|, eps):
// dc = (dy - y (y · dy)) / n, or dy / eps where the clamp holds; the other channels pass dy on.
template <typename T>
void normalize_backward_row(int C, int normalized, int group, const T* __restrict__ y, const T* __restrict__ inv_norm,
                            const T* __restrict__ dy, T* __restrict__ out) {
  for (int g = 0; g < normalized / group; ++g) {
    const T inv = inv_norm[g];
    const int first = g * group, last = first + group;
    T proj = 0;
    if (inv < T(1 / kNormEps)) {
#pragma omp simd reduction(+ : proj)
      for (int i = first; i < last; ++i) proj += y[i] * dy[i];
    }
#pragma omp simd
    for (int i = first; i < last; ++i) out[i] = inv * (dy[i] - y[i] * proj);
  }
  for (int ch = normalized; ch < C; ++ch) out[ch] = dy[ch];
}

// Tokens [t0, t1) of sequence b: dx[t] = Σ_j w[j] dc[t + K - 1 - j], and dw[j] += x[t - K + 1 + j] dc[t]
// into this thread's partial sum. The rows run backwards with the last K rows of dc in a ring
// buffer, so dc (with the normalisation's backward) is computed once per row and never stored
// whole: a (B, T, C) scratch tensor would cost as much in page faults as the arithmetic.
template <typename T>
void conv_backward_block(int64_t b, int64_t t0, int64_t t1, int64_t T_len, int C, int K, int normalized, int group,
                         const T* x, const T* w, const T* y, const T* inv_norm, const T* dy, T* dx, T* dw,
                         std::vector<T>& ring) {
  const int groups = normalized ? normalized / group : 0;
  const int64_t base = b * T_len;
  auto dc_row = [&](int64_t t) -> const T* {
    if (!normalized) return dy + (base + t) * C;
    T* slot = ring.data() + (t % K) * C;
    normalize_backward_row(C, normalized, group, y + (base + t) * C, inv_norm + (base + t) * groups,
                           dy + (base + t) * C, slot);
    return slot;
  };
  std::vector<const T*> rows(K);  // rows[t % K] = dc[t] for the K latest rows
  for (int64_t t = std::min<int64_t>(t1 + K - 2, T_len - 1); t >= t1; --t) rows[t % K] = dc_row(t);
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const T* __restrict__ g_t = rows[t % K] = dc_row(t);
    T* __restrict__ out = dx + (base + t) * C;
    for (int ch = 0; ch < C; ++ch) out[ch] = T(0);
    for (int j = 0; j < K; ++j) {
      const int64_t shift = K - 1 - j;  // c[t + shift] read x[t] through tap j
      if (t + shift >= T_len) continue;
      const T* __restrict__ g = rows[(t + shift) % K];
      const T* __restrict__ wj = w + j * C;
#pragma omp simd
      for (int ch = 0; ch < C; ++ch) out[ch] += wj[ch] * g[ch];
    }
    for (int j = 0; j < K; ++j) {
      const int64_t shift = K - 1 - j;
      if (t < shift) continue;
      const T* __restrict__ in = x + (base + t - shift) * C;
      T* __restrict__ dwj = dw + j * C;
#pragma omp simd
      for (int ch = 0; ch < C; ++ch) dwj[ch] += in[ch] * g_t[ch];
    }
  }
}

constexpr int64_t kBlock = 128;  // tokens per work item of the backward

}  // namespace

// Gradients of x and w from dy, given the forward's x, y and inv_norm. Work items are blocks of
// kBlock tokens of one sequence; each thread sums its own dw.
std::vector<Tensor> causal_conv_backward(Tensor x, Tensor w, Tensor y, Tensor inv_norm, Tensor dy, int64_t normalized,
                                         int64_t group) {
  check_inputs({x, w, y, inv_norm, dy}, "causal_conv");
  const int64_t B = x.size(0), T_len = x.size(1), blocks = (T_len + kBlock - 1) / kBlock;
  const int C = x.size(2), K = w.size(0);
  auto dx = at::empty_like(x);
  auto dw_partial = at::zeros({at::get_num_threads(), K, C}, w.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_backward", [&] {
    at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
      scalar_t* dw = dw_partial.data_ptr<scalar_t>() + static_cast<int64_t>(at::get_thread_num()) * K * C;
      std::vector<scalar_t> ring(static_cast<int64_t>(K) * C);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / blocks, t0 = (item % blocks) * kBlock, t1 = std::min(T_len, t0 + kBlock);
        conv_backward_block<scalar_t>(b, t0, t1, T_len, C, K, normalized, group, x.data_ptr<scalar_t>(),
                                      w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), inv_norm.data_ptr<scalar_t>(),
                                      dy.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dw, ring);
      }
    });
  });
  return {dx, dw_partial.sum(0)};
}

}  // namespace nl_cpu
