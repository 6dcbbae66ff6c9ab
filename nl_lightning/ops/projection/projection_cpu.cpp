// Fused CPU kernel for HOPE's self-modifying projection loop (nl_lightning/models/hope.py,
// SelfModifyingMemory.project), forward and hand-written backward.
//
// Four residual-MLP memories M_m(z) = z + W1_m silu(W2_m z), m = k, v, η, α, read every chunk of
// the (normalised) input x from their chunk-start state; the read-outs give the chunk's keys,
// values and gates, with which all four memories take one DGD chunk step (shared_key.py's update,
// written here in chunk.py's UT form: r = T⁻¹ rhs, W' = γ_L W + (ρ r)ᵀ X). Per chunk c:
//
//   out_m = z + silu(z W2ᵀ)_m W1_mᵀ                     z = x[chunk c], W2 = the four W2_m stacked
//   key = out_k / max(|out_k|, 1e-12), v = out_v
//   η_t = eta_scale σ(mean(out_η[t]) + b_η), α_t = σ(mean(out_α[t]) + b_α)
//   decays of α (segment sums of log α, as chunk.py), KS = I + η_t PR (key keyᵀ)
//   pre = key W2ᵀ, hid = silu(pre), a = v W2ᵀ, d1_m = 2 (key + hid_m W1_mᵀ - v - silu(a)_m W1_mᵀ)
//   r2 = KS⁻¹ (-η silu'(pre) ⊙ [d1_m W1_m]_m - ηγ_prev pre),  W2' = γ_L W2 + (ρ r2)ᵀ key
//   S1_m = I + η_t PR (hid_m hid_mᵀ), r1_m = S1_m⁻¹ (-η d1_m - ηγ_prev hid_m W1_mᵀ),
//   W1_m' = γ_L W1_m + (ρ r1_m)ᵀ hid_m
//
// The last chunk is only read (its update would never be read). One thread runs one batch
// element's whole loop; the backward recomputes each chunk from its saved chunk-start state and
// the GEMM outputs the forward kept (ProjectionWork::save).
// tests/test_memory_models.py checks it against the ATen loop (float64, forward and gradients).

#include "../cpu/common.h"

#include <ATen/Parallel.h>


namespace nl_cpu {
namespace {

constexpr int kMemories = 4;  // k, v, η, α, in this order (hope.PROJECTIONS)
enum Memory { kKey = 0, kValue = 1, kEta = 2, kAlpha = 3 };

template <typename T>
struct ProjectionWork {
  int L, D, Dh, MDh;
  // read
  std::vector<T> hz, s_hz, sz;
  // gates and key
  std::vector<T> norm, key, sig_eta, sig_alpha, eta, alpha;
  // decays of α, ηγ_prev = η exp(lgp), γ_L
  Decays<T> decays;
  std::vector<T> gpe;
  T gamma_end = 1;
  // update
  std::vector<T> gram_k, ks, pre, s_pre, hid, a, s_a, sa, hw1, d1, m, r2, lr2, gram, s1, r1, lr1;

  ProjectionWork(int L, int D, int Dh) : L(L), D(D), Dh(Dh), MDh(kMemories * Dh), decays(L) {
    for (auto* x : {&hz, &s_hz, &sz, &pre, &s_pre, &hid, &a, &s_a, &sa, &m, &r2, &lr2}) x->resize(L * MDh);
    for (auto* x : {&hw1, &d1, &r1, &lr1}) x->resize(kMemories * L * D);
    for (auto* x : {&gram, &s1}) x->resize(kMemories * L * L);
    for (auto* x : {&gram_k, &ks}) x->resize(L * L);
    for (auto* x : {&norm, &sig_eta, &sig_alpha, &eta, &alpha, &gpe}) x->resize(L);
    key.resize(L * D);
  }

  // GEMM outputs the forward keeps for the backward, which would otherwise recompute them: the
  // products with the largest inner dimension (D) per value stored. hz, pre, a, m (L x 4Dh) and
  // the key Gram matrix (L x L) per chunk; the backward recomputes the rest of the chunk.
  static int64_t saved_size(int L, int Dh) { return 4LL * L * kMemories * Dh + static_cast<int64_t>(L) * L; }

