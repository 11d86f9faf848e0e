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

// No contraction of a multiply and an add into a fused multiply-add: each product is rounded on its
// own, as PyTorch's eager ops round (for kernels that must give those ops' bits).
#define S2FT_EXACT __attribute__((optimize("fp-contract=off")))
