// Fused CPU kernel for the chunk loop of the DGD MLP memory M(z) = z + W1 silu(W2 z)
// (nl_lightning/ops/dgd/chunk.py, mlp_chunk_step), forward and hand-written backward.
//
// Why: the ATen chunk kernel issues ~50 small ops per chunk, each over all (batch, head) pairs,
// so every op streams its operands through memory and synchronises the thread pool. Here each
// thread runs the whole chunk loop of one (batch, head) item with its working set (a few 64 x 48
// matrices) in cache: small BLAS calls and plain loops, no dispatcher, no autograd graph.
//
// Each chunk also builds its own decays (common.h, Decays), key system KS = I + η_t PR (k kᵀ) and
// key read matrix KR = RA ⊙ (q kᵀ), which chunk.py builds for all chunks at once in ATen: in
// ATen those (B, H, n, L, L) tensors and their backward cost about as much as the loop itself.
// Equations and the forward's names follow chunk.py:
//
//   pre = k W2ᵀ, hid = silu(pre), hw1 = hid W1ᵀ, a = v W2ᵀ, d1 = c (k + hw1 - tgt)
//   tgt = v + silu(a) W1ᵀ (target "self") or v (target "value")
//   m = d1 W1, r2 = KS⁻¹ (-e2 silu'(pre) m - η2 (γ_prev - s) pre)
//   z = γ (q W2ᵀ) + KR r2, W2' = γ_L W2 + (ρ r2)ᵀ k                       (layer W2, inputs k)
//   hq = silu(z), S1 = I + η1 PR (hid hidᵀ), r1 = S1⁻¹ (-η1 d1 - η1 (γ_prev - s) hw1)
//   out = q + γ (hq W1ᵀ) + (RA (hq hidᵀ)) r1, W1' = γ_L W1 + (ρ r1)ᵀ hid   (layer W1, inputs hid)
//
// with γ = exp(lg), γ_prev = exp(lgp), γ_L = γ[L-1], ρ = RA[L-1, :], KS = I + η2 PR (k kᵀ). The
// write rule sets c, s and the layer steps η2, η1 from the gate β (naive.py):
//   "dgd":   c = 2, s = 0, η2 = η1 = e2 = β;
//   "delta": c = 1, s = 1, η2 = β / (|k|² + ε), η1 = β / (|hid|² + ε),
//            e2 = η2 (1 - η1 |hid|²) / (κ + ε_κ), κ = Σ_j silu'(pre_j)² |W1[:, j]|²
//            (u = η (y - g) in chunk.py; W2 corrects the error W1's write leaves, divided by the
//            curvature κ of the output in W2's pre-activations; naive.py).
// The backward recomputes one chunk's forward from its saved chunk-start state and applies the
// chain rule in reverse order.
// tests/ops/test_dgd_memory.py checks both against the ATen chunk kernel and the token loop.

#include "../cpu/common.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace nl_cpu {
namespace {

// One chunk's inputs for one item.
template <typename T>
struct ChunkInputs {
  const T *q, *k, *v, *eta, *alpha;
};

// The write rule (naive.py): the paper's DGD or the normalised delta rule, and the target.
struct Rule {
  bool delta;        // "delta" (else "dgd")
  bool self_target;  // v̂ = M(v) (else v)
  // ε of the delta rule's step β / (|x|² + ε) (ops/dgd/common.py, NLMS_EPS)
  double eps;
  // ε of W2's curvature normalisation κ + ε (ops/dgd/common.py, CURVATURE_EPS)
  double curvature_eps;
};

// Everything one chunk's forward computes; the backward recomputes it and reads it.
template <typename T>
struct ChunkWork {
  int L, D, Dh;
  Rule rule;
  Decays<T> decays;
  // key Gram k kᵀ, key system KS, q kᵀ and the key read matrix KR = RA ⊙ (q kᵀ)
  std::vector<T> gram_k, ks, qk, kr;
  std::vector<T> pre, s_pre, hid, hw1, a, s_a, sa, d1, m, r2, lr2, zq, z, s_z, hq, gram, s1, r1, lr1, p, rd, oq,
      gamma, gamma_prev;
  // per-token layer steps η2 (inputs k), η1 (inputs hid), their η (γ_prev - s), and the squared
  // input norms the delta rule divides by
  std::vector<T> eta2, eta1, e2, gpe2, gpe1, norm_k, norm_hid, kappa;
  std::vector<T> w1_colsq;  // |W1[:, j]|², for κ
  ChunkWork(int L, int D, int Dh, Rule rule) : L(L), D(D), Dh(Dh), rule(rule), decays(L) {
    for (auto* x : {&pre, &s_pre, &hid, &a, &s_a, &sa, &m, &r2, &lr2, &zq, &z, &s_z, &hq}) x->resize(L * Dh);
    for (auto* x : {&hw1, &d1, &r1, &lr1, &oq}) x->resize(L * D);
    for (auto* x : {&gram, &s1, &p, &rd, &gram_k, &ks, &qk, &kr}) x->resize(L * L);
    for (auto* x : {&gamma, &gamma_prev, &eta2, &eta1, &e2, &gpe2, &gpe1, &norm_k, &norm_hid, &kappa}) x->resize(L);
    w1_colsq.resize(Dh);
  }

