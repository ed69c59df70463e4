// The compiled CPU backward: one task per (sequence, head), chunks in reverse order, the gradient of the state
// carried in the task's row of dh0 (Yang et al. 2024, §4.2 and its appendix; the forward's math is in common.h).
// Per chunk, with S / S' the states entering / leaving it (S kept by the forward), dS' the gradient of S', qa, kf,
// kd the factors of common.h, A the causal scores and dA = tril(do v^T):
//     dv = A^T do + kd dS'
//     dq = s e^b ⊙ (do S^T) + intra,  dk = e^{B-b} ⊙ (v dS'^T) + intra
//     dS = diag(e^B) dS' + qa^T do
// The gate gradient is the reverse cumulative sum over the sequence of q ⊙ dq − k ⊙ dk, plus Σ_v S_T ⊙ dS_T at the
// last token T (the final state's decay), summed here in double as the chunks go by. Two parts of it cancel
// exactly and are left out rather than subtracted (with strong gates their rounding errors would outweigh the
// result): each token's score with itself (its share of dq and dk is added after the sum), and at T the last
// token's own k_T^T v_T inside S_T (the final-state term is formed without it, and dk_T's state part is kept out of
// the sum). The same scheme as the PyTorch backward in gla/ops/chunk.py.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace gla_cpu {
namespace {

struct Work {  // a thread's buffers, allocated once
  Factors f;
  std::vector<float> A, dA, dqa, dkf, dks, P;
  std::vector<double> bd;
  explicit Work(int64_t K, int64_t V)
      : f(K), A(BT * BT), dA(BT * BT), dqa(BT * K), dkf(BT * K), dks(BT * K), P(K * V) {}
};

// Chunk c of a sequence (L rows; `last`: the sequence's last chunk). Pointers at the chunk's first row: q, k, g, dq,
// dk, dg rows of stride ldk; v, do, dv rows of stride ldv; S [K, V] the state entering the chunk; dS [K, V] the
// gradient of the state leaving it on entry, of the state entering it on return; dfinal [K, V] or null; run [K] the
// gate gradient's sum over the sequence's later tokens.
void chunk_grad(const float* q, const float* k, const float* v, const float* g, const float* d_o, const float* S,
                const float* dfinal, bool last, int64_t L, int64_t K, int64_t V, int64_t ldk, int64_t ldv, float s,
                float* dq, float* dk, float* dv, float* dg, float* dS, double* run, Work& w) {
  Factors& f = w.f;
  f.load(q, k, g, L, ldk, s);
  if (last) {
    std::fill(run, run + K, 0.);
    if (dfinal != nullptr) {  // Σ_v (S_T − k_T^T v_T) ⊙ dS_T, S_T formed without the last token
      for (int64_t r = 0; r < K; ++r)
#pragma omp simd
        for (int64_t x = 0; x < V; ++x) w.P[r * V + x] = f.eB[r] * S[r * V + x];
      if (L > 1) mm(true, false, K, V, L - 1, 1.f, f.kd.data(), K, v, ldv, 1.f, w.P.data(), V);
      for (int64_t r = 0; r < K; ++r) {
        double acc = 0.;
#pragma omp simd reduction(+ : acc)
        for (int64_t x = 0; x < V; ++x) acc += static_cast<double>(w.P[r * V + x]) * dfinal[r * V + x];
        run[r] = acc;
      }
    }
  }
  float *A = w.A.data(), *dA = w.dA.data(), *dqa = w.dqa.data(), *dkf = w.dkf.data(), *dks = w.dks.data();
  f.scores(q, k, g, ldk, s, A, w.bd);
  mm(false, true, L, L, V, 1.f, d_o, ldv, v, ldv, 0.f, dA, BT);  // dA = do v^T
  float own[BT];  // each token's dA with itself
  for (int64_t i = 0; i < L; ++i) {
    own[i] = dA[i * BT + i];
    std::fill(dA + i * BT + i, dA + i * BT + L, 0.f);  // strictly lower triangle left
  }
  mm(true, false, L, V, L, 1.f, A, BT, d_o, ldv, 0.f, dv, ldv);  // dv = A^T do + kd dS'
  mm(false, false, L, V, K, 1.f, f.kd.data(), K, dS, V, 1.f, dv, ldv);
  mm(false, true, L, K, V, 1.f, d_o, ldv, S, V, 0.f, dqa, K);  // d qa = do S^T (+ dA kf)
  mm(false, true, L, K, V, 1.f, v, ldv, dS, V, 0.f, dks, K);   // dk's state part before e^{B-b}: v dS'^T
  if (f.safe) {
    mm(false, false, L, K, L, 1.f, dA, BT, f.kf.data(), K, 1.f, dqa, K);
    mm(true, false, L, K, L, 1.f, dA, BT, f.qa.data(), K, 0.f, dkf, K);  // d kf = dA^T qa
  }
  for (int64_t t = 0; t < L; ++t) {
    const float* __restrict__ et = f.e.data() + t * K;
    const float* __restrict__ ebt = f.eBb.data() + t * K;
    const float* __restrict__ dqat = dqa + t * K;
    const float* __restrict__ dkft = dkf + t * K;
    float* __restrict__ dkst = dks + t * K;
    float* __restrict__ dqt = dq + t * ldk;
    float* __restrict__ dkt = dk + t * ldk;
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) {
      dqt[c] = s * et[c] * dqat[c];
      dkt[c] = f.safe ? dkft[c] / et[c] : 0.f;
      dkst[c] *= ebt[c];
    }
  }
  if (!f.safe) {  // the intra-chunk terms by row blocks as in Factors::scores (which left the double sums in bd)
    for (int64_t r0 = 0; r0 < L; r0 += SB) {
      const int64_t r1 = std::min(r0 + SB, L), n = r1 - r0, cols = f.block(w.bd, r0, r1);
      f.block_operands(q, k, ldk, r0, r1, cols, 1.f);
      if (cols > 0) {
        mm(false, false, n, K, cols, 1.f, dA + r0 * BT, BT, f.KI.data(), K, 0.f, dqa, K);  // dA KI
        mm(true, false, cols, K, n, 1.f, dA + r0 * BT, BT, f.QI.data(), K, 0.f, dkf, K);   // dA^T QI
        for (int64_t i = r0; i < r1; ++i) {
          const float* __restrict__ Ei = f.E.data() + (i - r0) * K;
          const float* __restrict__ ti = dqa + (i - r0) * K;
          float* __restrict__ dqi = dq + i * ldk;
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) dqi[c] += s * Ei[c] * ti[c];
        }
        for (int64_t j = 0; j < cols; ++j) {
          const float* __restrict__ Fj = f.F.data() + j * K;
          const float* __restrict__ tj = dkf + j * K;
          float* __restrict__ dkj = dk + j * ldk;
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) dkj[c] += s * Fj[c] * tj[c];
        }
      }
      for (int64_t i = r0; i < r1; ++i)  // the block's own pairs in log space when it decays too fast to factor
        for (int64_t j = cols; j < i; ++j) {
          const float a = s * dA[i * BT + j];
          const double *bi = w.bd.data() + i * K, *bj = w.bd.data() + j * K;
          const float *qi = q + i * ldk, *kj = k + j * ldk;
          float *dqi = dq + i * ldk, *dkj = dk + j * ldk;
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) {
            const float d = a * exp_approx(static_cast<float>(bi[c] - bj[c]));
            dqi[c] += d * kj[c];
            dkj[c] += d * qi[c];
          }
        }
    }
  }
  for (int64_t t = L - 1; t >= 0; --t) {
    const float* __restrict__ qt = q + t * ldk;
    const float* __restrict__ kt = k + t * ldk;
    const float* __restrict__ dst = dks + t * K;
    float* __restrict__ dqt = dq + t * ldk;
    float* __restrict__ dkt = dk + t * ldk;
    float* __restrict__ dgt = dg + t * ldk;
    double* __restrict__ acc = run;
    const float keep = last && t == L - 1 ? 0.f : 1.f;  // the final token's own state share stays out of the sum
    const float ws = s * own[t];
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) {
      acc[c] += qt[c] * dqt[c] - kt[c] * (dkt[c] + keep * dst[c]);
      dgt[c] = static_cast<float>(acc[c]);
      dqt[c] += ws * kt[c];
      dkt[c] += dst[c] + ws * qt[c];
    }
  }
  f.carry(dS, V, V, f.qa.data(), d_o, ldv);  // dS = diag(e^B) dS' + qa^T do
}

