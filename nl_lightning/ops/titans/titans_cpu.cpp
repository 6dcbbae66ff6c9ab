// Fused CPU kernels for the chunk loop of the Titans memories, the MLP memory M(z) = z + W1 silu(W2 z)
// and the linear memory M(z) = W z (nl_lightning/ops/titans/chunk.py and coefficients.py), forward and
// hand-written backward.
//
// Why: the ATen chunk kernel runs the gate coefficients as C-step scans over all chunks and each
// chunk's hand-over and read-outs as tens of small ops over every (batch, head) pair, so on a CPU
// the layer spent most of its time between kernels. Here each thread runs the whole chunk loop of
// one (batch, head) item: the coefficients, the gradient factors, both read-outs and the state
// hand-over of a chunk are small BLAS calls and plain loops on a working set that stays in cache.
//
// One chunk of L tokens of the MLP memory from the state (W1, S1, W2, S2), with th2 = -2 θ (the 2 of the squared
// loss's gradient folded in, as in chunk.py) and the coefficients β, c, P, E of coefficients.py:
//
//   pre = k W2ᵀ, a = silu(pre), u1 = k + a W1ᵀ - v, u2 = (u1 W1) ⊙ silu'(pre)
//   hz = β ⊙ (q W2ᵀ) + c ⊙ (q S2ᵀ) + (P ⊙ (q (th2 ⊙ k)ᵀ)) u2,   g = silu(hz)
//   y  = q + β ⊙ (g W1ᵀ) + c ⊙ (g S1ᵀ) + (P ⊙ (g (th2 ⊙ a)ᵀ)) u1
//   W2' = β_e W2 + c_e S2 + u2ᵀ (mix ⊙ k),  S2' = A_e S2 + u2ᵀ (surprise ⊙ k)
//   W1' = β_e W1 + c_e S1 + u1ᵀ (mix ⊙ a),  S1' = A_e S1 + u1ᵀ (surprise ⊙ a)
//
// with mix_j = P_ej th2_j and surprise_j = E_ej th2_j at the chunk's last token e. A state is
// stored as one block, [W1; S1] (2D x Dh) and [W2; S2] (2Dh x D), so that a read-out's two terms
// are one GEMM. The last chunk may be partial: it runs with its own length (padding would keep
// adding the momentum to the weights). The linear memory (LinearChunk) is the same without the
// hidden layer. The backward recomputes one chunk's forward from its saved start state and applies
// the chain rule in reverse order. tests/ops/test_titans_memory.py checks both kernels against the
// token loop and the ATen chunk kernel.

#include "../cpu/common.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace nl_cpu {
namespace {

// Gate-only coefficients of one chunk (coefficients.py): β_i = Π_{l<=i} keep_l (keep = 1 - α),
// E_ij = Π_{j<l<=i} η_l, P_i = keep_i P_{i-1} + E_i (rows), c_i = η_0 P_i0, A_e = Π η, and the
// end weights mix_j = P_ej th2_j, surprise_j = E_ej th2_j. Row scans, no division anywhere.
template <typename T>
struct Coefficients {
  int L = 0;
  std::vector<T> keep, beta, carry, th2, E, P, mix, surprise;
  T momentum_end = 0;

  explicit Coefficients(int C) : keep(C), beta(C), carry(C), th2(C), E(C * C), P(C * C), mix(C), surprise(C) {}

  void forward(int length, const T* theta, const T* eta, const T* alpha) {
    L = length;
    T product = 1, momentum = 1;
    for (int i = 0; i < L; ++i) {
      keep[i] = T(1) - alpha[i];
      product *= keep[i];
      beta[i] = product;
      momentum *= eta[i];
      th2[i] = T(-2) * theta[i];
    }
    momentum_end = momentum;
    std::fill(E.begin(), E.begin() + L * L, T(0));
    std::fill(P.begin(), P.begin() + L * L, T(0));
    E[0] = P[0] = 1;
    for (int i = 1; i < L; ++i) {
      T* e = E.data() + i * L;
      T* p = P.data() + i * L;
      const T* e_prev = e - L;
      const T* p_prev = p - L;
      for (int j = 0; j < i; ++j) {
        e[j] = eta[i] * e_prev[j];
        p[j] = keep[i] * p_prev[j] + e[j];
      }
      e[i] = p[i] = 1;
    }
    const T* p_end = P.data() + (L - 1) * L;
    const T* e_end = E.data() + (L - 1) * L;
    for (int i = 0; i < L; ++i) {
      carry[i] = eta[0] * P[i * L];
      mix[i] = p_end[i] * th2[i];
      surprise[i] = e_end[i] * th2[i];
    }
  }