  T shift() const { return rule.delta ? T(1) : T(0); }  // s: the delta rule keeps the start state's output

  // η of a layer from the gate β and the squared norm of its input.
  T layer_step(T beta, T norm) const { return rule.delta ? beta / (norm + T(rule.eps)) : beta; }

  // Runs the chunk from state (w1: D x Dh, w2: Dh x D). Writes the read-outs into `out` (L x D)
  // and the end state into (w1_end, w2_end) when they are given.
  void forward(const ChunkInputs<T>& in, const T* w1, const T* w2, T* out, T* w1_end, T* w2_end) {
    const int LD = L * D, LDh = L * Dh;
    decays.forward(in.alpha);
    for (int t = 0; t < L; ++t) {
      gamma[t] = std::exp(decays.lg[t]);
      gamma_prev[t] = std::exp(decays.lgp[t]);
      norm_k[t] = dot(D, in.k + t * D, in.k + t * D);
      eta2[t] = layer_step(in.eta[t], norm_k[t]);
      gpe2[t] = eta2[t] * (gamma_prev[t] - shift());
    }
    const T* pr = decays.pr.data();
    gemm<T>(false, true, L, L, D, T(1), in.k, D, in.k, D, T(0), gram_k.data(), L);
    build_system(L, eta2.data(), pr, gram_k.data(), ks.data());
    gemm<T>(false, true, L, L, D, T(1), in.q, D, in.k, D, T(0), qk.data(), L);
    for (int i = 0; i < L * L; ++i) kr[i] = decays.ra[i] * qk[i];
    gemm<T>(false, true, L, Dh, D, T(1), in.k, D, w2, D, T(0), pre.data(), Dh);
    silu(LDh, pre.data(), s_pre.data(), hid.data());
    if (rule.delta) {
      std::fill(w1_colsq.begin(), w1_colsq.end(), T(0));
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < Dh; ++j) w1_colsq[j] += w1[i * Dh + j] * w1[i * Dh + j];
      for (int t = 0; t < L; ++t) {
        T acc = 0;
        for (int j = 0; j < Dh; ++j) {
          const T sd = silu_d1(pre[t * Dh + j], s_pre[t * Dh + j]);
          acc += sd * sd * w1_colsq[j];
        }
        kappa[t] = acc;
      }
    }
    for (int t = 0; t < L; ++t) {
      norm_hid[t] = dot(Dh, hid.data() + t * Dh, hid.data() + t * Dh);
      eta1[t] = layer_step(in.eta[t], norm_hid[t]);
      gpe1[t] = eta1[t] * (gamma_prev[t] - shift());
      e2[t] = rule.delta ? eta2[t] * (T(1) - eta1[t] * norm_hid[t]) / (kappa[t] + T(rule.curvature_eps)) : eta2[t];
    }
    gemm<T>(false, true, L, D, Dh, T(1), hid.data(), Dh, w1, Dh, T(0), hw1.data(), D);
    const T c = rule.delta ? T(1) : T(2);
    if (rule.self_target) {
      gemm<T>(false, true, L, Dh, D, T(1), in.v, D, w2, D, T(0), a.data(), Dh);
      silu(LDh, a.data(), s_a.data(), sa.data());
      gemm<T>(false, true, L, D, Dh, T(1), sa.data(), Dh, w1, Dh, T(0), d1.data(), D);  // W1 silu(W2 v)
      for (int i = 0; i < LD; ++i) d1[i] = c * (in.k[i] + hw1[i] - in.v[i] - d1[i]);
    } else {
      for (int i = 0; i < LD; ++i) d1[i] = c * (in.k[i] + hw1[i] - in.v[i]);
    }
    gemm<T>(false, false, L, Dh, D, T(1), d1.data(), D, w1, Dh, T(0), m.data(), Dh);
    // Layer W2 (inputs k).
    w2_rhs(L, Dh, pre.data(), s_pre.data(), m.data(), e2.data(), gpe2.data(), r2.data());
    solve_lower_unit(L, Dh, ks.data(), r2.data());
    gemm<T>(false, true, L, Dh, D, T(1), in.q, D, w2, D, T(0), zq.data(), Dh);
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < Dh; ++j) z[t * Dh + j] = gamma[t] * zq[t * Dh + j];
    gemm<T>(false, false, L, Dh, L, T(1), kr.data(), L, r2.data(), Dh, T(1), z.data(), Dh);
    silu(LDh, z.data(), s_z.data(), hq.data());
    // Layer W1 (inputs hid).
    gemm<T>(false, true, L, L, Dh, T(1), hid.data(), Dh, hid.data(), Dh, T(0), gram.data(), L);
    build_system(L, eta1.data(), pr, gram.data(), s1.data());
    w1_rhs(L, D, d1.data(), hw1.data(), eta1.data(), gpe1.data(), r1.data());
    solve_lower_unit(L, D, s1.data(), r1.data());
    gemm<T>(false, true, L, L, Dh, T(1), hq.data(), Dh, hid.data(), Dh, T(0), p.data(), L);
    for (int i = 0; i < L * L; ++i) rd[i] = decays.ra[i] * p[i];
    gemm<T>(false, true, L, D, Dh, T(1), hq.data(), Dh, w1, Dh, T(0), oq.data(), D);
    const T* last = decays.ra.data() + static_cast<int64_t>(L - 1) * L;  // ρ_i = γ_L / γ_i
    scale_rows(L, Dh, last, r2.data(), lr2.data());
    scale_rows(L, D, last, r1.data(), lr1.data());
    if (out != nullptr) {
      for (int t = 0; t < L; ++t)
        for (int j = 0; j < D; ++j) out[t * D + j] = in.q[t * D + j] + gamma[t] * oq[t * D + j];
      gemm<T>(false, false, L, D, L, T(1), rd.data(), L, r1.data(), D, T(1), out, D);
    }
    if (w1_end != nullptr) {
      const T gamma_end = gamma[L - 1];
      for (int i = 0; i < D * Dh; ++i) w1_end[i] = gamma_end * w1[i];
      for (int i = 0; i < Dh * D; ++i) w2_end[i] = gamma_end * w2[i];
      gemm<T>(true, false, D, Dh, L, T(1), lr1.data(), D, hid.data(), Dh, T(1), w1_end, Dh);
      gemm<T>(true, false, Dh, D, L, T(1), lr2.data(), Dh, in.k, D, T(1), w2_end, D);
    }
  }
};

