// The GLA layer's output (Yang et al. 2024, §4.4): each head's output normalised (RMSNorm, Zhang & Sennrich 2019)
// and gated by swish of the output-gate projection,
//     n = o / sqrt(mean_V(o^2) + eps),  y = (n ⊙ w) ⊙ r σ(r)
//     dr = dy ⊙ (n ⊙ w) ⊙ σ(r) (1 + r (1 − σ(r))),  dw = Σ dy ⊙ r σ(r) ⊙ n,
//     do = rstd (dn − n mean_V(dn ⊙ n)) with dn = dy ⊙ r σ(r) ⊙ w
// One pass each way in float32 whatever the storage (float32 or bfloat16, each result rounded once). Eager PyTorch
// takes casts, the norm, the swish and the product forward and about twice as many passes backward.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace gla_cpu {
namespace {

// o [M, H, V] contiguous, r [M, H * V] (row stride ldr, last dim contiguous), both of o's type; w [V] float32.
void check(const at::Tensor& o, const at::Tensor& r, const at::Tensor& w, const char* op) {
  TORCH_CHECK(o.device().is_cpu() && (o.scalar_type() == at::kFloat || o.scalar_type() == at::kBFloat16) &&
                  o.dim() == 3 && o.is_contiguous(),
              op, ": o must be a contiguous float32 or bfloat16 CPU tensor [M, H, V], got ", o.scalar_type(), " ",
              o.sizes());
  TORCH_CHECK(r.scalar_type() == o.scalar_type() && r.dim() == 2 && r.size(0) == o.size(0) &&
                  r.size(1) == o.size(1) * o.size(2) && r.stride(1) == 1 && r.device().is_cpu(),
              op, ": r must be o's dtype, [M, H * V] with a contiguous last dim, got ", r.scalar_type(), " ", r.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == o.size(2) && w.is_contiguous(), op,
              ": w must be a contiguous float32 [V]");
}

// Returns y [M, H, V] (o's dtype) and rstd [M * H] float32, kept for the backward.
std::tuple<at::Tensor, at::Tensor> gated_norm_forward(const at::Tensor& o, const at::Tensor& r, const at::Tensor& w,
                                                      double eps) {
  check(o, r, w, "gla_cpu::gated_norm_forward");
  const int64_t M = o.size(0), H = o.size(1), V = o.size(2), ldr = r.stride(0);
  at::Tensor y = at::empty_like(o), rstd = at::empty({M * H}, o.options().dtype(at::kFloat));
  const float* wp = w.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  with_storage(o.scalar_type(), o.data_ptr(), [&](auto* op) {
    using T = std::remove_pointer_t<decltype(op)>;
    const T* rr = static_cast<const T*>(r.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    at::parallel_for(0, M * H, rows_per_task(V), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* __restrict__ oi = op + i * V;
        const T* __restrict__ ri = rr + i / H * ldr + i % H * V;
        T* __restrict__ yi = yp + i * V;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < V; ++c) ss += widen(oi[c]) * widen(oi[c]);
        const float rs = 1.f / std::sqrt(ss / static_cast<float>(V) + static_cast<float>(eps));
        rp[i] = rs;
#pragma omp simd
        for (int64_t c = 0; c < V; ++c) {
          const float x = widen(ri[c]);
          yi[c] = narrow<T>(widen(oi[c]) * rs * wp[c] * x * sigmoid(x));
        }
      }
    });
  });
  return {y, rstd};
}

// dy [M, H, V] (o's dtype; made contiguous), o, r, w as the forward's, rstd its second output. Returns do [M, H, V],
// dr [M, H * V] (contiguous), both o's dtype, and dw [V] float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_norm_backward(const at::Tensor& dy_, const at::Tensor& o,
                                                                   const at::Tensor& r, const at::Tensor& w,
                                                                   const at::Tensor& rstd) {
  const char* op_name = "gla_cpu::gated_norm_backward";
  check(o, r, w, op_name);
  TORCH_CHECK(dy_.scalar_type() == o.scalar_type() && dy_.sizes() == o.sizes(), op_name, ": dy must be o's dtype and shape");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == o.size(0) * o.size(1),
              op_name, ": rstd must be the forward's float32 [M * H]");
  const at::Tensor dy = dy_.contiguous();
  const int64_t M = o.size(0), H = o.size(1), V = o.size(2), ldr = r.stride(0);
  at::Tensor d_o = at::empty_like(o), dr = at::empty({M, H * V}, o.options());
  const int64_t threads = at::get_num_threads();
  at::Tensor partial = at::zeros({threads, V}, w.options());  // each thread's share of dw, summed below
  const float *wp = w.data_ptr<float>(), *rsp = rstd.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  with_storage(o.scalar_type(), o.data_ptr(), [&](auto* op) {
    using T = std::remove_pointer_t<decltype(op)>;
    const T *rr = static_cast<const T*>(r.data_ptr()), *dyp = static_cast<const T*>(dy.data_ptr());
    T *dop = static_cast<T*>(d_o.data_ptr()), *drp = static_cast<T*>(dr.data_ptr());
    at::parallel_for(0, M * H, rows_per_task(V), [&](int64_t i0, int64_t i1) {
      float* __restrict__ dw = pp + at::get_thread_num() * V;
      std::vector<float> dn(V);
      for (int64_t i = i0; i < i1; ++i) {
        const T* __restrict__ oi = op + i * V;
        const T* __restrict__ ri = rr + i / H * ldr + i % H * V;
        const T* __restrict__ gi = dyp + i * V;
        T* __restrict__ dri = drp + i * V;
        T* __restrict__ doi = dop + i * V;
        float* __restrict__ dni = dn.data();
        const float rs = rsp[i];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < V; ++c) {
          const float n = widen(oi[c]) * rs, x = widen(ri[c]), s = sigmoid(x), g = widen(gi[c]);
          const float da = g * x * s;
          dw[c] += da * n;
          dni[c] = da * wp[c];
          dot += dni[c] * n;
          dri[c] = narrow<T>(g * n * wp[c] * s * (1.f + x * (1.f - s)));
        }
        const float mean = dot / static_cast<float>(V);
#pragma omp simd
        for (int64_t c = 0; c < V; ++c) doi[c] = narrow<T>(rs * (dni[c] - widen(oi[c]) * rs * mean));
      }
    });
  });
  return {d_o, dr, partial.sum(0)};
}

}  // namespace
}  // namespace gla_cpu

TORCH_LIBRARY_FRAGMENT(gla_cpu, m) {
  m.def("gated_norm_forward(Tensor o, Tensor r, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("gated_norm_backward(Tensor dy, Tensor o, Tensor r, Tensor w, Tensor rstd) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gla_cpu, CPU, m) {
  m.impl("gated_norm_forward", &gla_cpu::gated_norm_forward);
  m.impl("gated_norm_backward", &gla_cpu::gated_norm_backward);
}
