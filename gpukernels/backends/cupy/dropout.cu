// Inverted dropout on a flat contiguous tensor. One Philox4x32-10 call serves
// eight elements: element i takes the 16-bit half i % 2 (low first) of output
// word (i % 8) / 2 of counter (i/8 lo, i/8 hi, 0, 0) under key (seed lo, seed
// hi), exactly as backends/numpy/philox.py's element_halves and the Triton
// kernel draw it, and is kept when that half is above the integer threshold
// backends/_dropout.py's keep_threshold(p) computes on the host, so the masks
// agree bit for bit across backends.
#include "_common.cu"

#define GK_PHILOX_KEY_A 0x9E3779B9u
#define GK_PHILOX_KEY_B 0xBB67AE85u
#define GK_PHILOX_ROUND_A 0xD2511F53u
#define GK_PHILOX_ROUND_B 0xCD9E8D57u

struct PhiloxWords { unsigned word[4]; };

// Philox4x32-10 on counter (counter lo, counter hi, 0, 0) (Random123's round and key schedule).
__device__ __forceinline__ PhiloxWords philox4x32(unsigned long long seed, unsigned long long counter) {
  unsigned c0 = (unsigned)counter, c1 = (unsigned)(counter >> 32), c2 = 0, c3 = 0;
  unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const unsigned long long product_b = (unsigned long long)GK_PHILOX_ROUND_B * c2;
    const unsigned long long product_a = (unsigned long long)GK_PHILOX_ROUND_A * c0;
    c0 = (unsigned)(product_b >> 32) ^ c1 ^ k0;
    c2 = (unsigned)(product_a >> 32) ^ c3 ^ k1;
    c1 = (unsigned)product_b;
    c3 = (unsigned)product_a;
    k0 += GK_PHILOX_KEY_A;
    k1 += GK_PHILOX_KEY_B;
  }
  return {{c0, c1, c2, c3}};
}

// A thread per group of eight consecutive elements (one Philox call), in a
// grid-stride loop so any n runs on a capped grid; the last group may be
// partial. The seed is read on the device: drawing one needs no host sync.
template <typename T>
__device__ __forceinline__ void dropout(const T* __restrict__ x, T* __restrict__ y, i64 n,
                                        const i64* __restrict__ seed, int threshold, acc_t<T> scale) {
  const unsigned long long key = (unsigned long long)*seed;
  const i64 groups = (n + 7) / 8, stride = (i64)gridDim.x * blockDim.x;
  for (i64 g = (i64)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const PhiloxWords bits = philox4x32(key, (unsigned long long)g);
    for (int k = 0; k < 8; ++k) {
      const i64 i = 8 * g + k;
      if (i >= n) break;
      const int half = (int)((bits.word[k / 2] >> (16 * (k % 2))) & 0xFFFFu);
      // times a zero scale, not a select of 0: a dropped inf or nan gives nan, as PyTorch's
      // x * mask * scale does (a diverging step stays visible to nan checks and loss scaling)
      store(y, i, to_acc(x[i]) * (half > threshold ? scale : acc_t<T>(0)));
    }
  }
}

#define GK_DROPOUT_KERNEL(SUFFIX, T)                                                              \
  extern "C" __global__ void dropout_##SUFFIX(const T* __restrict__ x, T* __restrict__ y, i64 n, \
                                              const i64* __restrict__ seed, int threshold,       \
                                              acc_t<T> scale) {                                   \
    dropout<T>(x, y, n, seed, threshold, scale);                                                  \
  }
GK_FOR_EACH_DTYPE(GK_DROPOUT_KERNEL)