// One chunk's input gradients for one item.
template <typename T>
struct ChunkGrads {
  T *q, *k, *v, *eta, *alpha;
};

template <typename T>
struct ChunkBackward {
  int L, D, Dh;
  std::vector<T> dlr1, dhid, dr1, doq, drd, dhq, dp, ds, dhw1, dd1, dz, dlr2, dr2, dzq, dpre, dm, dsa, da, dg,
      dgpe1, dgpe2, deta1, deta2, de2, dlast, dw1_start, dw2_start, dcolsq, dlg, dlgp, dpr, dra, dks, dkr;
  ChunkBackward(int L, int D, int Dh) : L(L), D(D), Dh(Dh) {
    for (auto* x : {&dlr1, &dr1, &doq, &dhw1, &dd1}) x->resize(L * D);
    for (auto* x : {&dhid, &dhq, &dz, &dlr2, &dr2, &dzq, &dpre, &dm, &dsa, &da}) x->resize(L * Dh);
    for (auto* x : {&drd, &dp, &ds, &dpr, &dra, &dks, &dkr}) x->resize(L * L);
    for (auto* x : {&dg, &dgpe1, &dgpe2, &deta1, &deta2, &de2, &dlast, &dlg, &dlgp}) x->resize(L);
    dw1_start.resize(D * Dh);
    dcolsq.resize(Dh);
    dw2_start.resize(Dh * D);
  }

