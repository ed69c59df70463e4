// SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") on the joint output of the gate and up projections:
//     y = [a | u] [rows, 2F],  h = silu(a) ⊙ u = a σ(a) ⊙ u
//     da = dh ⊙ u ⊙ σ(a) (1 + a (1 − σ(a))),  du = dh ⊙ a σ(a)
// One pass each way in float32 whatever the storage (float32 or bfloat16, each result rounded once), the gradient
// written as the joint [da | du] that the one matmul of both projections takes back. Eager PyTorch needs three
// passes forward and five backward, each through memory, plus the split's concatenation (benchmarks/NOTES.md).
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace gla_cpu {
namespace {

template <typename T>
void forward_rows(const T* y, T* h, int64_t r0, int64_t r1, int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ a = y + r * 2 * F;
    const T* __restrict__ u = a + F;
    T* __restrict__ hr = h + r * F;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) {
      const float x = widen(a[c]);
      hr[c] = narrow<T>(x * sigmoid(x) * widen(u[c]));
    }
  }
}

template <typename T>
void backward_rows(const T* dh, const T* y, T* dy, int64_t r0, int64_t r1, int64_t F) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict__ a = y + r * 2 * F;
    const T* __restrict__ u = a + F;
    const T* __restrict__ d = dh + r * F;
    T* __restrict__ da = dy + r * 2 * F;
    T* __restrict__ du = da + F;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) {
      const float x = widen(a[c]), s = sigmoid(x), g = widen(d[c]);
      da[c] = narrow<T>(g * widen(u[c]) * s * (1.f + x * (1.f - s)));
      du[c] = narrow<T>(g * x * s);
    }
  }
}

void check_joint(const at::Tensor& y, const char* op) {
  TORCH_CHECK(y.device().is_cpu() && (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16) &&
                  y.is_contiguous() && y.dim() >= 1 && y.size(-1) % 2 == 0,
              op, ": y must be a contiguous float32 or bfloat16 CPU tensor [..., 2F], got ", y.scalar_type(), " ",
              y.sizes());
}

// y [..., 2F] -> h [..., F] = silu(y[..., :F]) ⊙ y[..., F:], y's dtype.
at::Tensor swiglu_forward(const at::Tensor& y) {
  check_joint(y, "gla_cpu::swiglu_forward");
  const int64_t F = y.size(-1) / 2, rows = F ? y.numel() / (2 * F) : 0;
  std::vector<int64_t> shape(y.sizes().begin(), y.sizes().end());
  shape.back() = F;
  at::Tensor h = at::empty(shape, y.options());
  with_storage(y.scalar_type(), y.data_ptr(), [&](auto* yp) {
    auto* hp = static_cast<decltype(yp)>(h.data_ptr());
    at::parallel_for(0, rows, rows_per_task(F), [&](int64_t r0, int64_t r1) { forward_rows(yp, hp, r0, r1, F); });
  });
  return h;
}

// dh [..., F] (y's dtype, any layout: made contiguous), y [..., 2F] -> dy [..., 2F] = [da | du].
at::Tensor swiglu_backward(const at::Tensor& dh_, const at::Tensor& y) {
  const char* op = "gla_cpu::swiglu_backward";
  check_joint(y, op);
  const int64_t F = y.size(-1) / 2, rows = F ? y.numel() / (2 * F) : 0;
  TORCH_CHECK(dh_.device().is_cpu() && dh_.scalar_type() == y.scalar_type() && dh_.numel() == rows * F &&
                  dh_.dim() == y.dim() && dh_.size(-1) == F,
              op, ": dh must be y's dtype with y's shape but F = ", F, " last, got ", dh_.scalar_type(), " ",
              dh_.sizes());
  const at::Tensor dh = dh_.contiguous();
  at::Tensor dy = at::empty_like(y);
  with_storage(y.scalar_type(), y.data_ptr(), [&](auto* yp) {
    using T = std::remove_pointer_t<decltype(yp)>;
    const T* gp = static_cast<const T*>(dh.data_ptr());
    T* dyp = static_cast<T*>(dy.data_ptr());
    at::parallel_for(0, rows, rows_per_task(F), [&](int64_t r0, int64_t r1) { backward_rows(gp, yp, dyp, r0, r1, F); });
  });
  return dy;
}

}  // namespace
}  // namespace gla_cpu

TORCH_LIBRARY_FRAGMENT(gla_cpu, m) {
  m.def("swiglu_forward(Tensor y) -> Tensor");
  m.def("swiglu_backward(Tensor dh, Tensor y) -> Tensor");
}

TORCH_LIBRARY_IMPL(gla_cpu, CPU, m) {
  m.impl("swiglu_forward", &gla_cpu::swiglu_forward);
  m.impl("swiglu_backward", &gla_cpu::swiglu_backward);
}
