// Shared by the compiled CPU forward and backward (chunk_fwd.cpp, chunk_bwd.cpp): the chunk length, the BLAS call,
// a vectorisable exponential, a chunk's gate factors and intra-chunk scores, and the sequences of a call.
//
// Math (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training", ICML 2024, §4.2): per
// chunk of BT tokens, b_t the cumulative log decay inside the chunk, B = b at its last token, S the state entering it,
//     o_t = s (q_t ⊙ e^{b_t}) S + s Σ_{j<=t} [Σ_k q_tk k_jk e^{b_tk - b_jk}] v_j
//     S'  = diag(e^B) S + Σ_j (k_j ⊙ e^{B - b_j})^T v_j
// Every exponent is <= 0 except the key factor e^{-b_j} of the factored intra-chunk product, used only when the
// chunk decays by at most SAFE_SPAN. A chunk that decays more (a trained model's strongest gate channels do) is
// split into row blocks of SB tokens, each factored about the decay just before it (Factors::block): its products
// with earlier tokens have both factors <= 1, and only a block that itself decays by more than SAFE_SPAN has its
// own pairs in log space (the paper's secondary-level chunking, §4.2).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

// The BLAS inside libtorch_cpu (MKL on x86, which exports the Fortran interface); ATen's own wrapper is not exported.
extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
extern "C" int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // null where torch's BLAS is not MKL

namespace gla_cpu {

constexpr int64_t BT = 64;
constexpr int64_t SB = 16;  // rows of a block of a chunk that is not safe
// As the Triton kernels' SAFE_DECAY (gla/ops/constants.py): key factors up to e^60 are far inside fp32's range (and
// the query factors >= e^-60 far above its denormals); 30, the PyTorch path's bound, cost a trained model's chunks
// 25% more time in the blocked path.
constexpr float SAFE_SPAN = 60.f;

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

// σ(a) without overflow: e^{-|a|} <= 1, then σ = 1 / (1 + e) for a >= 0 and e / (1 + e) below.
inline float sigmoid(float a) {
  const float e = exp_approx(-std::fabs(a)), r = 1.f / (1.f + e);
  return a >= 0.f ? r : e * r;
}

// Rows per task of the elementwise operators (swiglu.cpp, gated_norm.cpp, rms_norm.cpp) whose rows have `width`
// elements: ~8K elements a task, so that a small call stays on one thread and a large one spreads over all.
inline int64_t rows_per_task(int64_t width) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(width, 1)); }

// Storage types to float32 and back: bfloat16 as its upper 16 bits (rounded to nearest even, as torch converts, a NaN
// kept a NaN), float16 through c10::Half. Value casts, not memcpy through pointers: loops over them vectorise.
inline float widen(float x) { return x; }
inline float widen(uint16_t x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }
inline float widen(c10::Half x) { return static_cast<float>(x); }
template <typename T>
inline T narrow(float x) {
  return T(x);
}
template <>
inline uint16_t narrow<uint16_t>(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7fc0u : rounded);
}

// f(T*) with the tensor's data as its storage type: float, uint16_t (bfloat16 bits) or c10::Half.
template <typename F>
inline void with_storage(at::ScalarType type, void* p, F&& f) {
  if (type == at::kFloat)
    f(static_cast<float*>(p));
  else if (type == at::kBFloat16)
    f(static_cast<uint16_t*>(p));
  else
    f(static_cast<c10::Half*>(p));
}

// Rows of a [B, T, H, D] float32, bfloat16 or float16 tensor whose last dim is contiguous (its other strides any: a
// slice of a fused projection's output), copied a chunk at a time to and from float32 buffers: the kernels take such
// inputs without a converted copy of the whole tensor (15 copies per layer call at nanoGPT's sizes, ~180 us of 1.2 ms).
struct Rows {
  void* base;
  at::ScalarType type;
  int64_t T, sB, sT, sH;
  explicit Rows(const at::Tensor& x)
      : base(x.data_ptr()), type(x.scalar_type()), T(x.size(1)), sB(x.stride(0)), sT(x.stride(1)), sH(x.stride(2)) {}
  // Element offset of token tok of the flattened B * T (a chunk's tokens never cross a row of B) at head h.
  int64_t at(int64_t tok, int64_t h) const { return tok / T * sB + tok % T * sT + h * sH; }
  // dst [L, n] (row stride ld) = columns [c0, c0 + n) of tokens tok .. tok + L - 1 at head h.
  void read(int64_t tok, int64_t h, int64_t L, int64_t c0, int64_t n, float* dst, int64_t ld) const {
    with_storage(type, base, [&](auto* p) {
      const auto* src = p + at(tok, h) + c0;
      for (int64_t r = 0; r < L; ++r) {
        const auto* __restrict__ x = src + r * sT;
        float* __restrict__ y = dst + r * ld;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) y[c] = widen(x[c]);
      }
    });
  }
  void write(const float* src, int64_t ld, int64_t tok, int64_t h, int64_t L, int64_t c0, int64_t n) const {
    with_storage(type, base, [&](auto* p) {
      using T_ = std::remove_pointer_t<decltype(p)>;
      T_* dst = p + at(tok, h) + c0;
      for (int64_t r = 0; r < L; ++r) {
        const float* __restrict__ x = src + r * ld;
        T_* __restrict__ y = dst + r * sT;
#pragma omp simd
        for (int64_t c = 0; c < n; ++c) y[c] = narrow<T_>(x[c]);
      }
    });
  }
};

