// A residual add and the Llama RMSNorm after it on CPU, float32, with transformers' very bits:
//   h = h + delta                                                (when delta is given)
//   out = weight * (h * rsqrt(mean(h * h, -1) + eps))
// rounded as LlamaRMSNorm's eager ops round: h * h, its row mean (the sum in ATen's own order, then
// / H), + eps rounded to float32, 1 / sqrt (rsqrt's float32 result), h * that, weight * that; no fused
// multiply-add (contraction off for these loops). The caller says how to sum (`lanes`, found by a
// probe): 8, ATen's order for vectors of 8 lanes, which torch 2.13 uses on x86 under every CPU
// capability (DEFAULT, AVX2 and AVX512 give the same sums), or 0: ATen's `mean` called from here. One call where the eager form takes ~7 small tensor ops (add, pow, mean, add,
// rsqrt, mul, mul), which at decode sizes cost far more in dispatch than in arithmetic.
// h, delta: [..., H] contiguous; weight [H]. Returns (h + delta, or h itself; out).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mean.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu.h"

namespace {

// sum = h + d and sq = sum * sum where d is given; else sq = h * h (sum untouched)
S2FT_CLONES S2FT_EXACT void add_square(float* __restrict__ sum, float* __restrict__ sq, const float* __restrict__ h,
                                       const float* __restrict__ d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = d ? h[i] + d[i] : h[i];
    if (d) sum[i] = v;
    sq[i] = v * v;
  }
}

// ATen's float32 sum of one contiguous row of n values as its vectorized inner reduction orders it, with
// vectors of `V` lanes (8; 1 for rows shorter than a vector): the row as n / V vectors,
// read as a [-1, 4] array whose 4 columns are summed apart (a cascade of levels of 2^p vectors each,
// p = max(4, ceil(log2(count)) / 4)) and then together; the leftover vectors added to the first
// column; then the values past the last whole vector, then each lane in turn, from zero.
int ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int bit = 63;
  while (!((static_cast<uint64_t>(x - 1) >> bit) & 1)) --bit;
  return bit + 1;
}

template <int V>
inline __attribute__((always_inline)) float aten_row_sum(const float* x, int64_t n) {
  constexpr int ILP = 4, LEVELS = 4;
  const int64_t vectors = n / V, size = vectors / ILP;
  float acc[LEVELS][ILP][V] = {};
  auto add_vector = [&](float* to, int64_t v) {
    for (int l = 0; l < V; ++l) to[l] += x[v * V + l];
  };
  const int power = std::max(4, ceil_log2(size) / LEVELS);
  const int64_t step = int64_t(1) << power, mask = step - 1;
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < ILP; ++k) add_vector(acc[0][k], i * ILP + k);
    for (int j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < ILP; ++k)
        for (int l = 0; l < V; ++l) acc[j][k][l] += acc[j - 1][k][l], acc[j - 1][k][l] = 0.0f;
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < ILP; ++k) add_vector(acc[0][k], i * ILP + k);
  for (int j = 1; j < LEVELS; ++j)
    for (int k = 0; k < ILP; ++k)
      for (int l = 0; l < V; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = size * ILP; v < vectors; ++v) add_vector(acc[0][0], v);
  for (int k = 1; k < ILP; ++k)
    for (int l = 0; l < V; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t e = vectors * V; e < n; ++e) total += x[e];
  for (int l = 0; l < V; ++l) total += acc[0][0][l];
  return total;
}

S2FT_CLONES S2FT_EXACT float aten_row_sum8(const float* x, int64_t n) {
  return n < 8 ? aten_row_sum<1>(x, n) : aten_row_sum<8>(x, n);  // ATen sums fewer values unvectorized
}

// out[r] = w * (h[r] * (1 / sqrt(var[r] + eps))), each product rounded (the eager ops' roundings)
S2FT_CLONES S2FT_EXACT void scale_row(float* __restrict__ out, const float* __restrict__ h,
                                      const float* __restrict__ w, float var, float eps, int64_t H) {
  const float s = 1.0f / std::sqrt(var + eps);
  for (int64_t j = 0; j < H; ++j) {
    const float t = h[j] * s;
    out[j] = w[j] * t;
  }
}

// lanes 0: the mean from ATen's `mean` (any CPU); 8: summed here in ATen's order for vectors of 8 lanes
// (the caller checked that it gives ATen's bits), without a call back into ATen
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const std::optional<at::Tensor>& delta,
                                                const at::Tensor& weight, double eps, int64_t lanes) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() && h.dim() >= 1,
              "add_rms_norm: h CPU float32 contiguous [..., H]");
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == h.size(-1), "add_rms_norm: weight float32 [H]");
  if (delta.has_value())
    TORCH_CHECK(delta->device().is_cpu() && delta->scalar_type() == at::kFloat && delta->is_contiguous() &&
                    delta->sizes() == h.sizes(), "add_rms_norm: delta shaped as h, CPU float32 contiguous");
  TORCH_CHECK(lanes == 0 || lanes == 8, "add_rms_norm: lanes 0 or 8");
  const int64_t H = h.size(-1), rows = H ? h.numel() / H : 0;
  at::Tensor sum = delta.has_value() ? at::empty_like(h) : h;
  at::Tensor out = at::empty_like(h);
  const float* hp = h.data_ptr<float>();
  const float* dp = delta.has_value() ? delta->data_ptr<float>() : nullptr;
  float* up = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);  // `variance + eps` adds eps rounded to float32
  const float count = static_cast<float>(H);  // mean = sum / H
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(H, 1));
  if (lanes == 0) {
    at::Tensor sq = at::empty_like(h);
    float* qp = sq.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      add_square(up + r0 * H, qp + r0 * H, hp + r0 * H, dp ? dp + r0 * H : nullptr, (r1 - r0) * H);
    });
    const at::Tensor var = at::mean(sq, {-1}, /*keepdim=*/true).contiguous();
    const float* vp = var.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) scale_row(op + r * H, up + r * H, wp, vp[r], e, H);
    });
    return {sum, out};
  }
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> sq(H);  // one row's squares at a time
    for (int64_t r = r0; r < r1; ++r) {
      add_square(up + r * H, sq.data(), hp + r * H, dp ? dp + r * H : nullptr, H);
      const float total = aten_row_sum8(sq.data(), H);
      scale_row(op + r * H, up + r * H, wp, total / count, e, H);
    }
  });
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2ft_serve, m) {
  m.def("add_rms_norm(Tensor h, Tensor? delta, Tensor weight, float eps, int lanes=0) -> (Tensor, Tensor)",
        &add_rms_norm);
}
