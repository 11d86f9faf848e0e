// The mixed-adapter S²FT correction on CPU, float32: for every token t and each slot s it carries,
//   y[t] += sum_j x[t, cols[s, j]] * table[(s - 1) * k_cap + j]      (j < k[s]; slot 0 is no slot)
// `table` holds each slot's delta.T rows as one contiguous block, so a token streams its adapter's
// block once, row by row, into an output row that stays in L1. One call per adapted module and step,
// no index tensors built per call; tokens are split across torch's threads. Built on first use by
// s2ft_serve/adapters/native.py (torch.utils.cpp_extension); the Python fallback is embedding_bag.
// The table may be bfloat16 (adapters whose deltas are bfloat16 values, see layers.py): each value is
// widened to float32 exactly and the sums are the float32 table's, bit for bit, from half the bytes.
// A bfloat16 model (bfloat16 y, x and table) sums each token's correction in float32 and adds it to y
// rounded once.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu.h"

#ifdef S2FT_HAS_CLONES
#include <immintrin.h>
#endif

namespace {

// S2FT_CLONES (cpu.h): each output is one chain of the same FMAs in every clone, so they give the same bits.

inline float widen(float v) { return v; }
inline float widen(uint16_t v) {  // bfloat16 -> float32, exact: its bits are a float32's upper half
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// y[0:out] += sum_j x[cols[j]] * block[j * out : (j + 1) * out], eight rows per pass over y.
// AHEAD > 0: each pass also asks for the block's rows AHEAD further on (a software prefetch into the
// caches), which the hardware prefetcher, restarting on every token's block, leaves late: with
// bfloat16 rows that made the read 1.2-1.25x faster on an AVX-512 Xeon; with float32 it slows it.
// (Where the AVX-512 form below serves, bfloat16 rows go there.)
template <typename T, int AHEAD>
inline __attribute__((always_inline)) void add_rows(float* __restrict__ y, const float* __restrict__ x,
                                                    const T* __restrict__ block, const int64_t* __restrict__ cols,
                                                    int64_t k, int64_t out) {
  constexpr int U = 8;
  int64_t j = 0;
  for (; j + U <= k; j += U) {
    float w[U];
    const T* a[U];
    for (int u = 0; u < U; ++u) {
      w[u] = x[cols[j + u]];
      a[u] = block + (j + u) * out;
    }
    if (AHEAD > 0 && j + AHEAD < k) {
      const char* p = reinterpret_cast<const char*>(block + (j + AHEAD) * out);
      const char* end = reinterpret_cast<const char*>(block + std::min<int64_t>(j + AHEAD + U, k) * out);
      for (; p < end; p += 64) __builtin_prefetch(p, 0, 3);
    }
#pragma omp simd
    for (int64_t o = 0; o < out; ++o) {
      float acc = y[o];
      for (int u = 0; u < U; ++u) acc += w[u] * widen(a[u][o]);
      y[o] = acc;
    }
  }
  for (; j < k; ++j) {
    const float w = x[cols[j]];
    const T* a = block + j * out;
#pragma omp simd
    for (int64_t o = 0; o < out; ++o) y[o] += w * widen(a[o]);
  }
}

// one compiled clone per CPU level (templates cannot carry target_clones themselves)
S2FT_CLONES void add_rows_f32(float* y, const float* x, const float* block, const int64_t* cols, int64_t k,
                              int64_t out) {
  add_rows<float, 0>(y, x, block, cols, k, out);
}
S2FT_CLONES void add_rows_bf16(float* y, const float* x, const uint16_t* block, const int64_t* cols, int64_t k,
                               int64_t out) {
  add_rows<uint16_t, 16>(y, x, block, cols, k, out);
}

// The block a thread reads after the current one (its next token's slot). The AVX-512 read below asks
// for rows ahead of use across the end of a block into this one, so the stream does not restart at
// every token.
struct Next {
  const uint16_t* p = nullptr;
  int64_t bytes = 0;
};

#ifdef S2FT_HAS_CLONES
// add_rows_bf16 with 16-float AVX-512 vectors, where the CPU has them and out comes in 16s. The same
// chain for every output element: y[o] = fma(x[cols[j]], widen(block[j, o]), y[o]) in j order, so the
// same bits as the clones (whose float32 and bfloat16 forms contract `acc += w * v` into that FMA);
// only where the clones are built: a build without them (clang, other systems) runs plain x86-64 code
// for float32 tables, which rounds each product, and the two tables' bits would differ.
// Four rows per pass, and each pass asks for the rows 4 KB further on into L2, running on into the
// next block, so a thread's blocks are one stream. On a 2-core AMD EPYC VM the 32 adapters' 115 MB
// took 4.1-4.8 ms alone (1.4x a plain read of the bytes); add_rows_bf16 took 6.9 ms (1.7x)
// (benchmarks/adapter_kernel.py). In the step, asking into L2 or L1, 2 or 4 KB ahead, with two or
// four rows a pass, came within 1 ms of each other; eight rows, or 8 KB ahead into L1, were slower.
// Float32 tables gained nothing from the same code (bound by the bytes), so they keep add_rows_f32.
#define S2FT_AVX512 __attribute__((target("avx512f,avx2,fma")))

S2FT_AVX512 inline __m512 widen16(const uint16_t* p) {  // 16 bfloat16 -> float32, exact
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

S2FT_AVX512 void add_rows_bf16_avx512(float* __restrict__ y, const float* __restrict__ x,
                                      const uint16_t* __restrict__ block, const int64_t* __restrict__ cols, int64_t k,
                                      int64_t out, Next next) {
  constexpr int U = 4;
  constexpr int64_t AHEAD = 4096;
  const char* here = reinterpret_cast<const char*>(block);
  const int64_t row_bytes = out * 2, bytes = k * row_bytes;
  auto ask = [&](int64_t from, int64_t to) {  // block bytes [from, to), continued by the next block's
    for (int64_t p = from; p < to; p += 64) {
      if (p < bytes)
        _mm_prefetch(here + p, _MM_HINT_T1);
      else if (p - bytes < next.bytes)
        _mm_prefetch(reinterpret_cast<const char*>(next.p) + (p - bytes), _MM_HINT_T1);
    }
  };
  int64_t j = 0;
  for (; j + U <= k; j += U) {
    __m512 w[U];
    const uint16_t* a[U];
    for (int u = 0; u < U; ++u) {
      w[u] = _mm512_set1_ps(x[cols[j + u]]);
      a[u] = block + (j + u) * out;
    }
    ask(j * row_bytes + AHEAD, (j + U) * row_bytes + AHEAD);
    for (int64_t o = 0; o < out; o += 16) {
      __m512 acc = _mm512_loadu_ps(y + o);
      for (int u = 0; u < U; ++u) acc = _mm512_fmadd_ps(w[u], widen16(a[u] + o), acc);
      _mm512_storeu_ps(y + o, acc);
    }
  }
  for (; j < k; ++j) {
    const __m512 w = _mm512_set1_ps(x[cols[j]]);
    const uint16_t* a = block + j * out;
    ask(j * row_bytes + AHEAD, (j + 1) * row_bytes + AHEAD);
    for (int64_t o = 0; o < out; o += 16)
      _mm512_storeu_ps(y + o, _mm512_fmadd_ps(w, widen16(a + o), _mm512_loadu_ps(y + o)));
  }
}

#else
void add_rows_bf16_avx512(float*, const float*, const uint16_t*, const int64_t*, int64_t, int64_t, Next) {}
#endif

void slot_delta_add(at::Tensor y, const at::Tensor& x, const at::Tensor& table, const at::Tensor& token_slots,
                    const at::Tensor& slot_k, const at::Tensor& cols) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&y, &x, &table, &token_slots, &slot_k, &cols}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "slot_delta_add: CPU contiguous tensors only");
  }
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &table, &token_slots, &slot_k, &cols}) {
    at::assert_no_overlap(y, *t);  // y is written while the others are read (and were checked)
  }
  // it writes through raw pointers, unseen by autograd: inference only (the layer falls back otherwise)
  TORCH_CHECK(!at::GradMode::is_enabled() || !(y.requires_grad() || x.requires_grad() || table.requires_grad()),
              "slot_delta_add: no autograd; call it under torch.inference_mode or torch.no_grad");
  const bool half = y.scalar_type() == at::kBFloat16;  // a bfloat16 model: its y, x and table
  TORCH_CHECK((y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat &&
               (table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16)) ||
                  (half && x.scalar_type() == at::kBFloat16 && table.scalar_type() == at::kBFloat16),
              "slot_delta_add: float32 y and x with a float32 or bfloat16 table, or bfloat16 y, x and table");
  TORCH_CHECK(token_slots.scalar_type() == at::kLong && slot_k.scalar_type() == at::kLong &&
                  cols.scalar_type() == at::kLong, "slot_delta_add: int64 token_slots, slot_k and cols");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && table.dim() == 2 && token_slots.dim() == 2 && slot_k.dim() == 1 &&
                  cols.dim() == 2, "slot_delta_add: bad ranks");
  const int64_t T = x.size(0), in = x.size(1), out = table.size(1), m = token_slots.size(1);
  const int64_t n_slots = slot_k.size(0), k_cap = cols.size(1);
  TORCH_CHECK(y.size(0) == T && y.size(1) == out && token_slots.size(0) == T && cols.size(0) == n_slots &&
                  table.size(0) >= (n_slots - 1) * k_cap, "slot_delta_add: shapes disagree");
  const int64_t* sp = token_slots.data_ptr<int64_t>();
  const int64_t* kp = slot_k.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();
  // every index is checked before any write: a bad one raises and leaves y as it was; each slot once,
  // however many tokens carry it (a prompt's tokens in a rows pass)
  std::vector<char> checked(n_slots, 0);
  for (int64_t i = 0; i < T * m; ++i) {
    const int64_t s = sp[i];
    TORCH_CHECK(s >= 0 && s < n_slots, "slot_delta_add: slot ", s, " out of range");
    if (checked[s]) continue;
    checked[s] = 1;
    TORCH_CHECK(kp[s] >= 0 && kp[s] <= k_cap && (s > 0 || kp[s] == 0), "slot_delta_add: bad k for slot ", s);
    for (int64_t j = 0; j < kp[s]; ++j) {
      TORCH_CHECK(cp[s * k_cap + j] >= 0 && cp[s * k_cap + j] < in, "slot_delta_add: column out of range");
    }
  }
  const bool wide = table.scalar_type() == at::kFloat;
  const uint16_t* hp = wide ? nullptr : reinterpret_cast<const uint16_t*>(table.data_ptr<at::BFloat16>());
