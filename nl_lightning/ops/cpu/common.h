// Helpers shared by the ops' C++ kernels (ops/dgd/dgd_cpu.cpp, ops/projection/projection_cpu.cpp,
// ops/titans/titans_cpu.cpp, ops/conv/conv_cpu.cpp): row-major GEMM through the BLAS torch links,
// unit-triangular substitutions, a vectorisable exp and SiLU.
#pragma once

// ATen only, not torch/extension.h (pybind11 and the C++ frontend): it parses in about a third of
// the time, and every kernel file includes this header (bindings.cpp adds the Python side).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// BLAS from the library torch itself links (MKL in the x86 wheels). Weak, so the extension still
// loads where torch carries no Fortran BLAS; `gemm` then falls back to a plain loop.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace nl_cpu {

using at::Tensor;

constexpr double kNormEps = 1e-12;  // F.normalize's default

// Row-major C (M x N) = alpha op(A) op(B) + beta C. BLAS is column-major, so it computes
// Cᵀ = op(B)ᵀ op(A)ᵀ with the operands swapped.
template <typename T>
void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
               T* c, int ldc);

template <>
inline void blas_gemm<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                             const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

template <>
inline void blas_gemm<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                       const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&tb, &ta, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

template <typename T>
bool have_blas() {
  return std::is_same<T, float>::value ? sgemm_ != nullptr : dgemm_ != nullptr;
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb,
          T beta, T* c, int ldc) {
  if (have_blas<T>()) {
    blas_gemm<T>(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  for (int i = 0; i < m; ++i) {
    T* row = c + static_cast<int64_t>(i) * ldc;
    for (int j = 0; j < n; ++j) row[j] = beta == T(0) ? T(0) : beta * row[j];
    for (int p = 0; p < k; ++p) {
      const T aip = alpha * (trans_a ? a[static_cast<int64_t>(p) * lda + i] : a[static_cast<int64_t>(i) * lda + p]);
      if (trans_b) {
        for (int j = 0; j < n; ++j) row[j] += aip * b[static_cast<int64_t>(j) * ldb + p];
      } else {
        const T* brow = b + static_cast<int64_t>(p) * ldb;
        for (int j = 0; j < n; ++j) row[j] += aip * brow[j];
      }
    }
  }
}

// Substitution for a block of W columns [j0, j0 + W) of R: row t's block is kept in a local
// accumulator (registers for W = 16 or 8) while the earlier rows are subtracted from it.
// `transposed` solves Sᵀ X = R (back substitution) instead of S X = R.
template <typename T, int W, bool transposed>
void solve_columns(int L, int cols, int j0, const T* s, T* r) {
  for (int step = 1; step < L; ++step) {
    const int t = transposed ? L - 1 - step : step;
    T acc[W];
    T* rt = r + static_cast<int64_t>(t) * cols + j0;
    for (int j = 0; j < W; ++j) acc[j] = rt[j];
    const int first = transposed ? t + 1 : 0, stop = transposed ? L : t;
    for (int i = first; i < stop; ++i) {
      const T coefficient = transposed ? s[static_cast<int64_t>(i) * L + t] : s[static_cast<int64_t>(t) * L + i];
      const T* ri = r + static_cast<int64_t>(i) * cols + j0;
      for (int j = 0; j < W; ++j) acc[j] -= coefficient * ri[j];
    }
    for (int j = 0; j < W; ++j) rt[j] = acc[j];
  }
}

// S X = R in place (or Sᵀ X = R) for S (L x L, row-major) unit lower triangular: only the strictly
// lower part of S is read. For these small L this is faster than BLAS trsm.
template <typename T, bool transposed = false>
void solve_lower_unit(int L, int cols, const T* s, T* r) {
  int j0 = 0;
  for (; j0 + 16 <= cols; j0 += 16) solve_columns<T, 16, transposed>(L, cols, j0, s, r);
  for (; j0 + 8 <= cols; j0 += 8) solve_columns<T, 8, transposed>(L, cols, j0, s, r);
  for (; j0 < cols; ++j0) solve_columns<T, 1, transposed>(L, cols, j0, s, r);
}

template <typename T>
void solve_lower_unit_transposed(int L, int cols, const T* s, T* r) {
  solve_lower_unit<T, true>(L, cols, s, r);
}

// exp without libm calls so that loops over it vectorise: Cody-Waite range reduction and the
// Cephes expf polynomial (about 1 ulp on the clamped range). Used for float only; double keeps
// std::exp (the float64 tests compare against ATen to ~1e-12).
inline float exp_poly(float x) {
  x = x > -87.0f ? x : -87.0f;  // selects, not branches (vectorise with -fno-trapping-math)
  x = x < 88.0f ? x : 88.0f;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  return p * __builtin_bit_cast(float, bits);
}

inline float exp_fast(float x) { return exp_poly(x); }
inline double exp_fast(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + exp_fast(-x));
}

// y = silu(x) = x sigmoid(x), keeping s = sigmoid(x) for the derivatives. Restrict pointers and
// `omp simd` so that the loop vectorises (with the polynomial exp).
template <typename T>
void silu(int n, const T* __restrict__ x, T* __restrict__ s, T* __restrict__ y) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    s[i] = sigmoid(x[i]);
    y[i] = x[i] * s[i];
  }
}