// Whether the kernels can read these tensors in place: float32 and contiguous (else they go through Rows).
inline bool in_place(std::initializer_list<const at::Tensor*> xs) {
  for (const at::Tensor* x : xs)
    if (x->scalar_type() != at::kFloat || !x->is_contiguous()) return false;
  return true;
}

// Held by each task thread inside a parallel region: its BLAS calls run on that thread alone. After
// torch.set_num_threads(n) MKL would otherwise start nested threads inside the tasks (forward 13-14 ms instead of
// 11 at B=1 T=4096 H=4 on 2 cores). A call with one task runs outside any region and keeps MKL's own threads.
struct OneBlasThread {
  const bool active = MKL_Set_Num_Threads_Local != nullptr && at::in_parallel_region();
  const int before = active ? MKL_Set_Num_Threads_Local(1) : 0;
  ~OneBlasThread() {
    if (active) MKL_Set_Num_Threads_Local(before);
  }
};

// Row-major C[m, n] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T as stored; the column-major BLAS computes
// C^T = op(B)^T op(A)^T from the same storage.
inline void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char tb_ = tb ? 'T' : 'N', ta_ = ta ? 'T' : 'N';
  const int m_ = static_cast<int>(n), n_ = static_cast<int>(m), k_ = static_cast<int>(k);
  const int lda_ = static_cast<int>(ldb), ldb_ = static_cast<int>(lda), ldc_ = static_cast<int>(ldc);
  sgemm_(&tb_, &ta_, &m_, &n_, &k_, &alpha, b, &lda_, a, &ldb_, &beta, c, &ldc_);
}

// One chunk's gate factors, in buffers a task allocates once: for L <= BT rows of q, k, g (row stride ldk),
// b [L, K] the in-chunk cumulative log decay, e = e^b, eBb = e^{B - b}, qa = s q ⊙ e^b, kf = k ⊙ e^{-b} (only when
// safe), kd = k ⊙ e^{B - b}, eB = e^B [K].
struct Factors {
  int64_t K, L = 0;
  bool safe = true;
  std::vector<float> b, e, eBb, qa, kf, kd, eB;
  std::vector<float> E, F, QI, KI;  // a row block's factors and operands (block, block_operands)
  std::vector<double> ref;
  explicit Factors(int64_t K_)
      : K(K_), b(BT * K_), e(BT * K_), eBb(BT * K_), qa(BT * K_), kf(BT * K_), kd(BT * K_), eB(K_), E(SB * K_),
        F(BT * K_), QI(SB * K_), KI(BT * K_), ref(K_) {}

  void load(const float* q, const float* k, const float* g, int64_t L_, int64_t ldk, float scale) {
    L = L_;
    float* __restrict__ bp = b.data();
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) bp[c] = g[c];
    for (int64_t t = 1; t < L; ++t) {
      const float* __restrict__ gt = g + t * ldk;
      const float* __restrict__ prev = bp + (t - 1) * K;
      float* __restrict__ cur = bp + t * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) cur[c] = prev[c] + gt[c];
    }
    const float* __restrict__ last = bp + (L - 1) * K;
    float span = 0.f;
