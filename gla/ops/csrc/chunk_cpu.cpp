// Chunkwise GLA forward on the CPU: one task per (sequence, head), chunk after chunk, the state held in the task's
// own buffer and each chunk's products done by the BLAS that PyTorch links (MKL on x86), with the elementwise work
// between them in plain loops the compiler vectorises.
//
// Math (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", ICML 2024, §4.2): per
// chunk of BT tokens, b_t the cumulative log decay inside the chunk, B = b at its last token, S the state entering it,
//     o_t = s (q_t ⊙ e^{b_t}) S + s Σ_{j<=t} [Σ_k q_tk k_jk e^{b_tk - b_jk}] v_j
//     S'  = diag(e^B) S + Σ_j (k_j ⊙ e^{B - b_j})^T v_j
// Every exponent is <= 0 except the key factor e^{-b_j} of the factored intra-chunk product, used only when the
// chunk decays by at most SAFE_SPAN; a chunk that decays more gets its intra-chunk scores in log space.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t BT = 64;
constexpr float SAFE_SPAN = 30.f;

// e^x for x <= ~88, relative error ~2e-7: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2. Branch-free so that loops
// over it vectorise (std::exp does not).
inline float exp_approx(float x) {
  x = std::max(x, -87.f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

}  // namespace

// The BLAS inside libtorch_cpu (MKL on x86, which exports the Fortran interface); ATen's own wrapper is not exported.
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T as stored; the column-major BLAS computes
// C^T = op(B)^T op(A)^T from the same storage.
void mm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
        float beta, float* c, int ldc) {
  const char tb_ = tb ? 'T' : 'N', ta_ = ta ? 'T' : 'N';
  sgemm_(&tb_, &ta_, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}

struct Scratch {
  std::vector<float> b, qa, kf, kd, A;  // b: [BT, K] cumulative log decay; qa, kf, kd: [BT, K]; A: [BT, BT]
  explicit Scratch(int64_t K) : b(BT * K), qa(BT * K), kf(BT * K), kd(BT * K), A(BT * BT) {}
};

// Intra-chunk scores of a chunk that decays by more than SAFE_SPAN, in log space (every exponent <= 0):
// A_ij = s Σ_k q_ik k_jk e^{b_ik - b_jk} for j <= i. The cumulative sums are redone in double so that the
// differences of large values keep their precision.
void scores_logspace(const float* q, const float* k, const float* g, float* A, int64_t L, int64_t K, int64_t ldk,
                     float scale) {
  std::vector<double> b(L * K);
  for (int64_t t = 0; t < L; ++t)
    for (int64_t c = 0; c < K; ++c) b[t * K + c] = (t ? b[(t - 1) * K + c] : 0.) + g[t * ldk + c];
  std::vector<float> d(K);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      for (int64_t c = 0; c < K; ++c) d[c] = static_cast<float>(b[i * K + c] - b[j * K + c]);
      const float *qi = q + i * ldk, *kj = k + j * ldk;
      float acc = 0.f;
      for (int64_t c = 0; c < K; ++c) acc += qi[c] * kj[c] * exp_approx(d[c]);
      A[i * BT + j] = scale * acc;
    }
}

