// y = x @ w.T (+ bias) on CPU, float32, summed in the order MKL's sgemm sums for the row counts where
// the caller verified it (s2ft_serve/model/gemm.py: ExactLinear probes each row count first):
//   every output element is a chain of fused multiply-adds over k, in blocks of `kc` columns of K
//   (all of K up to `block_cap`, two halves below twice that, else `block_cap`), each block's chain
//   started from zero and added to the element (set by the first block, or added to the bias).
// MKL's block is 192 with AVX2 (AMD EPYC: these bits for 4, 8 and 12 or more rows) and 384 with
// AVX-512 (Intel Xeon: at fewer row counts); found by simulating candidate orders, then checked bit
// for bit against F.linear. MKL packs its operands on every call, which can cost it more than the
// arithmetic at decode-sized row counts. Here the weight is read in place:
//   - a row-major weight [N, K] (q/k/v, gate/up, the LM head): each thread walks its weight rows in
//     groups of 12 (rows stream sequentially), against x transposed and padded to 8 (or 16) rows
//     [K, J]; the group's [12, J] result is written back transposed;
//   - a column-major weight (w.T contiguous, [K, N]: the adapted o_proj/down_proj where so stored):
//     threads split the output columns in tiles of 32; a [kc, 32] block of w.T stays in L1 for all
//     rows of x.
// The inner kernel keeps up to 12 AVX2 registers of sums (24 AVX-512 ones) and adds one product per k.
// With a patch (one adapter's columns and delta rows) the patched columns are read as w + delta, each
// sum rounded to float32: the merged weight's sums, in the same order, without a merged weight.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define S2FT_X86 1
#endif

namespace {

int64_t block_size(int64_t K, int64_t cap) { return K <= cap ? K : K < 2 * cap ? (K + 1) / 2 : cap; }

// Weight rows an inner kernel call asks the caches for while it computes (a software prefetch): at each
// k, `lines` cache lines from `p + k * step`. Row-major: the next 12-row group (48 bytes per k, one
// line); column-major: the next 32-column tile (128 bytes of each k's row, two lines).
struct Prefetch {
  const char* p = nullptr;
  int64_t step = 48;
  int lines = 1;
  Prefetch from(int64_t k0) const { return p ? Prefetch{p + k0 * step, step, lines} : Prefetch{}; }
};

#ifdef S2FT_X86
#define S2FT_AVX2 __attribute__((target("avx2,fma")))
#define S2FT_UNROLL _Pragma("GCC unroll 16")

// C[r, 8v:8v+8] (=: first, else +=) sum over k < kb, in order, of A[r, k] * B[k, 8v:8v+8]
template <int MR, int NV>
S2FT_AVX2 inline void micro(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                            int64_t kb, bool first, Prefetch pf) {
  __m256 acc[MR][NV];
  S2FT_UNROLL for (int r = 0; r < MR; ++r) S2FT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kb; ++k) {
    if (pf.p) {
      _mm_prefetch(pf.p + k * pf.step, _MM_HINT_T0);
      if (pf.lines > 1) _mm_prefetch(pf.p + k * pf.step + 64, _MM_HINT_T0);
    }
    if constexpr (MR <= NV) {  // the sums, MR broadcasts and one load fit the 16 registers
      __m256 a[MR];
      S2FT_UNROLL for (int r = 0; r < MR; ++r) a[r] = _mm256_broadcast_ss(A + r * lda + k);
      S2FT_UNROLL for (int v = 0; v < NV; ++v) {
        const __m256 b = _mm256_loadu_ps(B + k * ldb + 8 * v);
        S2FT_UNROLL for (int r = 0; r < MR; ++r) acc[r][v] = _mm256_fmadd_ps(a[r], b, acc[r][v]);
      }
    } else {  // the sums, NV loads and one broadcast
      __m256 b[NV];
      S2FT_UNROLL for (int v = 0; v < NV; ++v) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
      S2FT_UNROLL for (int r = 0; r < MR; ++r) {
        const __m256 a = _mm256_broadcast_ss(A + r * lda + k);
        S2FT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a, b[v], acc[r][v]);
      }
    }
  }
  S2FT_UNROLL for (int r = 0; r < MR; ++r) S2FT_UNROLL for (int v = 0; v < NV; ++v) {
    float* c = C + r * ldc + 8 * v;
    _mm256_storeu_ps(c, first ? acc[r][v] : _mm256_add_ps(_mm256_loadu_ps(c), acc[r][v]));
  }
}