#ifdef S2FT_HAS_CLONES
  const bool vec512 = !wide && out % 16 == 0 && cpu_avx512();
#else
  constexpr bool vec512 = false;
#endif
  // y_row += the bfloat16 rows of slot s at x_row; `q` is (token, slot) q = t * m + i, `end` ends the
  // thread's tokens: the next of its blocks is found for the AVX-512 read's look-ahead
  auto bf16_rows = [&](float* y_row, const float* x_row, int64_t s, int64_t q, int64_t end) {
    const uint16_t* block = hp + (s - 1) * k_cap * out;
    if (!vec512) return add_rows_bf16(y_row, x_row, block, cp + s * k_cap, kp[s], out);
    Next next;
    for (int64_t r = q + 1; r < end * m; ++r) {
      const int64_t n = sp[r];
      if (n != 0 && kp[n] != 0) {
        next = {hp + (n - 1) * k_cap * out, kp[n] * out * 2};
        break;
      }
    }
    add_rows_bf16_avx512(y_row, x_row, block, cp + s * k_cap, kp[s], out, next);
  };
  if (half) {  // each token's correction summed in float32 (x widened), then added to y, rounded once
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xrow(in), acc(out);
      for (int64_t t = begin; t < end; ++t) {
        bool any = false;
        for (int64_t i = 0; i < m; ++i) {
          const int64_t s = sp[t * m + i];
          if (s == 0 || kp[s] == 0) continue;
          if (!any) {
            for (int64_t c = 0; c < in; ++c) xrow[c] = static_cast<float>(xp[t * in + c]);
            std::fill(acc.begin(), acc.end(), 0.0f);
            any = true;
          }
          bf16_rows(acc.data(), xrow.data(), s, t * m + i, end);
        }
        if (any)
          for (int64_t o = 0; o < out; ++o)
            yp[t * out + o] = static_cast<at::BFloat16>(static_cast<float>(yp[t * out + o]) + acc[o]);
      }
    });
    return;
  }
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* tp = wide ? table.data_ptr<float>() : nullptr;
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t s = sp[t * m + i];
        if (s == 0 || kp[s] == 0) continue;
        if (wide)
          add_rows_f32(yp + t * out, xp + t * in, tp + (s - 1) * k_cap * out, cp + s * k_cap, kp[s], out);
        else
          bf16_rows(yp + t * out, xp + t * in, s, t * m + i, end);
      }
    }
  });
}