// One chunk of L <= BT tokens of one (sequence, head): o rows [L, V] (row stride ldo) from q, k, g rows [L, K]
// (stride ldk) and v rows [L, V] (stride ldo); S [K, V] (row stride ldS) is the state entering, updated in place to
// the state leaving. V may be a slice of the head's value columns: each column of o and S depends only on its own
// column of v.
void chunk(const float* q, const float* k, const float* v, const float* g, float* o, float* S, int64_t L,
           int64_t K, int64_t V, int64_t ldk, int64_t ldo, int64_t ldS, float scale, Scratch& w) {
  float *b = w.b.data(), *qa = w.qa.data(), *kf = w.kf.data(), *kd = w.kd.data(), *A = w.A.data();
  for (int64_t c = 0; c < K; ++c) b[c] = g[c];
  for (int64_t t = 1; t < L; ++t)
    for (int64_t c = 0; c < K; ++c) b[t * K + c] = b[(t - 1) * K + c] + g[t * ldk + c];
  const float* last = b + (L - 1) * K;
  float span = 0.f;
  for (int64_t c = 0; c < K; ++c) span = std::min(span, last[c]);
  const bool safe = span >= -SAFE_SPAN;
  for (int64_t t = 0; t < L; ++t) {
    const float *qt = q + t * ldk, *kt = k + t * ldk, *bt = b + t * K;
    float *qat = qa + t * K, *kft = kf + t * K, *kdt = kd + t * K;
    for (int64_t c = 0; c < K; ++c) {
      const float e = exp_approx(bt[c]);
      qat[c] = scale * qt[c] * e;
      kft[c] = kt[c] / e;  // read only when safe: e >= e^-SAFE_SPAN
    }
    if (safe) {
      for (int64_t c = 0; c < K; ++c) kdt[c] = kft[c] * exp_approx(last[c]);  // e^{B - b} = e^B e^{-b}
    } else {
      for (int64_t c = 0; c < K; ++c) kdt[c] = kt[c] * exp_approx(last[c] - bt[c]);
    }
  }
  mm(false, false, L, V, K, 1.f, qa, K, S, ldS, 0.f, o, ldo);  // o = s (q ⊙ e^b) S
  if (safe)
    mm(false, true, L, L, K, 1.f, qa, K, kf, K, 0.f, A, BT);  // A = s (q ⊙ e^b)(k ⊙ e^-b)^T
  else
    scores_logspace(q, k, g, A, L, K, ldk, scale);
  for (int64_t i = 0; i < L; ++i) std::fill(A + i * BT + i + 1, A + i * BT + L, 0.f);
  mm(false, false, L, V, L, 1.f, A, BT, v, ldo, 1.f, o, ldo);  // o += tril(A) v
  for (int64_t c = 0; c < K; ++c) {
    const float d = exp_approx(static_cast<float>(last[c]));
    float* row = S + c * ldS;
    for (int64_t x = 0; x < V; ++x) row[x] *= d;
  }
  mm(true, false, K, V, L, 1.f, kd, K, v, ldo, 1.f, S, ldS);  // S = diag(e^B) S + (k ⊙ e^{B-b})^T v
}