// silu'(x) and silu''(x) from s = sigmoid(x).
template <typename T>
inline T silu_d1(T x, T s) {
  return s * (T(1) + x * (T(1) - s));
}
template <typename T>
inline T silu_d2(T x, T s) {
  return s * (T(1) - s) * (T(2) + x * (T(1) - T(2) * s));
}

// Backward of r = S⁻¹ rhs (S unit lower triangular, r: L x cols): dr (in: dL/dr) becomes dL/d(rhs)
// and ds (L x L) gets dL/dS on its strictly lower part, -d(rhs) rᵀ (the rest is unused).
template <typename T>
void solve_backward(int L, int cols, const T* s, const T* r, T* dr, T* ds) {
  solve_lower_unit_transposed(L, cols, s, dr);
  gemm<T>(false, true, L, L, cols, T(-1), dr, cols, r, cols, T(0), ds, L);
}

// The strictly lower part of a UT system, S[t, i] = η_t PR[t, i] G[t, i] for i < t, zero elsewhere
// (the unit diagonal is implied by the solver).
template <typename T>
void build_system(int L, const T* eta, const T* pr, const T* gram, T* s) {
  for (int t = 0; t < L; ++t)
    for (int i = 0; i < L; ++i) s[t * L + i] = i < t ? eta[t] * pr[t * L + i] * gram[t * L + i] : T(0);
}

// y_i (+)= s_i x_i for rows i of width cols (leading dimensions ldx, ldy).
template <typename T>
void scale_rows_into(int L, int cols, const T* s, const T* x, int ldx, T* y, int ldy, bool accumulate) {
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < cols; ++j)
      y[i * ldy + j] = (accumulate ? y[i * ldy + j] : T(0)) + s[i] * x[i * ldx + j];
}

// Σ_j x_ij y_ij per row i, added to out[i].
template <typename T>
void add_row_dots(int L, int cols, const T* x, int ldx, const T* y, int ldy, T* out) {
  for (int i = 0; i < L; ++i) {
    const T* __restrict__ xi = x + i * ldx;
    const T* __restrict__ yi = y + i * ldy;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int j = 0; j < cols; ++j) acc += xi[j] * yi[j];
    out[i] += acc;
  }
}

// Σ_i x_i y_i.
template <typename T>
T dot(int n, const T* x, const T* y) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

// y_t = ρ_t x_t for contiguous rows t of width cols (the update vectors' share left at the chunk end).
template <typename T>
void scale_rows(int L, int cols, const T* rho, const T* x, T* y) {
  scale_rows_into(L, cols, rho, x, cols, y, cols, false);
}

