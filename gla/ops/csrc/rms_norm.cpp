// RMSNorm (Zhang & Sennrich 2019) of the float32 residual stream straight into the bfloat16 that the next matmul
// reads under autocast: y = bf16(x / sqrt(mean(x^2) + eps) ⊙ w), and back,
//     dx = rstd (dn − n mean(dn ⊙ n)) with n = x rstd, dn = dy ⊙ w;  dw = Σ dy ⊙ n
// in one pass each way: torch's fused norm returns float32, which autocast then copies to bfloat16 (and its backward
// copies the gradient back), two more passes and four more operators per norm.
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace gla_cpu {
namespace {

void check(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous float32 CPU tensor [M, D], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), op,
              ": w must be a contiguous float32 [D]");
}

// x [M, D] float32, w [D] -> y [M, D] bfloat16 and rstd [M] float32 (kept for the backward).
std::tuple<at::Tensor, at::Tensor> rms_norm_bf16_forward(const at::Tensor& x, const at::Tensor& w, double eps) {
  check(x, w, "gla_cpu::rms_norm_bf16_forward");
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor y = at::empty({M, D}, x.options().dtype(at::kBFloat16)), rstd = at::empty({M}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  uint16_t* yp = static_cast<uint16_t*>(y.data_ptr());
  at::parallel_for(0, M, rows_per_task(D), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* __restrict__ xi = xp + i * D;
      uint16_t* __restrict__ yi = yp + i * D;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < D; ++c) ss += xi[c] * xi[c];
      const float rs = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      rp[i] = rs;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) yi[c] = narrow<uint16_t>(xi[c] * rs * wp[c]);
    }
  });
  return {y, rstd};
}

// dy [M, D] bfloat16 (made contiguous), x, w, rstd as the forward's -> dx [M, D] and dw [D], float32.
std::tuple<at::Tensor, at::Tensor> rms_norm_bf16_backward(const at::Tensor& dy_, const at::Tensor& x,
                                                          const at::Tensor& w, const at::Tensor& rstd) {
  const char* op = "gla_cpu::rms_norm_bf16_backward";
  check(x, w, op);
  TORCH_CHECK(dy_.scalar_type() == at::kBFloat16 && dy_.sizes() == x.sizes(), op, ": dy must be bfloat16 [M, D]");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.is_contiguous() && rstd.numel() == x.size(0), op,
              ": rstd must be the forward's float32 [M]");
  const at::Tensor dy = dy_.contiguous();
  const int64_t M = x.size(0), D = x.size(1);
  at::Tensor dx = at::empty({M, D}, x.options());
  at::Tensor partial = at::zeros({at::get_num_threads(), D}, x.options());  // each thread's share of dw
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rstd.data_ptr<float>();
  const uint16_t* gp = static_cast<const uint16_t*>(dy.data_ptr());
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, M, rows_per_task(D), [&](int64_t i0, int64_t i1) {
    float* __restrict__ dw = pp + at::get_thread_num() * D;
    for (int64_t i = i0; i < i1; ++i) {
      const float* __restrict__ xi = xp + i * D;
      const uint16_t* __restrict__ gi = gp + i * D;
      float* __restrict__ dxi = dxp + i * D;
      const float rs = rp[i];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < D; ++c) {
        const float n = xi[c] * rs, g = widen(gi[c]);
        dw[c] += g * n;
        dot += g * wp[c] * n;
      }
      const float mean = dot / static_cast<float>(D);
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) dxi[c] = rs * (widen(gi[c]) * wp[c] - xi[c] * rs * mean);
    }
  });
  return {dx, partial.sum(0)};
}

}  // namespace
}  // namespace gla_cpu

TORCH_LIBRARY_FRAGMENT(gla_cpu, m) {
  m.def("rms_norm_bf16_forward(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bf16_backward(Tensor dy, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gla_cpu, CPU, m) {
  m.impl("rms_norm_bf16_forward", &gla_cpu::rms_norm_bf16_forward);
  m.impl("rms_norm_bf16_backward", &gla_cpu::rms_norm_bf16_backward);
}