  // Gradients of θ, η, α from those of β, c, P (dp, overwritten), th2, mix, surprise and A_e.
  void backward(const T* eta, T* dbeta, const T* dcarry, T* dp, T* dth2, const T* dmix, const T* dsurprise,
                T dmomentum_end, T* dtheta, T* deta, T* dalpha) const {
    T* dp_end = dp + (L - 1) * L;
    const T* p_end = P.data() + (L - 1) * L;
    const T* e_end = E.data() + (L - 1) * L;
    std::vector<T> he(L), he_next(L, T(0));
    for (int i = 0; i < L; ++i) {
      deta[i] = 0;
      dalpha[i] = 0;
      dp_end[i] += dmix[i] * th2[i];
      dth2[i] += dmix[i] * p_end[i] + dsurprise[i] * e_end[i];
      dtheta[i] = T(-2) * dth2[i];
      dp[i * L] += dcarry[i] * eta[0];  // c_i = η_0 P_i0
      deta[0] += dcarry[i] * P[i * L];
    }
    // A_e = Π η_l: each factor's gradient is the product of the others (prefix × suffix).
    T prefix = 1;
    for (int i = 0; i < L; ++i) {
      he[i] = prefix;
      prefix *= eta[i];
    }
    T suffix = 1;
    for (int i = L - 1; i >= 0; --i) {
      deta[i] += dmomentum_end * he[i] * suffix;
      suffix *= eta[i];
    }
    // β_i = Π_{l<=i} keep_l: R_l = dβ_l + keep_{l+1} R_{l+1}, dkeep_l = β_{l-1} R_l.
    T r = 0;
    for (int i = L - 1; i >= 0; --i) {
      r = dbeta[i] + (i + 1 < L ? keep[i + 1] * r : T(0));
      dalpha[i] -= (i > 0 ? beta[i - 1] : T(1)) * r;
    }
    // Reverse row scans of P and E (coefficients.py, _MomentumScan): HP_i = dP_i + keep_{i+1} HP_{i+1},
    // HE_i = dE_i + HP_i + η_{i+1} HE_{i+1}, dkeep_i = HP_i · P_{i-1}, dη_i = HE_i · E_{i-1}; row i
    // needs only its first i entries (P_{i-1}, E_{i-1} are zero beyond).
    for (int j = 0; j < L; ++j) he_next[j] = dsurprise[j] * th2[j];  // dE of the last row
    for (int i = L - 1; i >= 1; --i) {
      T* hp = dp + i * L;
      if (i + 1 < L) {
        const T* hp_next = hp + L;
        for (int j = 0; j < i; ++j) hp[j] += keep[i + 1] * hp_next[j];
      }
      const T* p_prev = P.data() + (i - 1) * L;
      const T* e_prev = E.data() + (i - 1) * L;
      T dk = 0, de = 0;
#pragma omp simd reduction(+ : dk, de)
      for (int j = 0; j < i; ++j) {
        he[j] = hp[j] + (i + 1 < L ? eta[i + 1] * he_next[j] : he_next[j]);
        dk += hp[j] * p_prev[j];
        de += he[j] * e_prev[j];
      }
      dalpha[i] -= dk;
      deta[i] += de;
      std::swap(he, he_next);
    }
  }
};


// One chunk's inputs for one item: q, k, v (L x D), gates (L).
template <typename T>
struct ChunkInputs {
  int L;  // tokens in this chunk (the last one may be partial)
  const T *q, *k, *v, *theta, *eta, *alpha;
};

template <typename T>
struct ChunkGrads {
  T *q, *k, *v, *theta, *eta, *alpha;
};

// Everything one chunk's forward computes; the backward recomputes it and reads it.
template <typename T>
struct MlpChunk {
  int C, D, Dh, L = 0;
  Coefficients<T> cf;
  std::vector<T> pre, s_pre, a, u1, m, u2, xk, qw, gk, sk, hz, s_hz, g, xa, gw, ga, sa, xm1, xs1, xm2, xs2;

  MlpChunk(int C, int D, int /*Dv = D*/, int Dh) : C(C), D(D), Dh(Dh), cf(C) {
    for (auto* x : {&pre, &s_pre, &a, &m, &u2, &hz, &s_hz, &g, &xa, &xm1, &xs1}) x->resize(C * Dh);
    for (auto* x : {&u1, &xk, &xm2, &xs2}) x->resize(C * D);
    qw.resize(C * 2 * Dh);
    gw.resize(C * 2 * D);
    for (auto* x : {&gk, &sk, &ga, &sa}) x->resize(C * C);
  }

  // The end state's factors mix ⊙ a, surprise ⊙ a, mix ⊙ k, surprise ⊙ k (the backward reads them too).
  void end_factors(const ChunkInputs<T>& in) {
    scale_rows_into(L, Dh, cf.mix.data(), a.data(), Dh, xm1.data(), Dh, false);
    scale_rows_into(L, Dh, cf.surprise.data(), a.data(), Dh, xs1.data(), Dh, false);
    scale_rows_into(L, D, cf.mix.data(), in.k, D, xm2.data(), D, false);
    scale_rows_into(L, D, cf.surprise.data(), in.k, D, xs2.data(), D, false);
  }