constexpr int rows_for(int nv) { return nv == 4 ? 3 : nv == 3 ? 4 : nv == 2 ? 6 : 12; }  // 12 sums

template <int NV, int MR = rows_for(NV)>
S2FT_AVX2 void micro_rows(int mr, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                          int64_t kb, bool first, Prefetch pf) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro<MR, NV>(A, lda, B, ldb, C, ldc, kb, first, pf);
    return micro_rows<NV, MR - 1>(mr, A, lda, B, ldb, C, ldc, kb, first, pf);
  }
}

// C[i0:i1, j0:j1] (=: set, else +=) the sums over k < kb of A[i, k] * B[k, j]; j1 - j0 a multiple of 8.
S2FT_AVX2 void block(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc, int64_t kb, bool set, Prefetch pf) {
  for (int64_t j = j0; j < j1;) {
    const int nv = (int)std::min<int64_t>(4, (j1 - j) / 8);
    const int mr = rows_for(nv);
    for (int64_t i = i0; i < i1; i += mr) {
      const int m = (int)std::min<int64_t>(mr, i1 - i);
      const float* a = A + i * lda;
      const float* b = B + j;
      float* c = C + i * ldc + j;
      switch (nv) {
        case 4: micro_rows<4>(m, a, lda, b, ldb, c, ldc, kb, set, pf); break;
        case 3: micro_rows<3>(m, a, lda, b, ldb, c, ldc, kb, set, pf); break;
        case 2: micro_rows<2>(m, a, lda, b, ldb, c, ldc, kb, set, pf); break;
        default: micro_rows<1>(m, a, lda, b, ldb, c, ldc, kb, set, pf); break;
      }
      pf = {};  // once per block
    }
    j += nv * 8;
  }
}

// The same sums with 16-float AVX-512 vectors (Intel Xeon): the same chain for every output element, so
// the same bits; 32 registers hold 12 rows x 2 vectors of sums.
#define S2FT_AVX512 __attribute__((target("avx512f,avx2,fma")))

template <int MR, int NV>
S2FT_AVX512 inline void micro512(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                                 int64_t kb, bool first, Prefetch pf) {
  __m512 acc[MR][NV];
  S2FT_UNROLL for (int r = 0; r < MR; ++r) S2FT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kb; ++k) {
    if (pf.p) {
      _mm_prefetch(pf.p + k * pf.step, _MM_HINT_T0);
      if (pf.lines > 1) _mm_prefetch(pf.p + k * pf.step + 64, _MM_HINT_T0);
    }
    __m512 b[NV];
    S2FT_UNROLL for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
    S2FT_UNROLL for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      S2FT_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  S2FT_UNROLL for (int r = 0; r < MR; ++r) S2FT_UNROLL for (int v = 0; v < NV; ++v) {
    float* c = C + r * ldc + 16 * v;
    _mm512_storeu_ps(c, first ? acc[r][v] : _mm512_add_ps(_mm512_loadu_ps(c), acc[r][v]));
  }
}

template <int NV, int MR = 12>
S2FT_AVX512 void micro512_rows(int mr, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                               int64_t ldc, int64_t kb, bool first, Prefetch pf) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro512<MR, NV>(A, lda, B, ldb, C, ldc, kb, first, pf);
    return micro512_rows<NV, MR - 1>(mr, A, lda, B, ldb, C, ldc, kb, first, pf);
  }
}

// as `block`, j1 - j0 a multiple of 16
S2FT_AVX512 void block512(int64_t i0, int64_t i1, int64_t j0, int64_t j1, const float* A, int64_t lda,
                          const float* B, int64_t ldb, float* C, int64_t ldc, int64_t kb, bool set, Prefetch pf) {
  for (int64_t j = j0; j < j1;) {
    const int nv = (int)std::min<int64_t>(2, (j1 - j) / 16);
    for (int64_t i = i0; i < i1; i += 12) {
      const int m = (int)std::min<int64_t>(12, i1 - i);
      if (nv == 2) micro512_rows<2>(m, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, kb, set, pf);
      else micro512_rows<1>(m, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, kb, set, pf);
      pf = {};  // once per block
    }
    j += nv * 16;
  }
}


