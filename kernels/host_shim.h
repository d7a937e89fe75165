// latents.cu on the CPU (kernels/host.py): what it takes from CUDA, in plain C++17, included before it.
// - The keywords: a __global__ kernel becomes an ordinary function, called once per (block, thread) by
//   sdt_launch, which sets blockIdx / threadIdx / blockDim / gridDim as a GPU would (x only: the kernels
//   are one-dimensional).
// - fp16 <-> fp32 as the PTX cvt.f32.f16 / cvt.rn.f16.f32 instructions do: widening is exact, narrowing
//   rounds to nearest even, beyond the largest half (65520 and up) gives inf, subnormals are kept.
// - One launcher per kernel, sdt_launch_<name>(grid, block, args), taking the kernel's arguments as
//   cuLaunchKernel does: an array of pointers to each argument's value.
// Build with no fused multiply-add (-ffp-contract=off), as NVRTC builds it (--fmad=false).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstddef>
#include <type_traits>
#include <utility>

#define SDT_HOST 1
#define __global__
#define __device__
#define __forceinline__ inline

struct sdt_dim3 {
    unsigned x = 0, y = 0, z = 0;
};
static thread_local sdt_dim3 blockIdx, threadIdx, blockDim, gridDim;

static inline float sdt_half_to_float(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);  // inf, or NaN with its payload
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: exponent bias 15 -> 127
    } else {
        float v = (float)man * 0x1p-24f;  // zero or subnormal: man x 2^-24, exact in fp32
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

static inline unsigned short sdt_float_to_half_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN stays NaN
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 (and inf): inf
    if (ax < 0x38800000u) {  // below 2^-14, the smallest normal half: a multiple of 2^-24, rounded to even
        float scaled = fabsf(f) * 0x1p24f;  // exact: a power-of-two scaling
        return (unsigned short)(sign | (uint32_t)rintf(scaled));  // 1024 is the smallest normal: right too
    }
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);  // truncated to 10 mantissa bits
    uint32_t rest = ax & 0x1fffu;                                       // the 13 bits dropped
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1;        // to nearest, ties to even
    return (unsigned short)(sign | h);                                  // (a carry moves into the exponent)
}

template <typename... A, std::size_t... I>
static void sdt_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename... A>
static void sdt_launch(void (*kernel)(A...), unsigned grid, unsigned block, void** args) {
    gridDim.x = grid;
    blockDim.x = block;
    for (blockIdx.x = 0; blockIdx.x < grid; ++blockIdx.x)
        for (threadIdx.x = 0; threadIdx.x < block; ++threadIdx.x) sdt_call(kernel, args, std::index_sequence_for<A...>{});
}

#define SDT_LAUNCHER(name)                                                            \
    extern "C" void sdt_launch_##name(unsigned grid, unsigned block, void** args) { \
        sdt_launch(name, grid, block, args);                                          \
    }