  void save(T* dst) const {
    for (const auto* x : {&hz, &pre, &a, &m, &gram_k}) dst = std::copy(x->begin(), x->end(), dst);
  }

  void load(const T* src) {
    for (auto* x : {&hz, &pre, &a, &m, &gram_k}) {
      std::copy(src, src + x->size(), x->begin());
      src += x->size();
    }
  }

  // The memories' hidden layer silu(z W2ᵀ) for the `rows` tokens of z (all four stacked); with
  // `loaded`, hz = z W2ᵀ is already in place (``load``).
  void hidden(const T* z, int rows, const T* w2, bool loaded = false) {
    if (!loaded) gemm<T>(false, true, rows, MDh, D, T(1), z, D, w2, D, T(0), hz.data(), MDh);
    silu(rows * MDh, hz.data(), s_hz.data(), sz.data());
  }

  // out_m (rows of `out`, memory m at out + m * out_stride) for the `rows` tokens of z.
  void read(const T* z, int rows, const T* w1, const T* w2, T* out, int64_t out_stride) {
    hidden(z, rows, w2);
    for (int mem = 0; mem < kMemories; ++mem) {
      T* o = out + mem * out_stride;
      std::copy(z, z + rows * D, o);
      gemm<T>(false, true, rows, D, Dh, T(1), sz.data() + mem * Dh, MDh, w1 + mem * D * Dh, Dh, T(1), o, D);
    }
  }

  // Gates, key and decays from this chunk's read-outs (memory m at out + m * out_stride).
  void gates(const T* out, int64_t out_stride, const T* bias, T eta_scale) {
    const T* k_raw = out + kKey * out_stride;
    const T* eta_raw = out + kEta * out_stride;
    const T* alpha_raw = out + kAlpha * out_stride;
    for (int t = 0; t < L; ++t) {
      T sq = 0, e = 0, al = 0;
      for (int j = 0; j < D; ++j) {
        sq += k_raw[t * D + j] * k_raw[t * D + j];
        e += eta_raw[t * D + j];
        al += alpha_raw[t * D + j];
      }
      norm[t] = std::sqrt(sq);
      const T scale = T(1) / std::max(norm[t], T(kNormEps));
      for (int j = 0; j < D; ++j) key[t * D + j] = k_raw[t * D + j] * scale;
      sig_eta[t] = T(1) / (T(1) + std::exp(-(e / D + bias[0])));
      sig_alpha[t] = T(1) / (T(1) + std::exp(-(al / D + bias[1])));
      eta[t] = eta_scale * sig_eta[t];
      alpha[t] = sig_alpha[t];
    }
    decays.forward(alpha.data());
    for (int t = 0; t < L; ++t) gpe[t] = eta[t] * std::exp(decays.lgp[t]);
    gamma_end = std::exp(decays.lg[L - 1]);
  }