#pragma omp simd reduction(min : span)
    for (int64_t c = 0; c < K; ++c) span = std::min(span, last[c]);
    safe = span >= -SAFE_SPAN;
    float* __restrict__ eBp = eB.data();
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) eBp[c] = exp_approx(last[c]);
    for (int64_t t = 0; t < L; ++t) {
      const float* __restrict__ qt = q + t * ldk;
      const float* __restrict__ kt = k + t * ldk;
      const float* __restrict__ bt = bp + t * K;
      float* __restrict__ et = e.data() + t * K;
      float* __restrict__ ebt = eBb.data() + t * K;
      float* __restrict__ qat = qa.data() + t * K;
      float* __restrict__ kft = kf.data() + t * K;
      float* __restrict__ kdt = kd.data() + t * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        const float ec = exp_approx(bt[c]), ebc = exp_approx(last[c] - bt[c]);
        et[c] = ec;
        ebt[c] = ebc;
        qat[c] = scale * qt[c] * ec;
        kft[c] = kt[c] / ec;  // read only when safe: e >= e^-SAFE_SPAN
        kdt[c] = kt[c] * ebc;
      }
    }
  }

  // S [K, V] (row stride ldS) = diag(e^B) S + X^T Y, X [L, K] (row stride K), Y [L, V] (row stride ldy): the state
  // carried over the chunk (forward: X = kd, Y = v) or its gradient carried back (backward: X = qa, Y = do).
  void carry(float* S, int64_t ldS, int64_t V, const float* X, const float* Y, int64_t ldy) const {
    for (int64_t r = 0; r < K; ++r) {
      float* row = S + r * ldS;
      const float d = eB[r];
#pragma omp simd
      for (int64_t x = 0; x < V; ++x) row[x] *= d;
    }
    mm(true, false, K, V, L, 1.f, X, K, Y, ldy, 1.f, S, ldS);
  }

  // Log-space differences b_i - b_j of a chunk that is not safe, from cumulative sums redone in double so that the
  // differences of large values keep their precision: bd [L, K].
  void double_sums(const float* g, int64_t ldk, std::vector<double>& bd) const {
    bd.resize(L * K);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t c = 0; c < K; ++c) bd[t * K + c] = (t ? bd[(t - 1) * K + c] : 0.) + g[t * ldk + c];
  }

  // Row block [r0, r1) of a chunk that is not safe, factored about ref = b_{r0-1} (0 for the first block), the
  // exponents taken from the double sums bd (differences of large sums keep their precision): E [r1 - r0, K] =
  // e^{b_i - ref} and F [cols, K] = e^{ref - b_j}. Both are <= 1 for j < r0; inside the block F <= e^{SAFE_SPAN}
  // when the block itself decays by at most that. Returns cols: r1 then, else r0 (the block's own pairs are left to
  // log space).
  int64_t block(const std::vector<double>& bd, int64_t r0, int64_t r1) {
    double* __restrict__ rf = ref.data();
    const double* __restrict__ end = bd.data() + (r1 - 1) * K;
    double span = 0.;
#pragma omp simd reduction(min : span)
    for (int64_t c = 0; c < K; ++c) {
      rf[c] = r0 ? bd[(r0 - 1) * K + c] : 0.;
      span = std::min(span, end[c] - rf[c]);
    }
    const int64_t cols = span >= -SAFE_SPAN ? r1 : r0;
    for (int64_t i = r0; i < r1; ++i) {
      const double* __restrict__ bi = bd.data() + i * K;
      float* __restrict__ Ei = E.data() + (i - r0) * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) Ei[c] = exp_approx(static_cast<float>(bi[c] - rf[c]));
    }
    for (int64_t j = 0; j < cols; ++j) {
      const double* __restrict__ bj = bd.data() + j * K;
      float* __restrict__ Fj = F.data() + j * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) Fj[c] = exp_approx(static_cast<float>(rf[c] - bj[c]));
    }
    return cols;
  }

  // The block's operands of the factored products: QI = scale * q ⊙ E (its rows), KI = k ⊙ F (rows j < cols).
  void block_operands(const float* q, const float* k, int64_t ldk, int64_t r0, int64_t r1, int64_t cols,
                      float scale) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* __restrict__ qi = q + i * ldk;
      const float* __restrict__ Ei = E.data() + (i - r0) * K;
      float* __restrict__ QIi = QI.data() + (i - r0) * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) QIi[c] = scale * qi[c] * Ei[c];
    }
    for (int64_t j = 0; j < cols; ++j) {
      const float* __restrict__ kj = k + j * ldk;
      const float* __restrict__ Fj = F.data() + j * K;
      float* __restrict__ KIj = KI.data() + j * K;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) KIj[c] = kj[c] * Fj[c];
    }
  }

  // A [L, L] (row stride BT) = the causal scores s Σ_k q_ik k_jk e^{b_ik - b_jk} (j <= i), zero above the diagonal.
  void scores(const float* q, const float* k, const float* g, int64_t ldk, float scale, float* A,
              std::vector<double>& bd) {
    if (safe) {
      mm(false, true, L, L, K, 1.f, qa.data(), K, kf.data(), K, 0.f, A, BT);
    } else {
      double_sums(g, ldk, bd);
      for (int64_t r0 = 0; r0 < L; r0 += SB) {
        const int64_t r1 = std::min(r0 + SB, L), cols = block(bd, r0, r1);
        block_operands(q, k, ldk, r0, r1, cols, scale);
        if (cols > 0) mm(false, true, r1 - r0, cols, K, 1.f, QI.data(), K, KI.data(), K, 0.f, A + r0 * BT, BT);
        for (int64_t i = r0; i < r1; ++i)  // the block's own pairs when it decays too fast to factor
          for (int64_t j = cols; j <= i; ++j) {
            const double *bi = bd.data() + i * K, *bj = bd.data() + j * K;
            const float *qi = q + i * ldk, *kj = k + j * ldk;
            float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t c = 0; c < K; ++c) acc += qi[c] * kj[c] * exp_approx(static_cast<float>(bi[c] - bj[c]));
            A[i * BT + j] = scale * acc;
          }
      }
    }
    for (int64_t i = 0; i < L; ++i) std::fill(A + i * BT + i + 1, A + i * BT + L, 0.f);
  }
};