  // Runs the chunk from the state st1 = [W1; S1] (2D x Dh), st2 = [W2; S2] (2Dh x D). Writes the
  // read-outs into y (L x D) and the end state into end1, end2 when they are given (the backward's
  // recompute needs neither).
  void forward(const ChunkInputs<T>& in, const T* st1, const T* st2, T* y, T* end1, T* end2) {
    L = in.L;
    const T *W1 = st1, *S1 = st1 + D * Dh, *W2 = st2, *S2 = st2 + Dh * D;
    cf.forward(L, in.theta, in.eta, in.alpha);
    const T* P = cf.P.data();
    // Gradient factors at the chunk-start weights (halved: the 2 is in th2).
    gemm<T>(false, true, L, Dh, D, T(1), in.k, D, W2, D, T(0), pre.data(), Dh);
    silu(L * Dh, pre.data(), s_pre.data(), a.data());
    for (int i = 0; i < L * D; ++i) u1[i] = in.k[i] - in.v[i];
    gemm<T>(false, true, L, D, Dh, T(1), a.data(), Dh, W1, Dh, T(1), u1.data(), D);
    gemm<T>(false, false, L, Dh, D, T(1), u1.data(), D, W1, Dh, T(0), m.data(), Dh);
    for (int i = 0; i < L * Dh; ++i) u2[i] = m[i] * silu_d1(pre[i], s_pre[i]);
    // Inner read-out hz = W2_i q_i.
    gemm<T>(false, true, L, 2 * Dh, D, T(1), in.q, D, st2, D, T(0), qw.data(), 2 * Dh);
    scale_rows_into(L, D, cf.th2.data(), in.k, D, xk.data(), D, false);
    gemm<T>(false, true, L, L, D, T(1), in.q, D, xk.data(), D, T(0), gk.data(), L);
    for (int i = 0; i < L * L; ++i) sk[i] = P[i] * gk[i];
    scale_rows_into(L, Dh, cf.beta.data(), qw.data(), 2 * Dh, hz.data(), Dh, false);
    scale_rows_into(L, Dh, cf.carry.data(), qw.data() + Dh, 2 * Dh, hz.data(), Dh, true);
    gemm<T>(false, false, L, Dh, L, T(1), sk.data(), L, u2.data(), Dh, T(1), hz.data(), Dh);
    silu(L * Dh, hz.data(), s_hz.data(), g.data());
    // Outer read-out y = q + W1_i g_i.
    gemm<T>(false, true, L, 2 * D, Dh, T(1), g.data(), Dh, st1, Dh, T(0), gw.data(), 2 * D);
    scale_rows_into(L, Dh, cf.th2.data(), a.data(), Dh, xa.data(), Dh, false);
    gemm<T>(false, true, L, L, Dh, T(1), g.data(), Dh, xa.data(), Dh, T(0), ga.data(), L);
    for (int i = 0; i < L * L; ++i) sa[i] = P[i] * ga[i];
    end_factors(in);
    if (y != nullptr) {
      for (int i = 0; i < L; ++i)
        for (int j = 0; j < D; ++j)
          y[i * D + j] = in.q[i * D + j] + cf.beta[i] * gw[i * 2 * D + j] + cf.carry[i] * gw[i * 2 * D + D + j];
      gemm<T>(false, false, L, D, L, T(1), sa.data(), L, u1.data(), D, T(1), y, D);
    }
    if (end1 == nullptr) return;
    const T b = cf.beta[L - 1], c = cf.carry[L - 1], A = cf.momentum_end;
    for (int i = 0; i < D * Dh; ++i) {
      end1[i] = b * W1[i] + c * S1[i];
      end1[D * Dh + i] = A * S1[i];
    }
    for (int i = 0; i < Dh * D; ++i) {
      end2[i] = b * W2[i] + c * S2[i];
      end2[Dh * D + i] = A * S2[i];
    }
    gemm<T>(true, false, D, Dh, L, T(1), u1.data(), D, xm1.data(), Dh, T(1), end1, Dh);
    gemm<T>(true, false, D, Dh, L, T(1), u1.data(), D, xs1.data(), Dh, T(1), end1 + D * Dh, Dh);
    gemm<T>(true, false, Dh, D, L, T(1), u2.data(), Dh, xm2.data(), D, T(1), end2, D);
    gemm<T>(true, false, Dh, D, L, T(1), u2.data(), Dh, xs2.data(), D, T(1), end2 + Dh * D, D);
  }
};

template <typename T>
struct MlpChunkBackward {
  int C, D, Dh;
  std::vector<T> du1, du2, da, dxm, dxs, dxk, dxa, dg, dhz, dyw, dhw, dm, dpre, dsa, dsk, dP, dst1, dst2, dbeta, dcarry,
      dth2, dmix, dsurprise;

  MlpChunkBackward(int C, int D, int /*Dv = D*/, int Dh) : C(C), D(D), Dh(Dh) {
    for (auto* x : {&du2, &da, &dxa, &dg, &dhz, &dm, &dpre}) x->resize(C * Dh);
    for (auto* x : {&du1, &dxk}) x->resize(C * D);
    dxm.resize(C * std::max(D, Dh));
    dxs.resize(C * std::max(D, Dh));
    dyw.resize(C * 2 * D);
    dhw.resize(C * 2 * Dh);
    for (auto* x : {&dsa, &dsk, &dP}) x->resize(C * C);
    dst1.resize(2 * D * Dh);
    dst2.resize(2 * Dh * D);
    for (auto* x : {&dbeta, &dcarry, &dth2, &dmix, &dsurprise}) x->resize(C);
  }