  // One chunk's update from state (w1, w2) with value v; writes the end state when given.
  // With `loaded`, the GEMM outputs ``save`` keeps are already in place.
  void update(const T* v, const T* w1, const T* w2, T* w1_end, T* w2_end, bool loaded = false) {
    if (!loaded) {
      gemm<T>(false, true, L, L, D, T(1), key.data(), D, key.data(), D, T(0), gram_k.data(), L);
      gemm<T>(false, true, L, MDh, D, T(1), key.data(), D, w2, D, T(0), pre.data(), MDh);
      gemm<T>(false, true, L, MDh, D, T(1), v, D, w2, D, T(0), a.data(), MDh);
    }
    build_system(L, eta.data(), decays.pr.data(), gram_k.data(), ks.data());
    silu(L * MDh, pre.data(), s_pre.data(), hid.data());
    silu(L * MDh, a.data(), s_a.data(), sa.data());
    for (int mem = 0; mem < kMemories; ++mem) {
      const T* w1m = w1 + mem * D * Dh;
      T* hw1m = hw1.data() + mem * L * D;
      T* d1m = d1.data() + mem * L * D;
      gemm<T>(false, true, L, D, Dh, T(1), hid.data() + mem * Dh, MDh, w1m, Dh, T(0), hw1m, D);
      gemm<T>(false, true, L, D, Dh, T(1), sa.data() + mem * Dh, MDh, w1m, Dh, T(0), d1m, D);
      for (int i = 0; i < L * D; ++i) d1m[i] = T(2) * (key[i] + hw1m[i] - v[i] - d1m[i]);
      if (!loaded) gemm<T>(false, false, L, Dh, D, T(1), d1m, D, w1m, Dh, T(0), m.data() + mem * Dh, MDh);
    }
    // W2 (all memories stacked; inputs key).
    w2_rhs(L, MDh, pre.data(), s_pre.data(), m.data(), eta.data(), gpe.data(), r2.data());
    solve_lower_unit(L, MDh, ks.data(), r2.data());
    const T* rho = decays.ra.data() + (L - 1) * L;  // ρ_i = γ_L / γ_i
    scale_rows(L, MDh, rho, r2.data(), lr2.data());
    // W1 per memory (inputs hid_m).
    for (int mem = 0; mem < kMemories; ++mem) {
      T* g = gram.data() + mem * L * L;
      T* s = s1.data() + mem * L * L;
      T* r = r1.data() + mem * L * D;
      const T* d1m = d1.data() + mem * L * D;
      const T* hw1m = hw1.data() + mem * L * D;
      gemm<T>(false, true, L, L, Dh, T(1), hid.data() + mem * Dh, MDh, hid.data() + mem * Dh, MDh, T(0), g, L);
      build_system(L, eta.data(), decays.pr.data(), g, s);
      w1_rhs(L, D, d1m, hw1m, eta.data(), gpe.data(), r);
      solve_lower_unit(L, D, s, r);
      T* lr = lr1.data() + mem * L * D;
      scale_rows(L, D, rho, r, lr);
    }
    if (w1_end == nullptr) return;
    for (int i = 0; i < kMemories * D * Dh; ++i) w1_end[i] = gamma_end * w1[i];
    for (int i = 0; i < MDh * D; ++i) w2_end[i] = gamma_end * w2[i];
    gemm<T>(true, false, MDh, D, L, T(1), lr2.data(), MDh, key.data(), D, T(1), w2_end, D);
    for (int mem = 0; mem < kMemories; ++mem)
      gemm<T>(true, false, D, Dh, L, T(1), lr1.data() + mem * L * D, D, hid.data() + mem * Dh, MDh, T(1),
              w1_end + mem * D * Dh, Dh);
  }
};

template <typename T>
struct ProjectionBackward {
  int L, D, Dh, MDh;
  std::vector<T> dw1_start, dw2_start, dkey, dv, deta, dalpha, dgpe, drho, dlg, dlgp, dlr2, dr2, dlr1, dr1, dhid,
      dhw1, dd1, dm, dpre, dsa, da, ds, dpr, dra, dsz, dhz;

  ProjectionBackward(int L, int D, int Dh) : L(L), D(D), Dh(Dh), MDh(kMemories * Dh) {
    dw1_start.resize(kMemories * D * Dh);
    dw2_start.resize(MDh * D);
    for (auto* x : {&dkey, &dv}) x->resize(L * D);
    for (auto* x : {&dlr1, &dr1, &dhw1, &dd1}) x->resize(kMemories * L * D);
    for (auto* x : {&dlr2, &dr2, &dhid, &dm, &dpre, &dsa, &da, &dsz, &dhz}) x->resize(L * MDh);
    for (auto* x : {&ds, &dpr, &dra}) x->resize(L * L);
    for (auto* x : {&deta, &dalpha, &dgpe, &drho, &dlg, &dlgp}) x->resize(L);
  }

  // dL/d(strictly lower system entries) ds (overwritten) -> η, PR and the Gram matrix's inputs x.
  void system_backward(const ProjectionWork<T>& w, const T* gram, const T* x, int ldx, int cols, T* dx, int lddx) {
    nl_cpu::system_backward(L, w.eta.data(), w.decays.pr.data(), gram, ds.data(), deta.data(), dpr.data());
    gram_backward(L, cols, ds.data(), x, ldx, dx, lddx);
  }