// q, k, g: [B, T, H, K]; v, do: [B, T, H, V] (float32, bfloat16 or float16, last dim contiguous); hs: the forward's
// states entering each chunk [rows, H, K, V]; dfinal: the final states' gradient [N, H, K, V] or none. Returns dq,
// dk, dv, dg (contiguous, each in its input's dtype) and dh0 [N, H, K, V] float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g, const at::Tensor& d_o,
    const at::Tensor& hs, const std::optional<at::Tensor>& dfinal, const std::optional<at::Tensor>& cu_seqlens,
    double scale) {
  const char* op = "gla_cpu::chunk_backward";
  check_inputs({&q, &k, &g}, {&v, &d_o}, op);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const Sequences seqs(B, T, cu_seqlens, op);
  const int64_t N = seqs.N;
  TORCH_CHECK(hs.scalar_type() == at::kFloat && hs.is_contiguous() && hs.dim() == 4 &&
                  hs.size(0) >= seqs.first_chunk[N] && hs.size(1) == H && hs.size(2) == K && hs.size(3) == V,
              op, ": hs must be the forward's contiguous float32 states [rows >= chunks, H, K, V]");
  if (dfinal.has_value()) check_state(*dfinal, N, H, K, V, "gla_cpu::chunk_backward: dfinal");
  at::Tensor dq = at::empty({B, T, H, K}, q.options()), dk = at::empty({B, T, H, K}, k.options());
  at::Tensor dg = at::empty({B, T, H, K}, g.options()), dv = at::empty({B, T, H, V}, v.options());
  at::Tensor dh0 = at::empty({N, H, K, V}, q.options().dtype(at::kFloat));
  const int64_t tail = seqs.bounds[N];  // tokens after the last sequence get zero gradients
  for (at::Tensor* x : {&dq, &dk, &dg, &dv}) x->view({B * T, H * x->size(3)}).narrow(0, tail, B * T - tail).zero_();
  // float32 contiguous inputs are read in place and the gradients written in place; others go a chunk at a time
  // through float32 buffers (Rows)
  const bool direct = in_place({&q, &k, &g, &v, &d_o});
  const Rows rq(q), rk(k), rg(g), rv(v), rdo(d_o), rdq(dq), rdk(dk), rdg(dg), rdv(dv);
  const float* hsp = hs.data_ptr<float>();
  const float* dfp = dfinal.has_value() ? dfinal->data_ptr<float>() : nullptr;
  float* dhp = dh0.data_ptr<float>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    const OneBlasThread one;
    Work w(K, V);
    std::vector<double> runs((end - begin) * K);  // each task's gate-gradient sum
    std::vector<float> in, out;  // one chunk's rows as float32 when not read in place: q k g v do / dq dk dg dv
    if (!direct) {
      in.resize(BT * (3 * K + 2 * V));
      out.resize(BT * (3 * K + V));
    }
    int64_t most = 0;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / H;
      most = std::max(most, seqs.first_chunk[n + 1] - seqs.first_chunk[n]);
      float* dS = dhp + task * K * V;
      if (dfp != nullptr)
        std::copy(dfp + task * K * V, dfp + (task + 1) * K * V, dS);
      else
        std::fill(dS, dS + K * V, 0.f);
    }
    // Chunk-major over the tasks, each sequence from its last chunk back (see chunk_fwd.cpp for why).
    for (int64_t step = 0; step < most; ++step)
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / H, h = task % H, chunks = seqs.first_chunk[n + 1] - seqs.first_chunk[n];
        const int64_t ci = chunks - 1 - step;
        if (ci < 0) continue;
        const int64_t t0 = seqs.bounds[n] + ci * BT, L = std::min(BT, seqs.bounds[n + 1] - t0);
        const float* S = hsp + ((seqs.first_chunk[n] + ci) * H + h) * K * V;
        const float* df = dfp != nullptr ? dfp + task * K * V : nullptr;
        double* run = runs.data() + (task - begin) * K;
        if (direct) {
          const int64_t ok = (t0 * H + h) * K, ov = (t0 * H + h) * V;
          chunk_grad(q.data_ptr<float>() + ok, k.data_ptr<float>() + ok, v.data_ptr<float>() + ov,
                     g.data_ptr<float>() + ok, d_o.data_ptr<float>() + ov, S, df, step == 0, L, K, V, H * K, H * V,
                     s, dq.data_ptr<float>() + ok, dk.data_ptr<float>() + ok, dv.data_ptr<float>() + ov,
                     dg.data_ptr<float>() + ok, dhp + task * K * V, run, w);
        } else {
          float *Q = in.data(), *Kc = Q + BT * K, *G = Kc + BT * K, *Vc = G + BT * K, *Do = Vc + BT * V;
          float *dQ = out.data(), *dK = dQ + BT * K, *dG = dK + BT * K, *dV = dG + BT * K;
          rq.read(t0, h, L, 0, K, Q, K);
          rk.read(t0, h, L, 0, K, Kc, K);
          rg.read(t0, h, L, 0, K, G, K);
          rv.read(t0, h, L, 0, V, Vc, V);
          rdo.read(t0, h, L, 0, V, Do, V);
          chunk_grad(Q, Kc, Vc, G, Do, S, df, step == 0, L, K, V, K, V, s, dQ, dK, dV, dG, dhp + task * K * V,
                     run, w);
          rdq.write(dQ, K, t0, h, L, 0, K);
          rdk.write(dK, K, t0, h, L, 0, K);
          rdg.write(dG, K, t0, h, L, 0, K);
          rdv.write(dV, V, t0, h, L, 0, V);
        }
      }
  });
  return {dq, dk, dv, dg, dh0};
}

}  // namespace
}  // namespace gla_cpu

TORCH_LIBRARY_IMPL(gla_cpu, CPU, m) { m.impl("chunk_backward", &gla_cpu::chunk_backward); }