  // Given dL/dy and dL/d(end state) (d1 = [dW1'; dS1'], d2 = [dW2'; dS2'], overwritten with
  // dL/d(start state)), writes the chunk's input gradients. `w` holds the recomputed forward.
  void backward(const ChunkInputs<T>& in, const T* st1, const T* st2, const MlpChunk<T>& w, const T* dy, T* d1,
                T* d2, const ChunkGrads<T>& g) {
    const int L = in.L, DDh = D * Dh;
    const T *W1 = st1, *S1 = st1 + DDh, *W2 = st2, *S2 = st2 + DDh;
    const T *dW1e = d1, *dS1e = d1 + DDh, *dW2e = d2, *dS2e = d2 + DDh;
    const auto& cf = w.cf;
    const T* P = cf.P.data();
    const T b = cf.beta[L - 1], c = cf.carry[L - 1], A = cf.momentum_end;
    std::fill(dbeta.begin(), dbeta.begin() + L, T(0));
    std::fill(dcarry.begin(), dcarry.begin() + L, T(0));
    std::fill(dth2.begin(), dth2.begin() + L, T(0));
    std::fill(dmix.begin(), dmix.begin() + L, T(0));
    std::fill(dsurprise.begin(), dsurprise.begin() + L, T(0));
    std::fill(dP.begin(), dP.begin() + L * L, T(0));

    // End state: W' = β_e W + c_e S + uᵀ (mix ⊙ x), S' = A_e S + uᵀ (surprise ⊙ x), both layers.
    const T dbeta_end = dot(DDh, W1, dW1e) + dot(DDh, W2, dW2e);
    const T dcarry_end = dot(DDh, S1, dW1e) + dot(DDh, S2, dW2e);
    const T dmomentum_end = dot(DDh, S1, dS1e) + dot(DDh, S2, dS2e);
    for (int i = 0; i < DDh; ++i) {
      dst1[i] = b * dW1e[i];
      dst1[DDh + i] = c * dW1e[i] + A * dS1e[i];
      dst2[i] = b * dW2e[i];
      dst2[DDh + i] = c * dW2e[i] + A * dS2e[i];
    }
    dbeta[L - 1] += dbeta_end;
    dcarry[L - 1] += dcarry_end;
    // Layer W1 (factor u1, input a).
    gemm<T>(false, true, L, D, Dh, T(1), w.xm1.data(), Dh, dW1e, Dh, T(0), du1.data(), D);
    gemm<T>(false, true, L, D, Dh, T(1), w.xs1.data(), Dh, dS1e, Dh, T(1), du1.data(), D);
    gemm<T>(false, false, L, Dh, D, T(1), w.u1.data(), D, dW1e, Dh, T(0), dxm.data(), Dh);
    gemm<T>(false, false, L, Dh, D, T(1), w.u1.data(), D, dS1e, Dh, T(0), dxs.data(), Dh);
    add_row_dots(L, Dh, w.a.data(), Dh, dxm.data(), Dh, dmix.data());
    add_row_dots(L, Dh, w.a.data(), Dh, dxs.data(), Dh, dsurprise.data());
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < Dh; ++j)
        da[i * Dh + j] = cf.mix[i] * dxm[i * Dh + j] + cf.surprise[i] * dxs[i * Dh + j];
    // Layer W2 (factor u2, input k).
    gemm<T>(false, true, L, Dh, D, T(1), w.xm2.data(), D, dW2e, D, T(0), du2.data(), Dh);
    gemm<T>(false, true, L, Dh, D, T(1), w.xs2.data(), D, dS2e, D, T(1), du2.data(), Dh);
    gemm<T>(false, false, L, D, Dh, T(1), w.u2.data(), Dh, dW2e, D, T(0), dxm.data(), D);
    gemm<T>(false, false, L, D, Dh, T(1), w.u2.data(), Dh, dS2e, D, T(0), dxs.data(), D);
    add_row_dots(L, D, in.k, D, dxm.data(), D, dmix.data());
    add_row_dots(L, D, in.k, D, dxs.data(), D, dsurprise.data());
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < D; ++j) g.k[i * D + j] = cf.mix[i] * dxm[i * D + j] + cf.surprise[i] * dxs[i * D + j];

