// The small steps between engines, elementwise. The latent/image float type is fp16 (-DSDT_HALF=1,
// stored as 16-bit words) or fp32 (-DSDT_HALF=0). Each kernel reproduces diffusers' arithmetic and
// rounding (host twins: engine/schedule.py, engine/images.py): products that torch forms in the
// model's dtype are rounded to it here too. Compiled with --fmad=false so no multiply-add is fused.
// No headers: fp16 conversions are the PTX cvt instructions (round to nearest even), so NVRTC needs
// no CUDA toolkit include path. The CPU tests compile this same file with a C++ compiler (kernels/host.py),
// host_shim.h standing in for CUDA: it defines SDT_HOST and the same conversions in C++.

#if SDT_HALF
typedef unsigned short T;
#ifdef SDT_HOST
__device__ __forceinline__ float f(T v) { return sdt_half_to_float(v); }
__device__ __forceinline__ T t(float v) { return sdt_float_to_half_rn(v); }
#else
__device__ __forceinline__ float f(T v) {
    float out;
    asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(v));
    return out;
}
__device__ __forceinline__ T t(float v) {
    T out;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out) : "f"(v));
    return out;
}
#endif
#else
typedef float T;
__device__ __forceinline__ float f(T v) { return v; }
__device__ __forceinline__ T t(float v) { return v; }
#endif

// txt2img start: x = noise * init_sigma (the product in T).
//   noise: [n] unit-variance noise, x: [n] latents, n: element count.
extern "C" __global__ void init_latents(const T* __restrict__ noise, T* __restrict__ x, float init_sigma, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = t(f(noise[i]) * f(t(init_sigma)));
}

// img2img start: x = encoded + noise * sigma0 (product, then sum, each rounded to T).
extern "C" __global__ void add_noise(const T* __restrict__ encoded, const T* __restrict__ noise, T* __restrict__ x,
                                     float sigma0, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = t(f(encoded[i]) + f(t(f(noise[i]) * f(t(sigma0)))));
}

// UNet input: out = x / sqrt(sigma^2 + 1); `denominator` is that value, computed on the host in fp32.
extern "C" __global__ void scale_input(const T* __restrict__ x, T* __restrict__ out, float denominator, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = t(f(x[i]) / f(t(denominator)));
}

// Euler step in place: x0 = x - sigma*eps (product in T), d = (x - x0) / sigma, x += d * (sigma_next - sigma).
extern "C" __global__ void euler_step(T* __restrict__ x, const T* __restrict__ eps, float sigma, float sigma_next,
                                      int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float xv = f(x[i]);
        float x0 = xv - f(t(f(t(sigma)) * f(eps[i])));
        float d = (xv - x0) / sigma;
        x[i] = t(xv + d * (sigma_next - sigma));
    }
}

// Ancestral Euler step in place (EulerAncestralDiscreteScheduler): the Euler step to sigma_down, then
// this step's unit noise times sigma_up, the product formed in T and added in fp32.
extern "C" __global__ void ancestral_step(T* __restrict__ x, const T* __restrict__ eps, const T* __restrict__ noise,
                                          float sigma, float sigma_down, float sigma_up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float xv = f(x[i]);
        float x0 = xv - f(t(f(t(sigma)) * f(eps[i])));
        float d = (xv - x0) / sigma;
        float out = xv + d * (sigma_down - sigma);
        x[i] = t(out + f(t(f(noise[i]) * f(t(sigma_up)))));
    }
}

// Casts between T and fp32, for components kept in fp32 (SDXL's VAE): numpy's astype, rounding to nearest even.
extern "C" __global__ void to_float32(const T* __restrict__ in, float* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f(in[i]);
}

extern "C" __global__ void from_float32(const float* __restrict__ in, T* __restrict__ out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = t(in[i]);
}

// Decoder output [B, 3, H, W] in [-1, 1] -> pixels [B, H, W, 3] uint8: clamp(x / 2 + 0.5, 0, 1) in T,
// then * 255 in fp32, rounded half to even (numpy's round, which diffusers uses). nonfinite[b] is set to 1
// where image b holds a NaN or an infinity (the pixels would hide it: NaN clamps to 0); it is zeroed before.
extern "C" __global__ void to_uint8(const T* __restrict__ image, unsigned char* __restrict__ pixels,
                                    unsigned char* __restrict__ nonfinite, int batch, int height, int width) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;  // one thread per output byte, in output order
    int hw = height * width, n = batch * hw * 3;
    if (i >= n) return;
    int c = i % 3, p = i / 3, b = p / hw, yx = p % hw;
    float x = f(image[(b * 3 + c) * hw + yx]);
    if (!isfinite(x)) nonfinite[b] = 1;  // every writer writes the same byte: no atomic needed
    float v = f(t(f(t(x / 2.0f)) + 0.5f));
    v = fminf(fmaxf(v, 0.0f), 1.0f);
    pixels[i] = static_cast<unsigned char>(rintf(v * 255.0f));
}
