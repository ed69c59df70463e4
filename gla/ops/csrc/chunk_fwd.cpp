// The compiled CPU forward: one task per (sequence, head, slice of the value columns), chunk after chunk, the state
// held in the output's own rows and each chunk's products done by the BLAS that torch links, with the elementwise
// work between them in loops the compiler vectorises (the math: common.h).
#include "common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace gla_cpu {
namespace {

// One chunk of one (sequence, head): o rows [L, V] (row stride ldo) from the factors f and v rows [L, V] (stride
// ldo); S [K, V] (row stride ldS) is the state entering, updated in place to the state leaving. V may be a slice of
// the head's value columns: each column of o and S depends only on its own column of v.
void chunk(const float* q, const float* k, const float* v, const float* g, float* o, float* S, Factors& f,
           int64_t V, int64_t ldk, int64_t ldo, int64_t ldS, float scale, float* A, std::vector<double>& bd) {
  const int64_t L = f.L, K = f.K;
  mm(false, false, L, V, K, 1.f, f.qa.data(), K, S, ldS, 0.f, o, ldo);  // o = s (q ⊙ e^b) S
  f.scores(q, k, g, ldk, scale, A, bd);
  mm(false, false, L, V, L, 1.f, A, BT, v, ldo, 1.f, o, ldo);  // o += tril(A) v
  f.carry(S, ldS, V, f.kd.data(), v, ldo);  // S = diag(e^B) S + (k ⊙ e^{B-b})^T v
}

// q, k, g: [B, T, H, K]; v: [B, T, H, V] (float32, bfloat16 or float16, last dim contiguous); h0: [N, H, K, V] or
// none; cu_seqlens: [N + 1] int64 (then B == 1) or none. Returns o [B, T, H, V] in v's dtype, the final states
// [N, H, K, V] and, when state_rows > 0, the states entering each chunk [state_rows, H, K, V] for the backward
// (Sequences::first_chunk gives the rows; rows past the last chunk zero), else an empty tensor; states float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_forward(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& g,
                                                             const std::optional<at::Tensor>& h0,
                                                             const std::optional<at::Tensor>& cu_seqlens,
                                                             double scale, int64_t state_rows) {
  const char* op = "gla_cpu::chunk_forward";
  check_inputs({&q, &k, &g}, {&v}, op);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const Sequences seqs(B, T, cu_seqlens, op);
  const int64_t N = seqs.N;
  if (h0.has_value()) check_state(*h0, N, H, K, V, "gla_cpu::chunk_forward: h0");
  TORCH_CHECK(state_rows == 0 || state_rows >= seqs.first_chunk[N], op,
              ": state_rows must be 0 or at least the number of chunks");
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor o = at::empty({B, T, H, V}, v.options());
  at::Tensor ht = at::empty({N, H, K, V}, f32);
  at::Tensor hs = at::empty({state_rows, H, K, V}, f32);
  o.view({B * T, H, V}).narrow(0, seqs.bounds[N], B * T - seqs.bounds[N]).zero_();  // tokens after the last sequence
  // float32 contiguous inputs are read in place; others a chunk at a time through float32 buffers (Rows)
  const bool direct = in_place({&q, &k, &g, &v});
  const Rows rq(q), rk(k), rg(g), rv(v), ro(o);
  const float *qp = direct ? q.data_ptr<float>() : nullptr, *kp = direct ? k.data_ptr<float>() : nullptr,
              *vp = direct ? v.data_ptr<float>() : nullptr, *gp = direct ? g.data_ptr<float>() : nullptr;
  float* op_ = direct ? o.data_ptr<float>() : nullptr;
  const float* h0p = h0.has_value() ? h0->data_ptr<float>() : nullptr;
  float *hp = ht.data_ptr<float>(), *hsp = hs.data_ptr<float>();
  if (state_rows > 0) std::fill(hsp + seqs.first_chunk[N] * H * K * V, hsp + state_rows * H * K * V, 0.f);
  const float s = static_cast<float>(scale);
  // Slices of the value columns only where sequences x heads would leave threads idle (each slice repeats its
  // chunk's gate and score work), and never narrower than 32 columns.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>((at::get_num_threads() + N * H - 1) / std::max<int64_t>(N * H, 1), V / 32));
  const int64_t width = (V + parts - 1) / parts;
  at::parallel_for(0, N * H * parts, 1, [&](int64_t begin, int64_t end) {
    const OneBlasThread one;
    Factors f(K);
    std::vector<float> A(BT * BT);
    std::vector<double> bd;
    std::vector<float> Q, Kc, G, Vc, O;  // one chunk's rows as float32 when not read in place
    if (!direct) {
      for (auto* buf : {&Q, &Kc, &G}) buf->resize(BT * K);
      Vc.resize(BT * width);
      O.resize(BT * width);
    }
    int64_t most = 0;  // chunks of the longest sequence among this thread's tasks
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nh = task / parts, n = nh / H, v0 = task % parts * width, Vp = std::min(width, V - v0);
      most = std::max(most, seqs.first_chunk[n + 1] - seqs.first_chunk[n]);
      float* S = hp + nh * K * V + v0;
      for (int64_t r = 0; r < K; ++r) {
        if (h0p != nullptr)
          std::copy(h0p + nh * K * V + r * V + v0, h0p + nh * K * V + r * V + v0 + Vp, S + r * V);
        else
          std::fill(S + r * V, S + r * V + Vp, 0.f);
      }
    }
    // Chunk-major over the tasks: a chunk's rows of neighbouring heads sit side by side in memory, so reading them
    // one after another lets the prefetchers work (one head's rows alone, 1/H of each row, ran 5x slower).
    for (int64_t ci = 0; ci < most; ++ci)
      for (int64_t task = begin; task < end; ++task) {
        const int64_t nh = task / parts, n = nh / H, h = nh % H, v0 = task % parts * width;
        const int64_t Vp = std::min(width, V - v0), t0 = seqs.bounds[n] + ci * BT;
        if (t0 >= seqs.bounds[n + 1]) continue;
        float* S = hp + nh * K * V + v0;
        const int64_t c = seqs.first_chunk[n] + ci;
        if (state_rows > 0)
          for (int64_t r = 0; r < K; ++r)
            std::copy(S + r * V, S + r * V + Vp, hsp + ((c * H + h) * K + r) * V + v0);
        const int64_t L = std::min(BT, seqs.bounds[n + 1] - t0);
        if (direct) {
          const int64_t ok = (t0 * H + h) * K, ov = (t0 * H + h) * V + v0;
          f.load(qp + ok, kp + ok, gp + ok, L, H * K, s);
          chunk(qp + ok, kp + ok, vp + ov, gp + ok, op_ + ov, S, f, Vp, H * K, H * V, V, s, A.data(), bd);
        } else {
          rq.read(t0, h, L, 0, K, Q.data(), K);
          rk.read(t0, h, L, 0, K, Kc.data(), K);
          rg.read(t0, h, L, 0, K, G.data(), K);
          rv.read(t0, h, L, v0, Vp, Vc.data(), Vp);
          f.load(Q.data(), Kc.data(), G.data(), L, K, s);
          chunk(Q.data(), Kc.data(), Vc.data(), G.data(), O.data(), S, f, Vp, K, Vp, V, s, A.data(), bd);
          ro.write(O.data(), Vp, t0, h, L, v0, Vp);
        }
      }
  });
  return {o, ht, hs};
}

}  // namespace
}  // namespace gla_cpu

TORCH_LIBRARY(gla_cpu, m) {
  m.def("chunk_forward(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, Tensor? cu_seqlens, float scale, "
        "int state_rows) -> (Tensor, Tensor, Tensor)");
  m.def("chunk_backward(Tensor q, Tensor k, Tensor v, Tensor g, Tensor do, Tensor hs, Tensor? dfinal, "
        "Tensor? cu_seqlens, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gla_cpu, CPU, m) { m.impl("chunk_forward", &gla_cpu::chunk_forward); }