  // Backward of a layer's step η_l = β / (|x|² + ε) (delta rule; = β for DGD) and of
  // gpe_l = η_l (γ_prev - s): completes deta (in: dL/dη_l through the system and the rhs) with
  // gpe_l's share, then adds dL/dβ to dbeta (written when `first`, since g.eta starts unset) and,
  // for the delta rule, dL/dx = -2 η_l dη_l / (|x|² + ε) x to dx (rows of width cols).
  static void layer_step_backward(const ChunkWork<T>& w, const T* eta, const T* norm, const T* x, int cols,
                                  const T* dgpe, T* deta, T* dx, T* dbeta, bool first) {
    const T s = w.shift();
    for (int t = 0; t < w.L; ++t) {
      deta[t] += dgpe[t] * (w.gamma_prev[t] - s);
      const T inv = w.rule.delta ? T(1) / (norm[t] + T(w.rule.eps)) : T(1);
      dbeta[t] = (first ? T(0) : dbeta[t]) + deta[t] * inv;
      if (w.rule.delta) {
        const T coef = T(-2) * deta[t] * eta[t] * inv;
        for (int j = 0; j < cols; ++j) dx[t * cols + j] += coef * x[t * cols + j];
      }
    }
  }

  // Given dL/d(out) and dL/d(end state) (dw1, dw2, overwritten with dL/d(start state)), writes the
  // chunk's input gradients. `w` holds this chunk's recomputed forward.
  void backward(const ChunkInputs<T>& in, const T* w1, const T* w2, const ChunkWork<T>& w, const T* dout, T* dw1,
                T* dw2, const ChunkGrads<T>& g) {
    const int LD = L * D, LDh = L * Dh, LL = L * L;
    const T* last = w.decays.ra.data() + static_cast<int64_t>(L - 1) * L;  // ρ
    const T* ra = w.decays.ra.data();
    const T* pr = w.decays.pr.data();
    const T gamma_end = w.gamma[L - 1];
    T dgamma_end = 0;
    for (int i = 0; i < D * Dh; ++i) dgamma_end += w1[i] * dw1[i];
    for (int i = 0; i < Dh * D; ++i) dgamma_end += w2[i] * dw2[i];
    for (int i = 0; i < D * Dh; ++i) dw1_start[i] = gamma_end * dw1[i];
    for (int i = 0; i < Dh * D; ++i) dw2_start[i] = gamma_end * dw2[i];
    for (auto* x : {&dg, &dgpe1, &dgpe2, &deta1, &deta2, &de2}) std::fill(x->begin(), x->end(), T(0));

    // W1' = γ_L W1 + lr1ᵀ hid, lr1 = ρ r1.
    gemm<T>(false, true, L, D, Dh, T(1), w.hid.data(), Dh, dw1, Dh, T(0), dlr1.data(), D);
    gemm<T>(false, false, L, Dh, D, T(1), w.lr1.data(), D, dw1, Dh, T(0), dhid.data(), Dh);
    std::fill(dlast.begin(), dlast.end(), T(0));
    scale_rows_backward(L, D, last, w.r1.data(), dlr1.data(), dr1.data(), dlast.data());
    // out = q + γ oq + rd r1, oq = hq W1ᵀ, rd = RA ⊙ (hq hidᵀ).
    for (int t = 0; t < L; ++t) {
      T acc = 0;
      for (int j = 0; j < D; ++j) {
        const int i = t * D + j;
        g.q[i] = dout[i];
        acc += w.oq[i] * dout[i];
        doq[i] = w.gamma[t] * dout[i];
      }
      dg[t] += acc;
    }
    gemm<T>(false, true, L, L, D, T(1), dout, D, w.r1.data(), D, T(0), drd.data(), L);
    gemm<T>(true, false, L, D, L, T(1), w.rd.data(), L, dout, D, T(1), dr1.data(), D);
    gemm<T>(false, false, L, Dh, D, T(1), doq.data(), D, w1, Dh, T(0), dhq.data(), Dh);
    gemm<T>(true, false, D, Dh, L, T(1), doq.data(), D, w.hq.data(), Dh, T(1), dw1_start.data(), Dh);
    for (int i = 0; i < LL; ++i) {
      dra[i] = drd[i] * w.p[i];
      dp[i] = drd[i] * ra[i];
    }
    gemm<T>(false, false, L, Dh, L, T(1), dp.data(), L, w.hid.data(), Dh, T(1), dhq.data(), Dh);
    gemm<T>(true, false, L, Dh, L, T(1), dp.data(), L, w.hq.data(), Dh, T(1), dhid.data(), Dh);
    // r1 = S1⁻¹ rhs1, rhs1 = -η1 d1 - gpe1 hw1; dr1 becomes d(rhs1).
    solve_backward(L, D, w.s1.data(), w.r1.data(), dr1.data(), ds.data());
    w1_rhs_backward(L, D, dr1.data(), w.d1.data(), w.hw1.data(), w.eta1.data(), w.gpe1.data(), deta1.data(),
                    dgpe1.data(), dd1.data(), dhw1.data());
    // S1 = I + η1_t PR ⊙ gram (strictly lower): ds becomes d(gram), gram = hid hidᵀ.
    std::fill(dpr.begin(), dpr.end(), T(0));
    system_backward(L, w.eta1.data(), pr, w.gram.data(), ds.data(), deta1.data(), dpr.data());
    gram_backward(L, Dh, ds.data(), w.hid.data(), Dh, dhid.data(), Dh);
    // gpe1 = η1 (γ_prev - s); delta rule: η1 = β / (|hid|² + ε).
    layer_step_backward(w, w.eta1.data(), w.norm_hid.data(), w.hid.data(), Dh, dgpe1.data(), deta1.data(),
                        dhid.data(), g.eta, true);
    // hq = silu(z).
    for (int i = 0; i < LDh; ++i) dz[i] = dhq[i] * silu_d1(w.z[i], w.s_z[i]);
    // W2' = γ_L W2 + lr2ᵀ k, lr2 = ρ r2.
    gemm<T>(false, true, L, Dh, D, T(1), in.k, D, dw2, D, T(0), dlr2.data(), Dh);
    gemm<T>(false, false, L, D, Dh, T(1), w.lr2.data(), Dh, dw2, D, T(0), g.k, D);
    scale_rows_backward(L, Dh, last, w.r2.data(), dlr2.data(), dr2.data(), dlast.data());
    // z = γ zq + KR r2, zq = q W2ᵀ.
    for (int t = 0; t < L; ++t) {
      T acc = 0;
      for (int j = 0; j < Dh; ++j) {
        const int i = t * Dh + j;
        acc += w.zq[i] * dz[i];
        dzq[i] = w.gamma[t] * dz[i];
      }
      dg[t] += acc;
    }
    gemm<T>(false, true, L, L, Dh, T(1), dz.data(), Dh, w.r2.data(), Dh, T(0), dkr.data(), L);
    gemm<T>(true, false, L, Dh, L, T(1), w.kr.data(), L, dz.data(), Dh, T(1), dr2.data(), Dh);
    gemm<T>(false, false, L, D, Dh, T(1), dzq.data(), Dh, w2, D, T(1), g.q, D);
    gemm<T>(true, false, Dh, D, L, T(1), dzq.data(), Dh, in.q, D, T(1), dw2_start.data(), D);
    // r2 = KS⁻¹ rhs2, rhs2 = -e2 silu'(pre) m - gpe2 pre; dr2 becomes d(rhs2).
    solve_backward(L, Dh, w.ks.data(), w.r2.data(), dr2.data(), dks.data());
    w2_rhs_backward(L, Dh, dr2.data(), w.pre.data(), w.s_pre.data(), w.m.data(), w.e2.data(), w.gpe2.data(),
                    de2.data(), dgpe2.data(), dm.data(), dpre.data());
    // e2 = η2 (delta rule: η2 f r, f = 1 - η1 |hid|² = 1 - β |hid|² / (|hid|² + ε), r = 1 / (κ + ε),
    // κ = Σ_j silu'(pre_j)² |W1[:, j]|²).
    if (w.rule.delta) std::fill(dcolsq.begin(), dcolsq.end(), T(0));
    for (int t = 0; t < L; ++t) {
      if (!w.rule.delta) {
        deta2[t] += de2[t];
        continue;
      }
      const T inv = T(1) / (w.norm_hid[t] + T(w.rule.eps));
      const T r = T(1) / (w.kappa[t] + T(w.rule.curvature_eps));
      const T f = T(1) - w.eta1[t] * w.norm_hid[t];
      deta2[t] += de2[t] * f * r;
      const T df = de2[t] * w.eta2[t] * r;
      g.eta[t] -= df * w.norm_hid[t] * inv;
      const T coef = T(-2) * df * in.eta[t] * T(w.rule.eps) * inv * inv;  // d|hid|² -> dhid = 2 hid
      for (int j = 0; j < Dh; ++j) dhid[t * Dh + j] += coef * w.hid[t * Dh + j];
      const T dkappa = -de2[t] * w.e2[t] * r;
      for (int j = 0; j < Dh; ++j) {
        const int i = t * Dh + j;
        const T sd = silu_d1(w.pre[i], w.s_pre[i]);
        dpre[i] += dkappa * T(2) * sd * silu_d2(w.pre[i], w.s_pre[i]) * w.w1_colsq[j];
        dcolsq[j] += dkappa * sd * sd;
      }
    }
    if (w.rule.delta)  // |W1[:, j]|² -> dW1[:, j] = 2 W1[:, j]
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < Dh; ++j) dw1_start[i * Dh + j] += T(2) * dcolsq[j] * w1[i * Dh + j];
    // m = d1 W1.
    gemm<T>(false, true, L, D, Dh, T(1), dm.data(), Dh, w1, Dh, T(1), dd1.data(), D);
    gemm<T>(true, false, D, Dh, L, T(1), w.d1.data(), D, dm.data(), Dh, T(1), dw1_start.data(), Dh);
    // d1 = c (k + hw1 - v - W1 silu(a)), a = v W2ᵀ (the last term for target "self" only).
    // dd1 becomes c dd1 = -d(W1 silu(a)).
    const T c = w.rule.delta ? T(1) : T(2);
    for (int i = 0; i < LD; ++i) {
      dd1[i] *= c;
      g.k[i] += dd1[i];
      dhw1[i] += dd1[i];
      g.v[i] = -dd1[i];
    }
    if (w.rule.self_target) {
      gemm<T>(false, false, L, Dh, D, T(-1), dd1.data(), D, w1, Dh, T(0), dsa.data(), Dh);
      gemm<T>(true, false, D, Dh, L, T(-1), dd1.data(), D, w.sa.data(), Dh, T(1), dw1_start.data(), Dh);
      for (int i = 0; i < LDh; ++i) da[i] = dsa[i] * silu_d1(w.a[i], w.s_a[i]);
      gemm<T>(false, false, L, D, Dh, T(1), da.data(), Dh, w2, D, T(1), g.v, D);
      gemm<T>(true, false, Dh, D, L, T(1), da.data(), Dh, in.v, D, T(1), dw2_start.data(), D);
    }
    // hw1 = hid W1ᵀ; hid = silu(pre); pre = k W2ᵀ.
    gemm<T>(false, false, L, Dh, D, T(1), dhw1.data(), D, w1, Dh, T(1), dhid.data(), Dh);
    gemm<T>(true, false, D, Dh, L, T(1), dhw1.data(), D, w.hid.data(), Dh, T(1), dw1_start.data(), Dh);
    for (int i = 0; i < LDh; ++i) dpre[i] += dhid[i] * silu_d1(w.pre[i], w.s_pre[i]);
    gemm<T>(false, false, L, D, Dh, T(1), dpre.data(), Dh, w2, D, T(1), g.k, D);
    gemm<T>(true, false, Dh, D, L, T(1), dpre.data(), Dh, in.k, D, T(1), dw2_start.data(), D);
    // KS = I + η2_t PR ⊙ (k kᵀ) (strictly lower), KR = RA ⊙ (q kᵀ).
    system_backward(L, w.eta2.data(), pr, w.gram_k.data(), dks.data(), deta2.data(), dpr.data());  // dks: now dL/d(k kᵀ)
    gram_backward(L, D, dks.data(), in.k, D, g.k, D);
    // gpe2 = η2 (γ_prev - s); delta rule: η2 = β / (|k|² + ε). Writes g.eta (η1's part is in dlgp's input).
    layer_step_backward(w, w.eta2.data(), w.norm_k.data(), in.k, D, dgpe2.data(), deta2.data(), g.k, g.eta, false);
    for (int i = 0; i < LL; ++i) {
      dra[i] += dkr[i] * w.qk[i];
      dkr[i] *= ra[i];  // now dL/d(q kᵀ)
    }
    gemm<T>(false, false, L, D, L, T(1), dkr.data(), L, in.k, D, T(1), g.q, D);
    gemm<T>(true, false, L, D, L, T(1), dkr.data(), L, in.q, D, T(1), g.k, D);
    // γ = exp(lg), γ_L = γ[L-1], γ_prev = exp(lgp) (through gpe_l = η_l (γ_prev - s)), ρ = RA[L-1, :].
    dg[L - 1] += dgamma_end;
    for (int t = 0; t < L; ++t) {
      dlg[t] = dg[t] * w.gamma[t];
      dlgp[t] = (dgpe1[t] * w.eta1[t] + dgpe2[t] * w.eta2[t]) * w.gamma_prev[t];
      dra[(L - 1) * L + t] += dlast[t];
    }
    w.decays.backward(in.alpha, dlg.data(), dlgp.data(), dra.data(), dpr.data(), g.alpha);
    std::copy(dw1_start.begin(), dw1_start.end(), dw1);
    std::copy(dw2_start.begin(), dw2_start.end(), dw2);
  }
};