  // Backward of ProjectionWork::update. dw1, dw2: dL/d(end state) in, dL/d(start state) out.
  // Leaves dL/d(key), dL/d(v), dL/dη, dL/dα in dkey, dv, deta, dalpha.
  void update(const ProjectionWork<T>& w, const T* v, const T* w1, const T* w2, T* dw1, T* dw2) {
    const T* rho = w.decays.ra.data() + (L - 1) * L;
    T dgamma_end = 0;
    for (int i = 0; i < kMemories * D * Dh; ++i) dgamma_end += w1[i] * dw1[i];
    for (int i = 0; i < MDh * D; ++i) dgamma_end += w2[i] * dw2[i];
    for (int i = 0; i < kMemories * D * Dh; ++i) dw1_start[i] = w.gamma_end * dw1[i];
    for (int i = 0; i < MDh * D; ++i) dw2_start[i] = w.gamma_end * dw2[i];
    std::fill(deta.begin(), deta.end(), T(0));
    std::fill(dgpe.begin(), dgpe.end(), T(0));
    std::fill(drho.begin(), drho.end(), T(0));
    std::fill(dpr.begin(), dpr.end(), T(0));
    std::fill(dhid.begin(), dhid.end(), T(0));
    // W2' = γ_L W2 + lr2ᵀ key.
    gemm<T>(false, true, L, MDh, D, T(1), w.key.data(), D, dw2, D, T(0), dlr2.data(), MDh);
    gemm<T>(false, false, L, D, MDh, T(1), w.lr2.data(), MDh, dw2, D, T(0), dkey.data(), D);
    scale_rows_backward(L, MDh, rho, w.r2.data(), dlr2.data(), dr2.data(), drho.data());
    // W1_m' = γ_L W1_m + lr1_mᵀ hid_m, r1_m = S1_m⁻¹ rhs1_m.
    for (int mem = 0; mem < kMemories; ++mem) {
      const T* dw1m = dw1 + mem * D * Dh;
      const T* hidm = w.hid.data() + mem * Dh;
      T* dlr = dlr1.data() + mem * L * D;
      T* dr = dr1.data() + mem * L * D;
      const T* r = w.r1.data() + mem * L * D;
      gemm<T>(false, true, L, D, Dh, T(1), hidm, MDh, dw1m, Dh, T(0), dlr, D);
      gemm<T>(false, false, L, Dh, D, T(1), w.lr1.data() + mem * L * D, D, dw1m, Dh, T(1), dhid.data() + mem * Dh, MDh);
      scale_rows_backward(L, D, rho, r, dlr, dr, drho.data());
      solve_backward(L, D, w.s1.data() + mem * L * L, r, dr, ds.data());  // dr = d(rhs1_m)
      const T* d1m = w.d1.data() + mem * L * D;
      const T* hw1m = w.hw1.data() + mem * L * D;
      T* dd1m = dd1.data() + mem * L * D;
      T* dhw1m = dhw1.data() + mem * L * D;
      w1_rhs_backward(L, D, dr, d1m, hw1m, w.eta.data(), w.gpe.data(), deta.data(), dgpe.data(), dd1m, dhw1m);
      system_backward(w, w.gram.data() + mem * L * L, hidm, MDh, Dh, dhid.data() + mem * Dh, MDh);
    }
    // r2 = KS⁻¹ rhs2, rhs2 = -η silu'(pre) m - ηγ_prev pre.
    solve_backward(L, MDh, w.ks.data(), w.r2.data(), dr2.data(), ds.data());
    w2_rhs_backward(L, MDh, dr2.data(), w.pre.data(), w.s_pre.data(), w.m.data(), w.eta.data(), w.gpe.data(),
                    deta.data(), dgpe.data(), dm.data(), dpre.data());
    system_backward(w, w.gram_k.data(), w.key.data(), D, D, dkey.data(), D);
    // d1_m = 2 (key + hw1_m - v - sa_m W1_mᵀ), m_m = d1_m W1_m, hw1_m = hid_m W1_mᵀ.
    std::fill(dv.begin(), dv.end(), T(0));
    for (int mem = 0; mem < kMemories; ++mem) {
      const T* w1m = w1 + mem * D * Dh;
      T* dw1m = dw1_start.data() + mem * D * Dh;
      T* dd1m = dd1.data() + mem * L * D;
      T* dhw1m = dhw1.data() + mem * L * D;
      gemm<T>(false, true, L, D, Dh, T(1), dm.data() + mem * Dh, MDh, w1m, Dh, T(1), dd1m, D);
      gemm<T>(true, false, D, Dh, L, T(1), w.d1.data() + mem * L * D, D, dm.data() + mem * Dh, MDh, T(1), dw1m, Dh);
      for (int i = 0; i < L * D; ++i) {
        dd1m[i] *= T(2);
        dkey[i] += dd1m[i];
        dhw1m[i] += dd1m[i];
        dv[i] -= dd1m[i];
      }
      gemm<T>(false, false, L, Dh, D, T(-1), dd1m, D, w1m, Dh, T(0), dsa.data() + mem * Dh, MDh);
      gemm<T>(true, false, D, Dh, L, T(-1), dd1m, D, w.sa.data() + mem * Dh, MDh, T(1), dw1m, Dh);
      gemm<T>(false, false, L, Dh, D, T(1), dhw1m, D, w1m, Dh, T(1), dhid.data() + mem * Dh, MDh);
      gemm<T>(true, false, D, Dh, L, T(1), dhw1m, D, w.hid.data() + mem * Dh, MDh, T(1), dw1m, Dh);
    }
    for (int i = 0; i < L * MDh; ++i) {
      da[i] = dsa[i] * silu_d1(w.a[i], w.s_a[i]);
      dpre[i] += dhid[i] * silu_d1(w.pre[i], w.s_pre[i]);
    }
    gemm<T>(false, false, L, D, MDh, T(1), da.data(), MDh, w2, D, T(1), dv.data(), D);
    gemm<T>(true, false, MDh, D, L, T(1), da.data(), MDh, v, D, T(1), dw2_start.data(), D);
    gemm<T>(false, false, L, D, MDh, T(1), dpre.data(), MDh, w2, D, T(1), dkey.data(), D);
    gemm<T>(true, false, MDh, D, L, T(1), dpre.data(), MDh, w.key.data(), D, T(1), dw2_start.data(), D);
    // Decays: ηγ_prev = η exp(lgp), γ_L = exp(lg_{L-1}), ρ = RA[L-1, :].
    std::fill(dra.begin(), dra.end(), T(0));
    std::fill(dlg.begin(), dlg.end(), T(0));
    for (int t = 0; t < L; ++t) {
      deta[t] += dgpe[t] * std::exp(w.decays.lgp[t]);
      dlgp[t] = dgpe[t] * w.gpe[t];
      dra[(L - 1) * L + t] += drho[t];
    }
    dlg[L - 1] = dgamma_end * w.gamma_end;
    w.decays.backward(w.alpha.data(), dlg.data(), dlgp.data(), dra.data(), dpr.data(), dalpha.data());
    std::copy(dw1_start.begin(), dw1_start.end(), dw1);
    std::copy(dw2_start.begin(), dw2_start.end(), dw2);
  }

