// What every kernel source shares: storage types and their conversions to the
// accumulation type, and block-wide reductions. Each op's .cu file includes it;
// _runtime.source() pastes it in, so NVRTC needs no include path and CuPy's
// cache key (the source text) covers it.
//
// bf16 and fp16 are plain 16-bit storage structs converted by hand rather than
// with <cuda_bf16.h> / <cuda_fp16.h>: NVRTC finds those headers only where a
// CUDA toolkit or the right wheel lies (CuPy no longer bundles them since CUDA
// 12.2), and the sources then need nothing but NVRTC itself.
#ifndef GK_COMMON_CU
#define GK_COMMON_CU

typedef long long i64;

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

// Bit-level primitives. tests/cupy_host.py defines GK_HOST_EMULATION and host
// versions of these to run the kernels on the CPU.
#ifndef GK_HOST_EMULATION
__device__ __forceinline__ float gk_float_from_bits(unsigned u) { return __uint_as_float(u); }
__device__ __forceinline__ unsigned gk_float_bits(float f) { return __float_as_uint(f); }
__device__ __forceinline__ double gk_double_from_bits(unsigned long long u) { return __longlong_as_double((long long)u); }
__device__ __forceinline__ float gk_half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ unsigned short gk_float_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
// A product rounded on its own, never fused into a following add (a - b*c as
// one fma keeps b*c's rounding error where the exact answer may be 0).
__device__ __forceinline__ float gk_mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double gk_mul_rn(double a, double b) { return __dmul_rn(a, b); }
#endif

// Round to nearest even, NaN to 0x7FC0: PyTorch's float -> bfloat16 rounding.
__device__ __forceinline__ unsigned short gk_float_to_bf16(float f) {
  unsigned u = gk_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The accumulation type: double for double storage, float for the others.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };
template <typename T> using acc_t = typename Acc<T>::type;

__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ float to_acc(bf16 x) { return gk_float_from_bits((unsigned)x.bits << 16); }
__device__ __forceinline__ float to_acc(f16 x) { return gk_half_to_float(x.bits); }

__device__ __forceinline__ void store(double* p, i64 i, double v) { p[i] = v; }
__device__ __forceinline__ void store(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void store(bf16* p, i64 i, float v) { p[i].bits = gk_float_to_bf16(v); }
__device__ __forceinline__ void store(f16* p, i64 i, float v) { p[i].bits = gk_float_to_half(v); }

// Math by accumulation type, through the C names NVRTC always has (no
// overloads, which would need host headers).
__device__ __forceinline__ float gk_exp(float x) { return expf(x); }
__device__ __forceinline__ double gk_exp(double x) { return exp(x); }
__device__ __forceinline__ float gk_log(float x) { return logf(x); }
__device__ __forceinline__ double gk_log(double x) { return log(x); }
__device__ __forceinline__ float gk_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double gk_sqrt(double x) { return sqrt(x); }

template <typename A> __device__ __forceinline__ A gk_neg_inf();
template <> __device__ __forceinline__ float gk_neg_inf<float>() { return gk_float_from_bits(0xff800000u); }
template <> __device__ __forceinline__ double gk_neg_inf<double>() { return gk_double_from_bits(0xfff0000000000000ull); }
template <typename A> __device__ __forceinline__ A gk_nan();
template <> __device__ __forceinline__ float gk_nan<float>() { return gk_float_from_bits(0x7fc00000u); }
template <> __device__ __forceinline__ double gk_nan<double>() { return gk_double_from_bits(0x7ff8000000000000ull); }

// Every kernel is instantiated for each storage dtype under an extern "C" name
// ending in the suffix the Python side picks (_runtime.DTYPE_SUFFIX).
#define GK_FOR_EACH_DTYPE(X) X(f64, double) X(f32, float) X(bf16, bf16) X(f16, f16)

// Launches use a power-of-two number of threads, at most this many.
#define GK_MAX_THREADS 1024

struct SumOp {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <typename A> __device__ __forceinline__ A operator()(A a, A b) const { return a > b ? a : b; }
};

// ``op`` over ``v`` of every thread of the block, returned to every thread.
// All threads of the block must call it (it synchronises).
template <typename A, typename Op> __device__ __forceinline__ A block_reduce(A v, Op op) {
  __shared__ A partial[GK_MAX_THREADS];
  const unsigned tid = threadIdx.x;
  partial[tid] = v;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (tid < half) partial[tid] = op(partial[tid], partial[tid + half]);
    __syncthreads();
  }
  const A result = partial[0];
  __syncthreads();  // before the next call overwrites partial[0]
  return result;
}

template <typename A> __device__ __forceinline__ A block_sum(A v) { return block_reduce(v, SumOp()); }
template <typename A> __device__ __forceinline__ A block_max(A v) { return block_reduce(v, MaxOp()); }

#endif  // GK_COMMON_CU