// q, k, g: [B, T, H, K]; v: [B, T, H, V] (float32, contiguous); h0: [N, H, K, V] float32 or undefined;
// cu_seqlens: [N + 1] int64 (then B == 1) or undefined. Returns o [B, T, H, V], the final states [N, H, K, V] and,
// when state_rows > 0, the states entering each chunk [state_rows, H, K, V] (for the backward): sequence n's chunks
// at consecutive rows after those of sequences 0..n-1, rows past the last chunk zero; else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_forward(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& g,
                                                             const std::optional<at::Tensor>& h0,
                                                             const std::optional<at::Tensor>& cu_seqlens,
                                                             double scale, int64_t state_rows) {
  for (const at::Tensor* x : {&q, &k, &v, &g})
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->is_contiguous() && x->device().is_cpu() && x->dim() == 4,
                "gla_cpu::chunk_forward takes contiguous float32 CPU tensors [B, T, H, D]");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  TORCH_CHECK(k.sizes() == q.sizes() && g.sizes() == q.sizes() && v.size(0) == B && v.size(1) == T && v.size(2) == H,
              "gla_cpu::chunk_forward: q, k, g [B, T, H, K] and v [B, T, H, V] must agree");
  std::vector<int64_t> bounds;
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(B == 1 && cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.numel() >= 1 && cu.is_contiguous(),
                "gla_cpu::chunk_forward: cu_seqlens must be a contiguous int64 [N + 1] with B == 1");
    bounds.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  } else {
    for (int64_t n = 0; n <= B; ++n) bounds.push_back(n * T);
  }
  const int64_t N = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK(bounds[0] == 0, "gla_cpu::chunk_forward: cu_seqlens must start at 0");
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(0 <= bounds[n] && bounds[n] <= bounds[n + 1] && bounds[n + 1] <= B * T,
                "gla_cpu::chunk_forward: cu_seqlens must rise from 0 to at most B * T");
  if (h0.has_value())
    TORCH_CHECK(h0->scalar_type() == at::kFloat && h0->is_contiguous() && h0->dim() == 4 && h0->size(0) == N &&
                    h0->size(1) == H && h0->size(2) == K && h0->size(3) == V,
                "gla_cpu::chunk_forward: h0 must be a contiguous float32 [N, H, K, V]");
  std::vector<int64_t> first_chunk(N + 1, 0);
  for (int64_t n = 0; n < N; ++n) first_chunk[n + 1] = first_chunk[n] + (bounds[n + 1] - bounds[n] + BT - 1) / BT;
  TORCH_CHECK(state_rows == 0 || state_rows >= first_chunk[N],
              "gla_cpu::chunk_forward: state_rows must be 0 or at least the number of chunks");
  at::Tensor o = at::empty_like(v);
  at::Tensor ht = at::empty({N, H, K, V}, q.options());
  at::Tensor hs = at::empty({state_rows, H, K, V}, q.options());
  float* hsp = hs.data_ptr<float>();
  if (state_rows > 0) std::fill(hsp + first_chunk[N] * H * K * V, hsp + state_rows * H * K * V, 0.f);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
              *gp = g.data_ptr<float>();
  const float* h0p = h0.has_value() ? h0->data_ptr<float>() : nullptr;
  float *op = o.data_ptr<float>(), *hp = ht.data_ptr<float>();
  std::fill(op + bounds[N] * H * V, op + B * T * H * V, 0.f);  // tokens after the last sequence
  const float s = static_cast<float>(scale);
  // Tasks: (sequence, head, slice of the value columns). Slices only where sequences x heads would leave threads
  // idle (each repeats its chunk's gate and score work), and never narrower than 32 columns.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>((at::get_num_threads() + N * H - 1) / std::max<int64_t>(N * H, 1), V / 32));
  const int64_t width = (V + parts - 1) / parts;
  at::parallel_for(0, N * H * parts, 1, [&](int64_t begin, int64_t end) {
    Scratch w(K);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nh = task / parts, n = nh / H, h = nh % H, v0 = task % parts * width;
      const int64_t Vp = std::min(width, V - v0);
      float* S = hp + nh * K * V + v0;
      for (int64_t c = 0; c < K; ++c) {
        if (h0p != nullptr)
          std::copy(h0p + nh * K * V + c * V + v0, h0p + nh * K * V + c * V + v0 + Vp, S + c * V);
        else
          std::fill(S + c * V, S + c * V + Vp, 0.f);
      }
      for (int64_t t0 = bounds[n], c = first_chunk[n]; t0 < bounds[n + 1]; t0 += BT, ++c) {
        if (state_rows > 0)
          for (int64_t r = 0; r < K; ++r)
            std::copy(S + r * V, S + r * V + Vp, hsp + ((c * H + h) * K + r) * V + v0);
        const int64_t L = std::min(BT, bounds[n + 1] - t0), ok = (t0 * H + h) * K, ov = (t0 * H + h) * V + v0;
        chunk(qp + ok, kp + ok, vp + ov, gp + ok, op + ov, S, L, K, Vp, H * K, H * V, V, s, w);
      }
    }
  });
  return {o, ht, hs};
}

}  // namespace

TORCH_LIBRARY(gla_cpu, m) {
  m.def("chunk_forward(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, Tensor? cu_seqlens, float scale, "
        "int state_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gla_cpu, CPU, m) { m.impl("chunk_forward", &chunk_forward); }