// Backward of scale_rows: dx = ρ ⊙ dy (written), dρ_t += Σ_j x_tj dy_tj.
template <typename T>
void scale_rows_backward(int L, int cols, const T* rho, const T* x, const T* dy, T* dx, T* drho) {
  for (int t = 0; t < L; ++t) {
    T acc = 0;
    for (int j = 0; j < cols; ++j) {
      dx[t * cols + j] = rho[t] * dy[t * cols + j];
      acc += x[t * cols + j] * dy[t * cols + j];
    }
    drho[t] += acc;
  }
}

// The W2 layer's right-hand side rhs = -η_t silu'(pre) ⊙ m - (ηγ_prev)_t pre (rows of width cols).
template <typename T>
void w2_rhs(int L, int cols, const T* pre, const T* s_pre, const T* m, const T* eta, const T* gpe, T* rhs) {
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < cols; ++j) {
      const int i = t * cols + j;
      rhs[i] = -eta[t] * silu_d1(pre[i], s_pre[i]) * m[i] - gpe[t] * pre[i];
    }
}

// The W1 layer's right-hand side rhs = -η_t d1 - (ηγ_prev)_t hw1 (rows of width cols).
template <typename T>
void w1_rhs(int L, int cols, const T* d1, const T* hw1, const T* eta, const T* gpe, T* rhs) {
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < cols; ++j) rhs[t * cols + j] = -eta[t] * d1[t * cols + j] - gpe[t] * hw1[t * cols + j];
}

// Backward of w1_rhs: writes dd1 and dhw1, adds to deta and dgpe.
template <typename T>
void w1_rhs_backward(int L, int cols, const T* drhs, const T* d1, const T* hw1, const T* eta, const T* gpe,
                     T* deta, T* dgpe, T* dd1, T* dhw1) {
  for (int t = 0; t < L; ++t) {
    T de = 0, dg = 0;
    for (int j = 0; j < cols; ++j) {
      const int i = t * cols + j;
      de -= d1[i] * drhs[i];
      dg -= hw1[i] * drhs[i];
      dd1[i] = -eta[t] * drhs[i];
      dhw1[i] = -gpe[t] * drhs[i];
    }
    deta[t] += de;
    dgpe[t] += dg;
  }
}

// Backward of the W2 layer's right-hand side rhs = -η_t silu'(pre) ⊙ m - (ηγ_prev)_t pre
// (rows t of width cols): from drhs, adds to deta and dgpe, writes dm and dpre (the latter
// including the silu'' term of silu'(pre)).
template <typename T>
void w2_rhs_backward(int L, int cols, const T* drhs, const T* pre, const T* s_pre, const T* m, const T* eta,
                     const T* gpe, T* deta, T* dgpe, T* dm, T* dpre) {
  for (int t = 0; t < L; ++t) {
    T de = 0, dg = 0;
    for (int j = 0; j < cols; ++j) {
      const int i = t * cols + j;
      const T sg = silu_d1(pre[i], s_pre[i]);
      de -= sg * m[i] * drhs[i];
      dg -= pre[i] * drhs[i];
      const T dd2 = -eta[t] * drhs[i];
      dm[i] = dd2 * sg;
      dpre[i] = -gpe[t] * drhs[i] + dd2 * m[i] * silu_d2(pre[i], s_pre[i]);
    }
    deta[t] += de;
    dgpe[t] += dg;
  }
}

// Backward of a UT system's strictly lower part S = η_t PR ⊙ G (the unit diagonal is implied):
// ds (in: dL/dS) becomes dL/dG, zero on and above the diagonal; adds to deta and dpr.
template <typename T>
void system_backward(int L, const T* eta, const T* pr, const T* gram, T* ds, T* deta, T* dpr) {
  for (int t = 0; t < L; ++t) {
    T de = 0;
    for (int i = 0; i < L; ++i) {
      const int ti = t * L + i;
      if (i < t) {
        de += ds[ti] * pr[ti] * gram[ti];
        dpr[ti] += ds[ti] * eta[t] * gram[ti];
        ds[ti] *= eta[t] * pr[ti];
      } else {
        ds[ti] = T(0);
      }
    }
    deta[t] += de;
  }
}