// Chunk `chunk` of item `item` in (q, k, v, eta, alpha) laid out (N, n, L, D) and (N, n, L).
template <typename T>
ChunkInputs<T> chunk_inputs(const std::vector<Tensor>& x, int64_t item, int64_t chunk, int64_t n, int L, int D) {
  const int64_t c = item * n + chunk, LD = static_cast<int64_t>(L) * D;
  return {x[0].data_ptr<T>() + c * LD, x[1].data_ptr<T>() + c * LD, x[2].data_ptr<T>() + c * LD,
          x[3].data_ptr<T>() + c * L, x[4].data_ptr<T>() + c * L};
}

template <typename T>
ChunkGrads<T> chunk_grads(std::vector<Tensor>& x, int64_t item, int64_t chunk, int64_t n, int L, int D) {
  const int64_t c = item * n + chunk, LD = static_cast<int64_t>(L) * D;
  return {x[0].data_ptr<T>() + c * LD, x[1].data_ptr<T>() + c * LD, x[2].data_ptr<T>() + c * LD,
          x[3].data_ptr<T>() + c * L, x[4].data_ptr<T>() + c * L};
}

}  // namespace


// Forward over all chunks. Inputs (N items, n chunks, L tokens, D dims, Dh hidden):
//   q, k, v (N, n, L, D); eta, alpha (N, n, L); w1 (N, D, Dh), w2 (N, Dh, D).
// `delta`, `self_target`, `eps`, `curvature_eps`: the write rule (struct Rule). eta holds the gate β.
// Returns out (N, n, L, D) and the chunk-start states w1s (N, n + 1, D, Dh), w2s (N, n + 1, Dh, D)
// (index n is the end state).
std::vector<Tensor> mlp_chunks_forward(std::vector<Tensor> inputs, Tensor w1, Tensor w2, bool delta, bool self_target,
                                       double eps, double curvature_eps) {
  const Rule rule{delta, self_target, eps, curvature_eps};
  std::vector<Tensor> all(inputs);
  all.push_back(w1);
  all.push_back(w2);
  check_inputs(all, "dgd_mlp_chunks");
  const auto& q = inputs[0];
  const int64_t N = q.size(0), n = q.size(1);
  const int L = q.size(2), D = q.size(3), Dh = w1.size(2);
  auto out = at::empty_like(q);
  auto w1s = at::empty({N, n + 1, D, Dh}, w1.options());
  auto w2s = at::empty({N, n + 1, Dh, D}, w2.options());
  w1s.select(1, 0).copy_(w1);
  w2s.select(1, 0).copy_(w2);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_mlp_chunks_forward", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      ChunkWork<scalar_t> work(L, D, Dh, rule);
      for (int64_t item = begin; item < end; ++item) {
        for (int64_t c = 0; c < n; ++c) {
          auto in = chunk_inputs<scalar_t>(inputs, item, c, n, L, D);
          const int64_t s = item * (n + 1) + c;
          work.forward(in, w1s.data_ptr<scalar_t>() + s * D * Dh, w2s.data_ptr<scalar_t>() + s * Dh * D,
                       out.data_ptr<scalar_t>() + (item * n + c) * L * D,
                       w1s.data_ptr<scalar_t>() + (s + 1) * D * Dh, w2s.data_ptr<scalar_t>() + (s + 1) * Dh * D);
        }
      }
    });
  });
  return {out, w1s, w2s};
}