// either width: 16-float vectors where the CPU has them and the columns come in 16s
void any_block(bool wide, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const float* A, int64_t lda,
               const float* B, int64_t ldb, float* C, int64_t ldc, int64_t kb, bool set, Prefetch pf = {}) {
  if (wide && (j1 - j0) % 16 == 0) return block512(i0, i1, j0, j1, A, lda, B, ldb, C, ldc, kb, set, pf);
  block(i0, i1, j0, j1, A, lda, B, ldb, C, ldc, kb, set, pf);
}

// C[i0:i1, j0:j1] over all of K in blocks of block_size(K, cap). `first`: the first block sets C.
void tile(bool wide, int64_t i0, int64_t i1, int64_t j0, int64_t j1, const float* A, int64_t lda, const float* B,
          int64_t ldb, float* C, int64_t ldc, int64_t K, int64_t cap, bool first, Prefetch pf = {}) {
  const int64_t kc = block_size(K, cap);
  for (int64_t k0 = 0; k0 < K; k0 += kc)
    any_block(wide, i0, i1, j0, j1, A + k0, lda, B + k0 * ldb, ldb, C, ldc, std::min(kc, K - k0), first && k0 == 0,
              pf.from(k0));
}

bool cpu_ok() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_ok() { return false; }
#endif

at::Tensor exact_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                        int64_t block_cap, const std::optional<at::Tensor>& patch_cols,
                        const std::optional<at::Tensor>& patch_rows) {
  TORCH_CHECK(cpu_ok(), "exact_linear: needs an x86-64 CPU with AVX2 and FMA");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat, "exact_linear: CPU float32 x and w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.is_contiguous() && x.size(1) == w.size(1),
              "exact_linear: x [M, K] contiguous, w [N, K]");
  TORCH_CHECK(block_cap > 0, "exact_linear: block_cap must be positive");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const bool row_major = w.is_contiguous(), col_major = !row_major && w.t().is_contiguous();
  TORCH_CHECK(row_major || col_major, "exact_linear: w row-major or column-major");
  TORCH_CHECK(row_major || N % 8 == 0, "exact_linear: a column-major w needs a multiple of 8 rows");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == N && bias->is_contiguous(), "exact_linear: bias [N] float32");
    bp = bias->data_ptr<float>();
  }
  // the patch: w[:, cols[j]] + rows[j] (each sum rounded to float32, as `W[:, index] += delta` stores it)
  // in place of those columns, read on the fly: a merged weight's very sums, none materialised
  TORCH_CHECK(patch_cols.has_value() == patch_rows.has_value(), "exact_linear: patch_cols and patch_rows together");
  std::vector<std::pair<int64_t, int64_t>> patch;  // (column, j) sorted by column
  const float* pp = nullptr;  // the delta rows in float32, or
  const at::BFloat16* pb = nullptr;  // in bfloat16 (an adapter saved so), widened exactly as read
  if (patch_cols.has_value()) {
    const at::Tensor &pc = *patch_cols, &pr = *patch_rows;
    TORCH_CHECK(pc.device().is_cpu() && pc.scalar_type() == at::kLong && pc.dim() == 1 && pc.is_contiguous(),
                "exact_linear: patch_cols int64 [k]");
    TORCH_CHECK(pr.device().is_cpu() && (pr.scalar_type() == at::kFloat || pr.scalar_type() == at::kBFloat16) &&
                    pr.dim() == 2 && pr.is_contiguous() && pr.size(0) == pc.size(0) && pr.size(1) == N,
                "exact_linear: patch_rows float32 or bfloat16 [k, N]");
    const int64_t* cp = pc.data_ptr<int64_t>();
    std::vector<char> seen(K, 0);
    for (int64_t j = 0; j < pc.size(0); ++j) {
      TORCH_CHECK(cp[j] >= 0 && cp[j] < K && !seen[cp[j]], "exact_linear: patch column out of range or repeated");
      seen[cp[j]] = 1;
      patch.emplace_back(cp[j], j);
    }
    std::sort(patch.begin(), patch.end());
    if (pr.scalar_type() == at::kFloat)
      pp = pr.data_ptr<float>();
    else
      pb = pr.data_ptr<at::BFloat16>();
  }
  // delta row j, output n
  auto delta = [&](int64_t j, int64_t n) { return pp ? pp[j * N + n] : static_cast<float>(pb[j * N + n]); };
  at::Tensor y = at::empty({M, N}, x.options());
  if (K == 0) return bias.has_value() ? y.copy_(bias->expand({M, N})) : y.zero_();  // an empty sum