// dx += (G + Gᵀ) x for the backward of a Gram matrix x xᵀ whose gradient G (L x L) is strictly
// lower triangular (zero on and above the diagonal): G is mirrored into its upper half in place,
// so one GEMM does both terms.
template <typename T>
void gram_backward(int L, int cols, T* g, const T* x, int ldx, T* dx, int lddx) {
  for (int t = 1; t < L; ++t)
    for (int i = 0; i < t; ++i) g[i * L + t] = g[t * L + i];
  gemm<T>(false, false, L, cols, L, T(1), g, L, x, ldx, T(1), dx, lddx);
}

// The decays of one chunk from its retention gates α (chunk.py's chunk_decays): log α (α clamped
// to the smallest normal), lg_t = Σ_{j<=t} log α_j, lgp_t = lg_{t-1} (0 at t = 0), the ratio
// RA[t, i] = exp(Σ_{i<j<=t} log α_j) for i <= t (segment sums, never differences of cumulative
// sums) and PR[t, i] = RA[t-1, i] for i < t; both 0 elsewhere.
template <typename T>
struct Decays {
  int L;
  std::vector<T> log_alpha, lg, lgp, ra, pr;

  explicit Decays(int L) : L(L), log_alpha(L), lg(L), lgp(L), ra(L * L), pr(L * L) {}

  void forward(const T* alpha) {
    T acc = 0;
    for (int t = 0; t < L; ++t) {
      log_alpha[t] = std::log(std::max(alpha[t], std::numeric_limits<T>::min()));
      lgp[t] = acc;
      acc += log_alpha[t];
      lg[t] = acc;
    }
    std::fill(ra.begin(), ra.end(), T(0));
    for (int i = 0; i < L; ++i) {
      T segment = 0;
      ra[i * L + i] = 1;
      for (int t = i + 1; t < L; ++t) {
        segment += log_alpha[t];
        ra[t * L + i] = std::exp(segment);
      }
    }
    std::fill(pr.begin(), pr.end(), T(0));
    for (int t = 1; t < L; ++t)
      for (int i = 0; i < t; ++i) pr[t * L + i] = ra[(t - 1) * L + i];
  }

  // dL/dα from dL/d lg, dL/d lgp, dL/dRA (modified: PR's gradient is added in) and dL/dPR.
  void backward(const T* alpha, const T* dlg, const T* dlgp, T* dra, const T* dpr, T* dalpha) const {
    for (int t = 1; t < L; ++t)
      for (int i = 0; i < t; ++i) dra[(t - 1) * L + i] += dpr[t * L + i];
    // d log α_j = Σ_{t>=j} dlg_t + Σ_{t>j} dlgp_t + Σ_{i<j} Σ_{t>=j} dRA[t, i] RA[t, i].
    T through_lg = 0, through_lgp = 0;
    for (int j = L - 1; j >= 0; --j) {
      through_lg += dlg[j];
      dalpha[j] = through_lg + through_lgp;
      through_lgp += dlgp[j];
    }
    for (int i = 0; i < L; ++i) {
      T acc = 0;
      for (int j = L - 1; j > i; --j) {
        acc += dra[j * L + i] * ra[j * L + i];
        dalpha[j] += acc;
      }
    }
    for (int t = 0; t < L; ++t)  // log(max(α, tiny)): no gradient where the clamp holds
      dalpha[t] = alpha[t] >= std::numeric_limits<T>::min() ? dalpha[t] / alpha[t] : T(0);
  }
};

inline void check_inputs(const std::vector<Tensor>& tensors, const char* name) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), name, ": CPU tensors only, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, ": inputs must be contiguous");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), name, ": inputs must share one dtype");
  }
}

}  // namespace nl_cpu
