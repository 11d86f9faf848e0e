// Rotary position embedding on CPU, float32, with transformers' very bits:
//   out = q * cos + rotate_half(q) * sin,   rotate_half(q) = cat(-q[..., D/2:], q[..., :D/2])
// each product rounded to float32 and then their sum, as the eager ops round (so never a fused
// multiply-add: this file is compiled with contraction off for these loops). One call for q and k of a
// layer instead of ~14 small tensor ops (mul, neg, cat, slices, add), which at decode sizes cost far
// more in dispatch than in arithmetic. q, k: [B, H, L, D] of any strides with unit stride along D (the
// projections' outputs, transposed); cos, sin: [B, L, D] contiguous. The outputs are contiguous.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <tuple>

#include "cpu.h"

namespace {

S2FT_EXACT void rotate_rows(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ c,
                            const float* __restrict__ s, int64_t half) {
  for (int64_t d = 0; d < half; ++d) {
    const float a = q[d] * c[d], b = -q[d + half] * s[d];
    out[d] = a + b;
  }
  for (int64_t d = half; d < 2 * half; ++d) {
    const float a = q[d] * c[d], b = q[d - half] * s[d];
    out[d] = a + b;
  }
}

at::Tensor rotate(const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  at::Tensor out = at::empty({B, H, L, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = q.stride(0), sh = q.stride(1), sl = q.stride(2);
  // rows (b, h, l); small passes (a decode step's few hundred rows) run inline, long prompts in parallel
  at::parallel_for(0, B * H * L, 1024, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * L), h = r / L % H, l = r % L;
      rotate_rows(op + r * D, qp + b * sb + h * sh + l * sl, cp + (b * L + l) * D, sp + (b * L + l) * D, D / 2);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  for (const at::Tensor* t : {&q, &k, &cos, &sin}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "rotary: CPU float32 tensors");
  }
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.stride(3) == 1 && k.stride(3) == 1,
              "rotary: q and k [B, H, L, D] with unit stride along D");
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "rotary: cos and sin [B, L, D] contiguous");
  const int64_t D = q.size(3);
  TORCH_CHECK(D % 2 == 0 && k.size(3) == D && cos.size(2) == D && q.size(0) == cos.size(0) &&
                  k.size(0) == cos.size(0) && q.size(2) == cos.size(1) && k.size(2) == cos.size(1),
              "rotary: shapes disagree");
  return {rotate(q, cos, sin), rotate(k, cos, sin)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2ft_serve, m) {
  m.def("rotary(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)", &rotary);
}