  // Gates and key backward: adds dL/d(read-outs) of the chunk to dout (memory m at dout + m * stride)
  // and dL/d(biases) to dbias.
  void gates(const ProjectionWork<T>& w, T eta_scale, T* dout, int64_t stride, T* dbias) {
    T* dk = dout + kKey * stride;
    T* dval = dout + kValue * stride;
    T* de = dout + kEta * stride;
    T* dal = dout + kAlpha * stride;
    for (int t = 0; t < L; ++t) {
      const T deta_pre = deta[t] * eta_scale * w.sig_eta[t] * (T(1) - w.sig_eta[t]);
      const T dalpha_pre = dalpha[t] * w.sig_alpha[t] * (T(1) - w.sig_alpha[t]);
      dbias[0] += deta_pre;
      dbias[1] += dalpha_pre;
      T dot = 0;
      for (int j = 0; j < D; ++j) dot += w.key[t * D + j] * dkey[t * D + j];
      const bool clamped = w.norm[t] < T(kNormEps);
      const T inv = T(1) / std::max(w.norm[t], T(kNormEps));
      for (int j = 0; j < D; ++j) {
        const int i = t * D + j;
        dk[i] += clamped ? dkey[i] * inv : (dkey[i] - w.key[i] * dot) * inv;
        dval[i] += dv[i];
        de[i] += deta_pre / D;
        dal[i] += dalpha_pre / D;
      }
    }
  }