    // Outer read-out y = q + β ⊙ (g W1ᵀ) + c ⊙ (g S1ᵀ) + (P ⊙ (g xaᵀ)) u1.
    std::copy(dy, dy + L * D, g.q);
    add_row_dots(L, D, w.gw.data(), 2 * D, dy, D, dbeta.data());
    add_row_dots(L, D, w.gw.data() + D, 2 * D, dy, D, dcarry.data());
    scale_rows_into(L, D, cf.beta.data(), dy, D, dyw.data(), 2 * D, false);
    scale_rows_into(L, D, cf.carry.data(), dy, D, dyw.data() + D, 2 * D, false);
    gemm<T>(false, false, L, Dh, 2 * D, T(1), dyw.data(), 2 * D, st1, Dh, T(0), dg.data(), Dh);
    gemm<T>(true, false, 2 * D, Dh, L, T(1), dyw.data(), 2 * D, w.g.data(), Dh, T(1), dst1.data(), Dh);
    gemm<T>(false, true, L, L, D, T(1), dy, D, w.u1.data(), D, T(0), dsa.data(), L);
    gemm<T>(true, false, L, D, L, T(1), w.sa.data(), L, dy, D, T(1), du1.data(), D);
    for (int i = 0; i < L * L; ++i) {
      dP[i] += dsa[i] * w.ga.data()[i];
      dsa[i] *= P[i];  // now dL/d(g xaᵀ)
    }
    gemm<T>(false, false, L, Dh, L, T(1), dsa.data(), L, w.xa.data(), Dh, T(1), dg.data(), Dh);
    gemm<T>(true, false, L, Dh, L, T(1), dsa.data(), L, w.g.data(), Dh, T(0), dxa.data(), Dh);
    add_row_dots(L, Dh, w.a.data(), Dh, dxa.data(), Dh, dth2.data());
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < Dh; ++j) da[i * Dh + j] += cf.th2[i] * dxa[i * Dh + j];
    // g = silu(hz).
    for (int i = 0; i < L * Dh; ++i) dhz[i] = dg[i] * silu_d1(w.hz.data()[i], w.s_hz[i]);

    // Inner read-out hz = β ⊙ (q W2ᵀ) + c ⊙ (q S2ᵀ) + (P ⊙ (q xkᵀ)) u2.
    add_row_dots(L, Dh, w.qw.data(), 2 * Dh, dhz.data(), Dh, dbeta.data());
    add_row_dots(L, Dh, w.qw.data() + Dh, 2 * Dh, dhz.data(), Dh, dcarry.data());
    scale_rows_into(L, Dh, cf.beta.data(), dhz.data(), Dh, dhw.data(), 2 * Dh, false);
    scale_rows_into(L, Dh, cf.carry.data(), dhz.data(), Dh, dhw.data() + Dh, 2 * Dh, false);
    gemm<T>(false, false, L, D, 2 * Dh, T(1), dhw.data(), 2 * Dh, st2, D, T(1), g.q, D);
    gemm<T>(true, false, 2 * Dh, D, L, T(1), dhw.data(), 2 * Dh, in.q, D, T(1), dst2.data(), D);
    gemm<T>(false, true, L, L, Dh, T(1), dhz.data(), Dh, w.u2.data(), Dh, T(0), dsk.data(), L);
    gemm<T>(true, false, L, Dh, L, T(1), w.sk.data(), L, dhz.data(), Dh, T(1), du2.data(), Dh);
    for (int i = 0; i < L * L; ++i) {
      dP[i] += dsk[i] * w.gk.data()[i];
      dsk[i] *= P[i];  // now dL/d(q xkᵀ)
    }
    gemm<T>(false, false, L, D, L, T(1), dsk.data(), L, w.xk.data(), D, T(1), g.q, D);
    gemm<T>(true, false, L, D, L, T(1), dsk.data(), L, in.q, D, T(0), dxk.data(), D);
    add_row_dots(L, D, in.k, D, dxk.data(), D, dth2.data());
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < D; ++j) g.k[i * D + j] += cf.th2[i] * dxk[i * D + j];

    // u2 = m ⊙ silu'(pre), m = u1 W1.
    for (int i = 0; i < L * Dh; ++i) {
      dm[i] = du2[i] * silu_d1(w.pre.data()[i], w.s_pre[i]);
      dpre[i] = du2[i] * w.m.data()[i] * silu_d2(w.pre.data()[i], w.s_pre[i]);
    }
    gemm<T>(false, true, L, D, Dh, T(1), dm.data(), Dh, W1, Dh, T(1), du1.data(), D);
    gemm<T>(true, false, D, Dh, L, T(1), w.u1.data(), D, dm.data(), Dh, T(1), dst1.data(), Dh);
    // u1 = k - v + a W1ᵀ.
    for (int i = 0; i < L * D; ++i) {
      g.k[i] += du1[i];
      g.v[i] = -du1[i];
    }
    gemm<T>(false, false, L, Dh, D, T(1), du1.data(), D, W1, Dh, T(1), da.data(), Dh);
    gemm<T>(true, false, D, Dh, L, T(1), du1.data(), D, w.a.data(), Dh, T(1), dst1.data(), Dh);
    // a = silu(pre), pre = k W2ᵀ.
    for (int i = 0; i < L * Dh; ++i) dpre[i] += da[i] * silu_d1(w.pre.data()[i], w.s_pre[i]);
    gemm<T>(false, false, L, D, Dh, T(1), dpre.data(), Dh, W2, D, T(1), g.k, D);
    gemm<T>(true, false, Dh, D, L, T(1), dpre.data(), Dh, in.k, D, T(1), dst2.data(), D);

    cf.backward(in.eta, dbeta.data(), dcarry.data(), dP.data(), dth2.data(), dmix.data(), dsurprise.data(),
                dmomentum_end, g.theta, g.eta, g.alpha);
    std::copy(dst1.begin(), dst1.end(), d1);
    std::copy(dst2.begin(), dst2.end(), d2);
  }
};

// The linear memory M(z) = W z (W: Dv x Dk), one chunk from the state st = [W; S] (2Dv x Dk):
//
//   u = k Wᵀ - v,   y = β ⊙ (q Wᵀ) + c ⊙ (q Sᵀ) + (P ⊙ (q (th2 ⊙ k)ᵀ)) u
//   W' = β_e W + c_e S + uᵀ (mix ⊙ k),  S' = A_e S + uᵀ (surprise ⊙ k)
template <typename T>
struct LinearChunk {
  int C, Dk, Dv, L = 0;
  Coefficients<T> cf;
  std::vector<T> u, qw, xk, gk, sk, xm, xs;

  LinearChunk(int C, int Dk, int Dv, int /*cols = Dk*/)
      : C(C), Dk(Dk), Dv(Dv), cf(C), u(C * Dv), qw(C * 2 * Dv), xk(C * Dk), gk(C * C), sk(C * C), xm(C * Dk),
        xs(C * Dk) {}

