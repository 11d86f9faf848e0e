// A pass's new keys and values written into one layer's KV cache on CPU, in one call:
//   ck.view(-1, D)[slots[i]] = k row i,  cv.view(-1, D)[slots[i]] = v row i,
// rows i in (b, h, l) order of k and v [B, H, L, D] (any strides, unit stride along D: the rotary call's
// output, a transposed view of the v projection). What two index_copy_ calls and a copy of v do (a
// decode step's few hundred rows cost far more in dispatch than in bytes). Any dtype: rows are copied
// as bytes. Every slot is checked before anything is written.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>

namespace {

void kv_write(at::Tensor ck, at::Tensor cv, const at::Tensor& slots, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&ck, &cv, &slots, &k, &v})
    TORCH_CHECK(t->device().is_cpu(), "kv_write: CPU tensors");
  TORCH_CHECK(ck.is_contiguous() && cv.is_contiguous() && ck.sizes() == cv.sizes() && ck.dim() >= 1,
              "kv_write: contiguous caches of one shape [..., D]");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "kv_write: k and v [B, H, L, D] with unit stride along D");
  TORCH_CHECK(k.scalar_type() == ck.scalar_type() && v.scalar_type() == ck.scalar_type() &&
                  cv.scalar_type() == ck.scalar_type(), "kv_write: k, v and the caches of one dtype");
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3);
  TORCH_CHECK(ck.size(-1) == D, "kv_write: the caches' last dimension is not k's");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous() &&
                  slots.numel() == B * H * L, "kv_write: int64 slots [B * H * L]");
  for (const at::Tensor* t : {&slots, &k, &v}) {
    at::assert_no_overlap(ck, *t);  // the caches are written while these are read
    at::assert_no_overlap(cv, *t);
  }
  at::assert_no_overlap(ck, cv);
  const int64_t rows = D ? ck.numel() / D : 0;
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < rows, "kv_write: slot ", sp[i], " out of range");
  const int64_t bytes = D * static_cast<int64_t>(k.element_size());
  char* kd = static_cast<char*>(ck.data_ptr());
  char* vd = static_cast<char*>(cv.data_ptr());
  const char* ks = static_cast<const char*>(k.data_ptr());
  const char* vs = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size();
  at::parallel_for(0, B * H * L, 2048, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (H * L), h = r / L % H, l = r % L;
      std::memcpy(kd + sp[r] * bytes, ks + (b * k.stride(0) + h * k.stride(1) + l * k.stride(2)) * es, bytes);
      std::memcpy(vd + sp[r] * bytes, vs + (b * v.stride(0) + h * v.stride(1) + l * v.stride(2)) * es, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2ft_serve, m) {
  m.def("kv_write(Tensor(a!) ck, Tensor(b!) cv, Tensor slots, Tensor k, Tensor v) -> ()", &kv_write);
}