// The sequences of a call: token ranges [bounds[n], bounds[n + 1]) of the flattened [B * T] tokens, and the row of
// each sequence's first chunk in the per-chunk state buffer (sequences in order, ceil(length / BT) chunks each).
struct Sequences {
  std::vector<int64_t> bounds, first_chunk;
  int64_t N = 0;
  Sequences(int64_t B, int64_t T, const std::optional<at::Tensor>& cu_seqlens, const char* op) {
    if (cu_seqlens.has_value()) {
      const at::Tensor& cu = *cu_seqlens;
      TORCH_CHECK(B == 1 && cu.scalar_type() == at::kLong && cu.dim() == 1 && cu.numel() >= 1 && cu.is_contiguous()
                  && cu.device().is_cpu(), op, ": cu_seqlens must be a contiguous int64 CPU [N + 1] with B == 1");
      bounds.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
    } else {
      for (int64_t n = 0; n <= B; ++n) bounds.push_back(n * T);
    }
    N = static_cast<int64_t>(bounds.size()) - 1;
    TORCH_CHECK(bounds[0] == 0, op, ": cu_seqlens must start at 0");
    for (int64_t n = 0; n < N; ++n)
      TORCH_CHECK(bounds[n] <= bounds[n + 1] && bounds[n + 1] <= B * T, op,
                  ": cu_seqlens must rise from 0 to at most B * T");
    first_chunk.assign(N + 1, 0);
    for (int64_t n = 0; n < N; ++n) first_chunk[n + 1] = first_chunk[n] + (bounds[n + 1] - bounds[n] + BT - 1) / BT;
  }
};

// q, k, g [B, T, H, K] and v (and do) [B, T, H, V]: float32, bfloat16 or float16 CPU tensors whose last dim is
// contiguous and whose shapes agree.
inline void check_inputs(std::initializer_list<const at::Tensor*> qkg, std::initializer_list<const at::Tensor*> vs,
                         const char* op) {
  const at::Tensor& q = **qkg.begin();
  for (auto group : {qkg, vs})
    for (const at::Tensor* x : group) {
      const auto t = x->scalar_type();
      TORCH_CHECK((t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && x->device().is_cpu() &&
                      x->dim() == 4 && (x->numel() == 0 || x->size(3) <= 1 || x->stride(3) == 1),
                  op, " takes float32, bfloat16 or float16 CPU tensors [B, T, H, D] with a contiguous last dim");
    }
  for (const at::Tensor* x : qkg) TORCH_CHECK(x->sizes() == q.sizes(), op, ": q, k, g [B, T, H, K] must agree");
  for (const at::Tensor* x : vs)
    TORCH_CHECK(x->size(0) == q.size(0) && x->size(1) == q.size(1) && x->size(2) == q.size(2) &&
                    x->size(3) == (*vs.begin())->size(3),
                op, ": v [B, T, H, V] must agree with q");
}

// A state tensor [N, H, K, V], contiguous float32 (h0, the final state's gradient).
inline void check_state(const at::Tensor& s, int64_t N, int64_t H, int64_t K, int64_t V, const char* what) {
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 4 && s.size(0) == N && s.size(1) == H &&
                  s.size(2) == K && s.size(3) == V,
              what, " must be a contiguous float32 [N, H, K, V]");
}

}  // namespace gla_cpu