  // Writes the read-outs into y (L x Dv) and the end state into end when they are given; the second
  // block of the MLP memory's signature is unused.
  void forward(const ChunkInputs<T>& in, const T* st, const T*, T* y, T* end, T*) {
    L = in.L;
    const T *W = st, *S = st + Dv * Dk;
    cf.forward(L, in.theta, in.eta, in.alpha);
    std::copy(in.v, in.v + L * Dv, u.data());
    gemm<T>(false, true, L, Dv, Dk, T(1), in.k, Dk, W, Dk, T(-1), u.data(), Dv);
    gemm<T>(false, true, L, 2 * Dv, Dk, T(1), in.q, Dk, st, Dk, T(0), qw.data(), 2 * Dv);
    scale_rows_into(L, Dk, cf.th2.data(), in.k, Dk, xk.data(), Dk, false);
    gemm<T>(false, true, L, L, Dk, T(1), in.q, Dk, xk.data(), Dk, T(0), gk.data(), L);
    for (int i = 0; i < L * L; ++i) sk[i] = cf.P[i] * gk[i];
    scale_rows_into(L, Dk, cf.mix.data(), in.k, Dk, xm.data(), Dk, false);
    scale_rows_into(L, Dk, cf.surprise.data(), in.k, Dk, xs.data(), Dk, false);
    if (y != nullptr) {
      scale_rows_into(L, Dv, cf.beta.data(), qw.data(), 2 * Dv, y, Dv, false);
      scale_rows_into(L, Dv, cf.carry.data(), qw.data() + Dv, 2 * Dv, y, Dv, true);
      gemm<T>(false, false, L, Dv, L, T(1), sk.data(), L, u.data(), Dv, T(1), y, Dv);
    }
    if (end == nullptr) return;
    const T b = cf.beta[L - 1], c = cf.carry[L - 1], A = cf.momentum_end;
    for (int i = 0; i < Dv * Dk; ++i) {
      end[i] = b * W[i] + c * S[i];
      end[Dv * Dk + i] = A * S[i];
    }
    gemm<T>(true, false, Dv, Dk, L, T(1), u.data(), Dv, xm.data(), Dk, T(1), end, Dk);
    gemm<T>(true, false, Dv, Dk, L, T(1), u.data(), Dv, xs.data(), Dk, T(1), end + Dv * Dk, Dk);
  }
};

template <typename T>
struct LinearChunkBackward {
  int C, Dk, Dv;
  std::vector<T> du, dxm, dxs, dxk, dyw, dsk, dP, dst, dbeta, dcarry, dth2, dmix, dsurprise;

  LinearChunkBackward(int C, int Dk, int Dv, int /*cols = Dk*/)
      : C(C), Dk(Dk), Dv(Dv), du(C * Dv), dxm(C * Dk), dxs(C * Dk), dxk(C * Dk), dyw(C * 2 * Dv), dsk(C * C),
        dP(C * C), dst(2 * Dv * Dk), dbeta(C), dcarry(C), dth2(C), dmix(C), dsurprise(C) {}

  // Given dL/dy and dL/d(end state) (d = [dW'; dS'], overwritten with dL/d(start state)), writes the
  // chunk's input gradients. `w` holds the recomputed forward.
  void backward(const ChunkInputs<T>& in, const T* st, const T*, const LinearChunk<T>& w, const T* dy, T* d, T*,
                const ChunkGrads<T>& g) {
    const int L = in.L, DvDk = Dv * Dk;
    const T *W = st, *S = st + DvDk, *dWe = d, *dSe = d + DvDk;
    const auto& cf = w.cf;
    const T b = cf.beta[L - 1], c = cf.carry[L - 1], A = cf.momentum_end;
    for (auto* x : {&dbeta, &dcarry, &dth2, &dmix, &dsurprise}) std::fill(x->begin(), x->begin() + L, T(0));
    std::fill(dP.begin(), dP.begin() + L * L, T(0));

    // End state: W' = β_e W + c_e S + uᵀ (mix ⊙ k), S' = A_e S + uᵀ (surprise ⊙ k).
    dbeta[L - 1] += dot(DvDk, W, dWe);
    dcarry[L - 1] += dot(DvDk, S, dWe);
    const T dmomentum_end = dot(DvDk, S, dSe);
    for (int i = 0; i < DvDk; ++i) {
      dst[i] = b * dWe[i];
      dst[DvDk + i] = c * dWe[i] + A * dSe[i];
    }
    gemm<T>(false, true, L, Dv, Dk, T(1), w.xm.data(), Dk, dWe, Dk, T(0), du.data(), Dv);
    gemm<T>(false, true, L, Dv, Dk, T(1), w.xs.data(), Dk, dSe, Dk, T(1), du.data(), Dv);
    gemm<T>(false, false, L, Dk, Dv, T(1), w.u.data(), Dv, dWe, Dk, T(0), dxm.data(), Dk);
    gemm<T>(false, false, L, Dk, Dv, T(1), w.u.data(), Dv, dSe, Dk, T(0), dxs.data(), Dk);
    add_row_dots(L, Dk, in.k, Dk, dxm.data(), Dk, dmix.data());
    add_row_dots(L, Dk, in.k, Dk, dxs.data(), Dk, dsurprise.data());
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < Dk; ++j)
        g.k[i * Dk + j] = cf.mix[i] * dxm[i * Dk + j] + cf.surprise[i] * dxs[i * Dk + j];