  // Read backward: dL/d(out_m) rows (memory m at dout + m * stride) -> dz, dw1, dw2 (accumulated).
  void read(const ProjectionWork<T>& w, const T* z, int rows, const T* w1, const T* w2, const T* dout,
            int64_t stride, T* dz, T* dw1, T* dw2) {
    std::fill(dz, dz + rows * D, T(0));
    for (int mem = 0; mem < kMemories; ++mem) {
      const T* d = dout + mem * stride;
      for (int i = 0; i < rows * D; ++i) dz[i] += d[i];
      gemm<T>(false, false, rows, Dh, D, T(1), d, D, w1 + mem * D * Dh, Dh, T(0), dsz.data() + mem * Dh, MDh);
      gemm<T>(true, false, D, Dh, rows, T(1), d, D, w.sz.data() + mem * Dh, MDh, T(1), dw1 + mem * D * Dh, Dh);
    }
    for (int i = 0; i < rows * MDh; ++i) dhz[i] = dsz[i] * silu_d1(w.hz[i], w.s_hz[i]);
    gemm<T>(false, false, rows, D, MDh, T(1), dhz.data(), MDh, w2, D, T(1), dz, D);
    gemm<T>(true, false, MDh, D, rows, T(1), dhz.data(), MDh, z, D, T(1), dw2, D);
  }
};

void check_loop(const Tensor& x, const Tensor& w1, const Tensor& w2, int64_t chunk) {
  TORCH_CHECK(x.dim() == 3, "shared_key_loop: x must be (B, T, D), got ", x.sizes());
  TORCH_CHECK(w1.dim() == 4 && w1.size(1) == kMemories, "shared_key_loop: W1 must be (B, 4, D, Dh), got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 4 && w2.size(1) == kMemories && w2.size(2) == w1.size(3) && w2.size(3) == x.size(2) &&
                  w1.size(2) == x.size(2) && w1.size(0) == x.size(0) && w2.size(0) == x.size(0),
              "shared_key_loop: W2 must be (B, 4, Dh, D) matching W1 ", w1.sizes(), " and x ", x.sizes(), ", got ",
              w2.sizes());
  TORCH_CHECK(chunk > 0, "shared_key_loop: chunk must be positive, got ", chunk);
}

}  // namespace

// Forward of the projection loop. x (B, T, D); initial states w1 (B, 4, D, Dh), w2 (B, 4, Dh, D);
// gate_bias (2,) = (b_η, b_α). Returns the read-outs out (B, 4, T, D), every chunk's start
// state w1s (B, n, 4, D, Dh), w2s (B, n, 4, Dh, D), n = ceil(T / chunk), and the GEMM outputs
// the backward reuses, saved (B, n, ProjectionWork::saved_size).
std::vector<Tensor> shared_key_loop_forward(Tensor x, Tensor w1, Tensor w2, Tensor gate_bias, int64_t chunk,
                                            double eta_scale) {
  check_inputs({x, w1, w2, gate_bias}, "shared_key_loop");
  check_loop(x, w1, w2, chunk);
  const int64_t B = x.size(0), T_len = x.size(1);
  const int D = x.size(2), Dh = w1.size(3);
  const int64_t n = (T_len + chunk - 1) / chunk;
  auto out = at::empty({B, kMemories, T_len, D}, x.options());
  auto w1s = at::empty({B, n, kMemories, D, Dh}, x.options());
  auto w2s = at::empty({B, n, kMemories, Dh, D}, x.options());
  auto saved = at::empty({B, n, ProjectionWork<float>::saved_size(chunk, Dh)}, x.options());
  if (n == 0) return {out, w1s, w2s, saved};
  w1s.select(1, 0).copy_(w1);
  w2s.select(1, 0).copy_(w2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shared_key_loop_forward", [&] {
    const scalar_t* bias = gate_bias.data_ptr<scalar_t>();
    const int64_t state1 = kMemories * D * Dh, state2 = kMemories * Dh * D;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      ProjectionWork<scalar_t> work(chunk, D, Dh);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < n; ++c) {
          const int rows = std::min<int64_t>(chunk, T_len - c * chunk);
          const scalar_t* z = x.data_ptr<scalar_t>() + (b * T_len + c * chunk) * D;
          scalar_t* o = out.data_ptr<scalar_t>() + (b * kMemories * T_len + c * chunk) * D;
          scalar_t* w1c = w1s.data_ptr<scalar_t>() + (b * n + c) * state1;
          scalar_t* w2c = w2s.data_ptr<scalar_t>() + (b * n + c) * state2;
          work.read(z, rows, w1c, w2c, o, T_len * D);
          if (c < n - 1) {
            work.gates(o, T_len * D, bias, static_cast<scalar_t>(eta_scale));
            work.update(o + kValue * T_len * D, w1c, w2c, w1c + state1, w2c + state2);  // chunk c+1's start
          }
          work.save(saved.data_ptr<scalar_t>() + (b * n + c) * saved.size(2));
        }
      }
    });
  });
  return {out, w1s, w2s, saved};
}

