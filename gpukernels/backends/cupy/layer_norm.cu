// LayerNorm over the rows of a contiguous (rows, D) matrix. One block per row
// (a grid-stride loop over rows, so any row count fits the grid); each thread
// takes the columns tid, tid + blockDim.x, ... The weight and bias come in the
// accumulation type (the Python side converts them), the statistics go out in it.
#include "_common.cu"

// Forward, two-pass for accuracy (mean, then the centred sum of squares), then
// the normalised row; mean and rstd saved per row for the backward.
template <typename T>
__device__ __forceinline__ void layer_norm_fwd(const T* __restrict__ x, const acc_t<T>* __restrict__ weight,
                                               const acc_t<T>* __restrict__ bias, T* __restrict__ y,
                                               acc_t<T>* __restrict__ mean_out, acc_t<T>* __restrict__ rstd_out,
                                               i64 rows, i64 d, acc_t<T> eps) {
  typedef acc_t<T> A;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * d;
    A total = 0;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) total += to_acc(xr[c]);
    const A mean = block_sum(total) / (A)d;
    A squares = 0;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
      const A centred = to_acc(xr[c]) - mean;
      squares += centred * centred;
    }
    const A rstd = A(1) / gk_sqrt(block_sum(squares) / (A)d + eps);
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
      A out = (to_acc(xr[c]) - mean) * rstd;
      if (weight) out *= weight[c];
      if (bias) out += bias[c];
      store(y, row * d + c, out);
    }
    if (threadIdx.x == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

// Backward: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight.
// A persistent grid: block b takes rows b, b + gridDim.x, ... and adds its rows'
// dy * xhat and dy into row b of the (gridDim.x, D) partial buffers (zeroed by
// the caller, summed over blocks afterwards). Column c of a partial row is
// only ever touched by thread c % blockDim.x of its block: no atomics.
template <typename T>
__device__ __forceinline__ void layer_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                               const acc_t<T>* __restrict__ weight,
                                               const acc_t<T>* __restrict__ mean_in,
                                               const acc_t<T>* __restrict__ rstd_in, T* __restrict__ dx,
                                               acc_t<T>* __restrict__ dweight_partial,
                                               acc_t<T>* __restrict__ dbias_partial, i64 rows, i64 d) {
  typedef acc_t<T> A;
  A* dw = dweight_partial ? dweight_partial + (i64)blockIdx.x * d : 0;
  A* db = dbias_partial ? dbias_partial + (i64)blockIdx.x * d : 0;
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const i64 base = row * d;
    const A mean = mean_in[row], rstd = rstd_in[row];
    A sum_g = 0, sum_gx = 0;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
      const A xhat = (to_acc(x[base + c]) - mean) * rstd;
      const A g = weight ? gk_mul_rn(to_acc(dy[base + c]), weight[c]) : to_acc(dy[base + c]);
      sum_g += g;
      sum_gx += g * xhat;
    }
    const A mean_g = block_sum(sum_g) / (A)d;
    const A mean_gx = block_sum(sum_gx) / (A)d;
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
      const A dyc = to_acc(dy[base + c]);
      const A xhat = (to_acc(x[base + c]) - mean) * rstd;
      // rounded apart, as in the first loop: g - mean_g is then exactly 0 for D == 1
      const A g = weight ? gk_mul_rn(dyc, weight[c]) : dyc;
      store(dx, base + c, rstd * (g - mean_g - xhat * mean_gx));
      if (dw) dw[c] += dyc * xhat;
      if (db) db[c] += dyc;
    }
  }
}

#define GK_LAYER_NORM_KERNELS(SUFFIX, T)                                                            \
  extern "C" __global__ void layer_norm_fwd_##SUFFIX(                                               \
      const T* __restrict__ x, const acc_t<T>* __restrict__ weight, const acc_t<T>* __restrict__ bias, \
      T* __restrict__ y, acc_t<T>* __restrict__ mean, acc_t<T>* __restrict__ rstd, i64 rows, i64 d,   \
      acc_t<T> eps) {                                                                               \
    layer_norm_fwd<T>(x, weight, bias, y, mean, rstd, rows, d, eps);                                \
  }                                                                                                 \
  extern "C" __global__ void layer_norm_bwd_##SUFFIX(                                               \
      const T* __restrict__ dy, const T* __restrict__ x, const acc_t<T>* __restrict__ weight,          \
      const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd, T* __restrict__ dx,        \
      acc_t<T>* __restrict__ dweight_partial, acc_t<T>* __restrict__ dbias_partial, i64 rows, i64 d) { \
    layer_norm_bwd<T>(dy, x, weight, mean, rstd, dx, dweight_partial, dbias_partial, rows, d);       \
  }
GK_FOR_EACH_DTYPE(GK_LAYER_NORM_KERNELS)