    // Read-out y = β ⊙ (q Wᵀ) + c ⊙ (q Sᵀ) + (P ⊙ (q xkᵀ)) u.
    add_row_dots(L, Dv, w.qw.data(), 2 * Dv, dy, Dv, dbeta.data());
    add_row_dots(L, Dv, w.qw.data() + Dv, 2 * Dv, dy, Dv, dcarry.data());
    scale_rows_into(L, Dv, cf.beta.data(), dy, Dv, dyw.data(), 2 * Dv, false);
    scale_rows_into(L, Dv, cf.carry.data(), dy, Dv, dyw.data() + Dv, 2 * Dv, false);
    gemm<T>(false, false, L, Dk, 2 * Dv, T(1), dyw.data(), 2 * Dv, st, Dk, T(0), g.q, Dk);
    gemm<T>(true, false, 2 * Dv, Dk, L, T(1), dyw.data(), 2 * Dv, in.q, Dk, T(1), dst.data(), Dk);
    gemm<T>(false, true, L, L, Dv, T(1), dy, Dv, w.u.data(), Dv, T(0), dsk.data(), L);
    gemm<T>(true, false, L, Dv, L, T(1), w.sk.data(), L, dy, Dv, T(1), du.data(), Dv);
    for (int i = 0; i < L * L; ++i) {
      dP[i] += dsk[i] * w.gk[i];
      dsk[i] *= cf.P[i];  // now dL/d(q xkᵀ)
    }
    gemm<T>(false, false, L, Dk, L, T(1), dsk.data(), L, w.xk.data(), Dk, T(1), g.q, Dk);
    gemm<T>(true, false, L, Dk, L, T(1), dsk.data(), L, in.q, Dk, T(0), dxk.data(), Dk);
    add_row_dots(L, Dk, in.k, Dk, dxk.data(), Dk, dth2.data());
    for (int i = 0; i < L; ++i)
      for (int j = 0; j < Dk; ++j) g.k[i * Dk + j] += cf.th2[i] * dxk[i * Dk + j];

    // u = k Wᵀ - v.
    for (int i = 0; i < L * Dv; ++i) g.v[i] = -du[i];
    gemm<T>(false, false, L, Dk, Dv, T(1), du.data(), Dv, W, Dk, T(1), g.k, Dk);
    gemm<T>(true, false, Dv, Dk, L, T(1), du.data(), Dv, in.k, Dk, T(1), dst.data(), Dk);

    cf.backward(in.eta, dbeta.data(), dcarry.data(), dP.data(), dth2.data(), dmix.data(), dsurprise.data(),
                dmomentum_end, g.theta, g.eta, g.alpha);
    std::copy(dst.begin(), dst.end(), d);
  }
};

// Chunk `chunk` of item `item`: q, k (N, T, Dk), v (N, T, Dv), gates (N, T).
template <typename T, typename Ptrs, typename Tensors>
Ptrs chunk_pointers(Tensors& x, int64_t item, int64_t chunk, int C, int64_t T_len, int Dk, int Dv) {
  const int64_t row = item * T_len + chunk * C;
  return {x[0].template data_ptr<T>() + row * Dk, x[1].template data_ptr<T>() + row * Dk,
          x[2].template data_ptr<T>() + row * Dv, x[3].template data_ptr<T>() + row,
          x[4].template data_ptr<T>() + row,      x[5].template data_ptr<T>() + row};
}

template <typename T>
ChunkInputs<T> chunk_inputs(const std::vector<Tensor>& x, int64_t item, int64_t chunk, int C, int64_t T_len, int Dk,
                            int Dv) {
  struct Ptrs {
    const T *q, *k, *v, *theta, *eta, *alpha;
  };
  const auto p = chunk_pointers<T, Ptrs>(x, item, chunk, C, T_len, Dk, Dv);
  const int L = static_cast<int>(std::min<int64_t>(C, T_len - chunk * C));
  return {L, p.q, p.k, p.v, p.theta, p.eta, p.alpha};
}

template <typename T>
ChunkGrads<T> chunk_grads(std::vector<Tensor>& x, int64_t item, int64_t chunk, int C, int64_t T_len, int Dk, int Dv) {
  return chunk_pointers<T, ChunkGrads<T>>(x, item, chunk, C, T_len, Dk, Dv);
}

// The chunk loop of every item, forward: `states` are the start state's blocks (N, 2, rows, cols)
// ([W1; S1], [W2; S2] for the MLP memory; [W; S] for the linear one). Returns y (N, T, Dv) and each
// block's chunk-start states (N, n + 1, 2, rows, cols), index n being the end state.
template <template <typename> class Chunk>
std::vector<Tensor> run_forward(const char* name, const std::vector<Tensor>& inputs, std::vector<Tensor> states,
                                int64_t chunk) {
  std::vector<Tensor> all(inputs);
  all.insert(all.end(), states.begin(), states.end());
  check_inputs(all, name);
  const auto &q = inputs[0], &v = inputs[2];
  const int64_t N = q.size(0), T_len = q.size(1), n = (T_len + chunk - 1) / chunk;
  const int C = static_cast<int>(chunk), Dk = q.size(2), Dv = v.size(2), cols = states[0].size(3);
  auto y = at::empty_like(v);
  std::vector<Tensor> outputs{y};
  std::vector<int64_t> block;
  for (const auto& state : states) {
    auto saved = at::empty({N, n + 1, 2, state.size(2), state.size(3)}, state.options());
    saved.select(1, 0).copy_(state);
    outputs.push_back(saved);
    block.push_back(2 * state.size(2) * state.size(3));
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "titans_chunks", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Chunk<scalar_t> work(C, Dk, Dv, cols);
      for (int64_t item = begin; item < end; ++item) {
        for (int64_t c = 0; c < n; ++c) {
          scalar_t *start[2] = {nullptr, nullptr}, *next[2] = {nullptr, nullptr};
          for (size_t b = 0; b < block.size(); ++b) {
            start[b] = outputs[1 + b].data_ptr<scalar_t>() + (item * (n + 1) + c) * block[b];
            next[b] = start[b] + block[b];
          }
          work.forward(chunk_inputs<scalar_t>(inputs, item, c, C, T_len, Dk, Dv), start[0], start[1],
                       y.data_ptr<scalar_t>() + (item * T_len + c * C) * Dv, next[0], next[1]);
        }
      }
    });
  });
  return outputs;
}