// Backward: dL/dx (B, T, D), dL/d(initial state) per batch element (B, 4, D, Dh), (B, 4, Dh, D),
// and dL/d(gate_bias) (2,), from dL/d(out) (B, 4, T, D).
std::vector<Tensor> shared_key_loop_backward(Tensor x, Tensor gate_bias, Tensor out, Tensor w1s, Tensor w2s,
                                             Tensor saved, Tensor dout, int64_t chunk, double eta_scale) {
  check_inputs({x, gate_bias, out, w1s, w2s, saved, dout}, "shared_key_loop");
  const int64_t B = x.size(0), T_len = x.size(1), n = w1s.size(1);
  const int D = x.size(2), Dh = w1s.size(4);
  auto dx = at::empty_like(x);
  auto dw1 = at::zeros({B, kMemories, D, Dh}, x.options());
  auto dw2 = at::zeros({B, kMemories, Dh, D}, x.options());
  auto dbias = at::zeros({B, 2}, x.options());
  auto dread = dout.clone();  // dL/d(read-outs), plus what the updates send back through the gates
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "shared_key_loop_backward", [&] {
    const scalar_t* bias = gate_bias.data_ptr<scalar_t>();
    const int64_t state1 = kMemories * D * Dh, state2 = kMemories * Dh * D;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      ProjectionWork<scalar_t> work(chunk, D, Dh);
      ProjectionBackward<scalar_t> back(chunk, D, Dh);
      std::vector<scalar_t> dz(chunk * D);
      for (int64_t b = begin; b < end; ++b) {
        scalar_t* dw1b = dw1.data_ptr<scalar_t>() + b * state1;  // dL/d(state after chunk c)
        scalar_t* dw2b = dw2.data_ptr<scalar_t>() + b * state2;
        for (int64_t c = n - 1; c >= 0; --c) {
          const int rows = std::min<int64_t>(chunk, T_len - c * chunk);
          const scalar_t* z = x.data_ptr<scalar_t>() + (b * T_len + c * chunk) * D;
          const scalar_t* o = out.data_ptr<scalar_t>() + (b * kMemories * T_len + c * chunk) * D;
          scalar_t* dr = dread.data_ptr<scalar_t>() + (b * kMemories * T_len + c * chunk) * D;
          const scalar_t* w1c = w1s.data_ptr<scalar_t>() + (b * n + c) * state1;
          const scalar_t* w2c = w2s.data_ptr<scalar_t>() + (b * n + c) * state2;
          work.load(saved.data_ptr<scalar_t>() + (b * n + c) * saved.size(2));
          if (c < n - 1) {  // the update of chunk c: its end state is chunk c+1's start state
            work.gates(o, T_len * D, bias, static_cast<scalar_t>(eta_scale));
            work.update(o + kValue * T_len * D, w1c, w2c, nullptr, nullptr, /*loaded=*/true);
            back.update(work, o + kValue * T_len * D, w1c, w2c, dw1b, dw2b);
            back.gates(work, static_cast<scalar_t>(eta_scale), dr, T_len * D, dbias.data_ptr<scalar_t>() + 2 * b);
          }
          work.hidden(z, rows, w2c, /*loaded=*/true);
          back.read(work, z, rows, w1c, w2c, dr, T_len * D, dz.data(), dw1b, dw2b);
          std::copy(dz.begin(), dz.begin() + rows * D, dx.data_ptr<scalar_t>() + (b * T_len + c * chunk) * D);
        }
      }
    });
  });
  return {dx, dw1, dw2, dbias.sum(0)};
}

}  // namespace nl_cpu