#ifdef S2FT_X86
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t kc = block_size(K, block_cap);
  const bool wide = cpu_avx512();
  if (col_major) {  // C = y [M, N], A = x [M, K], B = w.T [K, N], a [kc, 32] block of B in L1 for all rows
    if (bp) for (int64_t m = 0; m < M; ++m) std::copy(bp, bp + N, yp + m * N);
    at::parallel_for(0, (N + 31) / 32, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> patched(patch.empty() ? 0 : kc * 32);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * 32, width = std::min<int64_t>(32, N - j0);
        auto next = patch.begin();
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t kb = std::min(kc, K - k0);
          const float* b = wp + k0 * N + j0;
          int64_t ldb = N;
          if (next != patch.end() && next->first < k0 + kb) {  // this block holds patched columns
            for (int64_t k = 0; k < kb; ++k) std::copy(b + k * N, b + k * N + width, patched.data() + k * 32);
            for (; next != patch.end() && next->first < k0 + kb; ++next) {
              float* row = patched.data() + (next->first - k0) * 32;
              for (int64_t c = 0; c < width; ++c) row[c] += delta(next->second, j0 + c);
            }
            b = patched.data(), ldb = 32;
          }
          // the next block of w.T this thread computes ([kc, 32] at stride N: the hardware prefetcher
          // does not follow it), asked for while this one computes; AVX-512 only, as the row-major path's
          const int64_t nk = k0 + kc < K ? k0 + kc : 0, nt = k0 + kc < K ? t : t + 1;
          const Prefetch pf = wide && nt < t1 ? Prefetch{reinterpret_cast<const char*>(wp + nk * N + nt * 32), N * 4, 2}
                                              : Prefetch{};
          any_block(wide, 0, M, 0, width, xp + k0, K, b, ldb, yp + j0, N, kb, bp == nullptr && k0 == 0, pf);
        }
      }
    });
    return y;
  }
  // C = y.T [N, J] in groups of 12 rows, A = w [N, K], B = x.T [K, J] padded with zeros to a multiple of 8
  // (16 with AVX-512)
  const int64_t lanes = wide && M > 8 ? 16 : 8, J = (M + lanes - 1) / lanes * lanes;  // 8 rows: no padding to 16
  at::Tensor xt = at::empty({K, J}, x.options());  // written once: x's columns, then the zero padding
  float* xtp = xt.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) {
    float* row = xtp + k * J;
    for (int64_t m = 0; m < M; ++m) row[m] = xp[m * K + k];
    std::fill(row + M, row + J, 0.0f);
  }
  constexpr int64_t G = 12;
  at::parallel_for(0, (N + G - 1) / G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> scratch(G * J), patched(patch.empty() ? 0 : G * K);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * G, rows = std::min(G, N - n0);
      if (bp)
        for (int64_t r = 0; r < rows; ++r)
          std::fill(scratch.begin() + r * J, scratch.begin() + (r + 1) * J, bp[n0 + r]);
      const float* a = wp + n0 * K;
      if (!patch.empty()) {  // the group's weight rows with the patched columns
        std::copy(a, a + rows * K, patched.data());
        for (const auto& [col, j] : patch)
          for (int64_t r = 0; r < rows; ++r) patched[r * K + col] += delta(j, n0 + r);
        a = patched.data();
      }
      // The next group's 12 weight rows (one contiguous 48 K bytes: 48 bytes per k) are asked for
      // while this group computes, a software prefetch: 12 interleaved row streams leave the hardware
      // prefetcher behind, and on the Intel Xeon (AVX-512) this made the decode step's GEMMs 1.2-1.6x
      // faster (benchmarks/exact_gemm.py). Not on AVX2-only CPUs, where it was not measured.
      const Prefetch pf =
          wide && n0 + 2 * G <= N ? Prefetch{reinterpret_cast<const char*>(wp + (n0 + G) * K)} : Prefetch{};
      tile(wide, 0, rows, 0, J, a, K, xtp, J, scratch.data(), J, K, block_cap, bp == nullptr, pf);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r) yp[m * N + n0 + r] = scratch[r * J + m];
    }
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(s2ft_serve, m) {
  m.def("exact_linear(Tensor x, Tensor w, Tensor? bias, int block_cap=192, Tensor? patch_cols=None, "
        "Tensor? patch_rows=None) -> Tensor", &exact_linear);
}