// Backward: gradients of the inputs and of the start state's blocks from dy and d(end state),
// recomputing each chunk's forward from its saved start state. (Keeping the forward's GEMM outputs
// instead was slower here: writing them, about 33 MB for the MLP memory at B=4, H=4, T=1024, costs
// as many page faults as the GEMMs save.) Returns dq, dk, dv, dtheta, deta, dalpha, d(blocks).
template <template <typename> class Chunk, template <typename> class Backward>
std::vector<Tensor> run_backward(const char* name, const std::vector<Tensor>& inputs, const std::vector<Tensor>& saved,
                                 const Tensor& dy, const std::vector<Tensor>& d_end, int64_t chunk) {
  std::vector<Tensor> all(inputs);
  all.insert(all.end(), saved.begin(), saved.end());
  all.push_back(dy);
  all.insert(all.end(), d_end.begin(), d_end.end());
  check_inputs(all, name);
  const auto &q = inputs[0], &v = inputs[2];
  const int64_t N = q.size(0), T_len = q.size(1), n = (T_len + chunk - 1) / chunk;
  const int C = static_cast<int>(chunk), Dk = q.size(2), Dv = v.size(2), cols = saved[0].size(4);
  std::vector<Tensor> grads;
  for (const auto& t : inputs) grads.push_back(at::empty_like(t));
  std::vector<int64_t> block;
  for (size_t b = 0; b < saved.size(); ++b) {
    grads.push_back(d_end[b].clone());  // becomes d(start state), chunk by chunk
    block.push_back(2 * saved[b].size(3) * saved[b].size(4));
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "titans_chunks", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Chunk<scalar_t> work(C, Dk, Dv, cols);
      Backward<scalar_t> back(C, Dk, Dv, cols);
      for (int64_t item = begin; item < end; ++item) {
        scalar_t* d_state[2] = {nullptr, nullptr};
        for (size_t b = 0; b < block.size(); ++b) d_state[b] = grads[6 + b].data_ptr<scalar_t>() + item * block[b];
        for (int64_t c = n - 1; c >= 0; --c) {
          const auto in = chunk_inputs<scalar_t>(inputs, item, c, C, T_len, Dk, Dv);
          const scalar_t* start[2] = {nullptr, nullptr};
          for (size_t b = 0; b < block.size(); ++b)
            start[b] = saved[b].data_ptr<scalar_t>() + (item * (n + 1) + c) * block[b];
          work.forward(in, start[0], start[1], nullptr, nullptr, nullptr);
          back.backward(in, start[0], start[1], work, dy.data_ptr<scalar_t>() + (item * T_len + c * C) * Dv,
                        d_state[0], d_state[1], chunk_grads<scalar_t>(grads, item, c, C, T_len, Dk, Dv));
        }
      }
    });
  });
  return grads;
}

}  // namespace

// The MLP memory. Inputs (N items, T tokens, D dims, Dh hidden, chunks of C tokens):
//   q, k, v (N, T, D); theta, eta, alpha (N, T); st1 = [W1; S1] (N, 2, D, Dh), st2 = [W2; S2]
//   (N, 2, Dh, D), the start state.
// Returns y (N, T, D) and the chunk-start states st1s (N, n + 1, 2, D, Dh), st2s (N, n + 1, 2, Dh, D)
// (index n is the end state).
std::vector<Tensor> titans_mlp_chunks_forward(std::vector<Tensor> inputs, Tensor st1, Tensor st2, int64_t chunk) {
  return run_forward<MlpChunk>("titans_mlp_chunks", inputs, {st1, st2}, chunk);
}

// Returns dq, dk, dv, dtheta, deta, dalpha, dst1, dst2.
std::vector<Tensor> titans_mlp_chunks_backward(std::vector<Tensor> inputs, Tensor st1s, Tensor st2s, Tensor dy,
                                               Tensor dst1_end, Tensor dst2_end, int64_t chunk) {
  return run_backward<MlpChunk, MlpChunkBackward>("titans_mlp_chunks", inputs, {st1s, st2s}, dy,
                                                  {dst1_end, dst2_end}, chunk);
}

// The linear memory. Inputs: q, k (N, T, Dk), v (N, T, Dv); theta, eta, alpha (N, T); st = [W; S]
// (N, 2, Dv, Dk), the start state. Returns y (N, T, Dv) and the chunk-start states (N, n + 1, 2, Dv, Dk).
std::vector<Tensor> titans_linear_chunks_forward(std::vector<Tensor> inputs, Tensor st, int64_t chunk) {
  return run_forward<LinearChunk>("titans_linear_chunks", inputs, {st}, chunk);
}

// Returns dq, dk, dv, dtheta, deta, dalpha, dst.
std::vector<Tensor> titans_linear_chunks_backward(std::vector<Tensor> inputs, Tensor sts, Tensor dy, Tensor dst_end,
                                                  int64_t chunk) {
  return run_backward<LinearChunk, LinearChunkBackward>("titans_linear_chunks", inputs, {sts}, dy, {dst_end}, chunk);
}

}  // namespace nl_cpu