// Backward: gradients of every input of mlp_chunks_forward from d(out) and d(end state).
// Returns dq, dk, dv, deta, dalpha, dw1, dw2.
std::vector<Tensor> mlp_chunks_backward(std::vector<Tensor> inputs, Tensor w1s, Tensor w2s, Tensor dout,
                                        Tensor dw1_end, Tensor dw2_end, bool delta, bool self_target, double eps,
                                        double curvature_eps) {
  const Rule rule{delta, self_target, eps, curvature_eps};
  std::vector<Tensor> all(inputs);
  for (const auto& t : {w1s, w2s, dout, dw1_end, dw2_end}) all.push_back(t);
  check_inputs(all, "dgd_mlp_chunks");
  const auto& q = inputs[0];
  const int64_t N = q.size(0), n = q.size(1);
  const int L = q.size(2), D = q.size(3), Dh = w1s.size(3);
  std::vector<Tensor> grads;
  for (const auto& t : inputs) grads.push_back(at::empty_like(t));
  auto dw1 = dw1_end.clone(), dw2 = dw2_end.clone();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "dgd_mlp_chunks_backward", [&] {
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      ChunkWork<scalar_t> work(L, D, Dh, rule);
      ChunkBackward<scalar_t> back(L, D, Dh);
      for (int64_t item = begin; item < end; ++item) {
        scalar_t* dw1_item = dw1.data_ptr<scalar_t>() + item * D * Dh;
        scalar_t* dw2_item = dw2.data_ptr<scalar_t>() + item * Dh * D;
        for (int64_t c = n - 1; c >= 0; --c) {
          auto in = chunk_inputs<scalar_t>(inputs, item, c, n, L, D);
          auto g = chunk_grads<scalar_t>(grads, item, c, n, L, D);
          const int64_t s = item * (n + 1) + c;
          const scalar_t* w1 = w1s.data_ptr<scalar_t>() + s * D * Dh;
          const scalar_t* w2 = w2s.data_ptr<scalar_t>() + s * Dh * D;
          work.forward(in, w1, w2, nullptr, nullptr, nullptr);
          back.backward(in, w1, w2, work, dout.data_ptr<scalar_t>() + (item * n + c) * L * D, dw1_item, dw2_item,
                        g);
        }
      }
    });
  });
  grads.push_back(dw1);
  grads.push_back(dw2);
  return grads;
}

}  // namespace nl_cpu