// Fusion's column edits on a row-major W [N, K] (where W is not stored column-major, see layers.py),
// row by row: each row is visited once and only its k entries are touched, where index_add_/index_copy_
// along dim 1 walk one strided column at a time. Every index is checked before any write.
//   columns_add(W, index, delta [N, k]) -> W[:, index] before; W[:, index] += delta (rounded as index_add_)
//   columns_set(W, index, values [N, k]): W[:, index] = values
void check_columns(const at::Tensor& w, const at::Tensor& index, const at::Tensor& values) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 2, "columns: a row-major CPU W [N, K]");
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kLong && index.dim() == 1 && index.is_contiguous(),
              "columns: int64 index [k]");
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == w.scalar_type() && values.is_contiguous() &&
                  values.dim() == 2 && values.size(0) == w.size(0) && values.size(1) == index.size(0),
              "columns: values [N, k] of W's dtype");
  at::assert_no_overlap(w, values);
  const int64_t* ip = index.data_ptr<int64_t>();
  for (int64_t j = 0; j < index.size(0); ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < w.size(1), "columns: column ", ip[j], " out of range");
}

at::Tensor columns_add(at::Tensor w, const at::Tensor& index, const at::Tensor& delta) {
  check_columns(w, index, delta);
  at::Tensor saved = at::empty_like(delta);
  const int64_t N = w.size(0), K = w.size(1), k = index.size(0);
  const int64_t* ip = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "columns_add", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* dp = delta.data_ptr<scalar_t>();
    scalar_t* sp = saved.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* row = wp + n * K;
        for (int64_t j = 0; j < k; ++j) {
          sp[n * k + j] = row[ip[j]];
          row[ip[j]] = static_cast<scalar_t>(static_cast<acc_t>(row[ip[j]]) + static_cast<acc_t>(dp[n * k + j]));
        }
      }
    });
  });
  return saved;
}

void columns_set(at::Tensor w, const at::Tensor& index, const at::Tensor& values) {
  check_columns(w, index, values);
  const int64_t N = w.size(0), K = w.size(1), k = index.size(0);
  const int64_t* ip = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "columns_set", [&] {
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* vp = values.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t j = 0; j < k; ++j) wp[n * K + ip[j]] = vp[n * k + j];
    });
  });
}

}  // namespace

TORCH_LIBRARY(s2ft_serve, m) {
  m.def("slot_delta_add(Tensor(a!) y, Tensor x, Tensor table, Tensor token_slots, Tensor slot_k, Tensor cols) -> ()",
        &slot_delta_add);
  m.def("columns_add(Tensor(a!) w, Tensor index, Tensor delta) -> Tensor", &columns_add);
  m.def("columns_set(Tensor(a!) w, Tensor index, Tensor values) -> ()", &columns_set);
}
