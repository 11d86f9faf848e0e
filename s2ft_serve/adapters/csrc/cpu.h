// Shared by the compiled CPU kernels (s2ft_serve/adapters/csrc/*.cpp).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// Run-time dispatch: an AVX-512 clone, an AVX2+FMA clone and a baseline clone of a function, the best
// the CPU has (the build may be copied to another machine, so no -march=native). Each kernel keeps the
// same sequence of roundings in every clone, so the clones give the same bits.
#define S2FT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define S2FT_HAS_CLONES 1
#else
#define S2FT_CLONES
#endif

// Whether this CPU runs code built for target("avx512f,avx2,fma"): 16-float vectors with fused multiply-adds.
#if defined(__x86_64__) && defined(__GNUC__)
inline bool cpu_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"); }
#else
inline bool cpu_avx512() { return false; }
#endif

// No contraction of a multiply and an add into a fused multiply-add: each product is rounded on its
// own, as PyTorch's eager ops round (for kernels that must give those ops' bits).
#define S2FT_EXACT __attribute__((optimize("fp-contract=off")))
