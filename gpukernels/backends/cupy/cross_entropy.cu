// Cross-entropy over the rows of a contiguous (rows, C) logit matrix.
//
// Forward: one block per row (a grid-stride loop over rows), an online
// log-sum-exp over the row (each thread over its columns, then combined across
// the block) giving the row's max m and log_sum = log sum_c exp(x[c] - m),
// saved for the backward, and the row's loss; with smoothing, a second pass for
// sum_c w[c] (x[c] - m). Backward: elementwise from those statistics, one read
// of the logits and one write of the gradient.
//
// With p = exp((x - m) - log_sum), e the smoothing, t the target, w the class
// weights (1 when absent), tw = w[t] (0 for ignored rows) and s the row's share
// of the upstream gradient:
//   loss = (1-e) tw (log_sum - (x[t] - m)) + (e/C) (sum(w) log_sum - sum_c w[c] (x[c] - m))
//   grad[c] = s ((1-e) tw (p[c] - [c == t]) + (e/C) (sum(w) p[c] - w[c]))
// (the e terms only when e > 0), in the order backends/numpy/cross_entropy.py
// computes them. A target outside [0, C) that is not ignore_index is only
// compared, never read through.
#include "_common.cu"

// exp(a - b) for a <= b, where a == b == -inf (nothing seen yet) gives 0, not nan.
template <typename A> __device__ __forceinline__ A exp_below(A a, A b) {
  return (a == b && a == gk_neg_inf<A>()) ? A(0) : gk_exp(a - b);
}

// The class weight of the target, 0 for a row not counted (ignored or out of range).
template <typename T>
__device__ __forceinline__ acc_t<T> target_weight(const T* __restrict__ weight, i64 t, bool counted) {
  return counted ? (weight ? to_acc(weight[t]) : acc_t<T>(1)) : acc_t<T>(0);
}

// weight_sum: sum(w) on the device, read only with weights and smoothing. An
// out-of-range target gives the row a nan loss and sets *bad_target.
template <typename T>
__device__ __forceinline__ void cross_entropy_fwd(const T* __restrict__ logits, const i64* __restrict__ target,
                                                  const T* __restrict__ weight, const acc_t<T>* __restrict__ weight_sum,
                                                  acc_t<T>* __restrict__ row_loss, acc_t<T>* __restrict__ row_max,
                                                  acc_t<T>* __restrict__ log_sum, int* __restrict__ bad_target,
                                                  i64 rows, i64 classes, i64 ignore_index, double smoothing) {
  typedef acc_t<T> A;
  const A neg_inf = gk_neg_inf<A>();
  const A target_coef = A(1.0 - smoothing);
  const A smooth_coef = A(smoothing / (double)classes);
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = logits + row * classes;
    A m = neg_inf, s = 0;  // this thread's running max and sum of exp(x - m)
    for (i64 c = threadIdx.x; c < classes; c += blockDim.x) {
      const A xc = to_acc(xr[c]);
      if (xc > m) {
        s = s * exp_below(m, xc) + A(1);
        m = xc;
      } else {
        s += exp_below(xc, m);
      }
    }
    const A m_i = block_max(m);
    const A log_sum_i = gk_log(block_sum(s * exp_below(m, m_i)));

    A weighted = 0;  // this thread's share of sum_c w[c] (x[c] - m)
    if (smoothing > 0) {
      for (i64 c = threadIdx.x; c < classes; c += blockDim.x)
        weighted += (to_acc(xr[c]) - m_i) * (weight ? to_acc(weight[c]) : A(1));
      weighted = block_sum(weighted);
    }
    if (threadIdx.x == 0) {
      const i64 t = target[row];
      const bool kept = t != ignore_index, counted = kept && t >= 0 && t < classes;
      A loss = 0;
      if (counted) {
        loss = target_coef * target_weight(weight, t, true) * (log_sum_i - (to_acc(xr[t]) - m_i));
        if (smoothing > 0) loss += smooth_coef * ((weight ? *weight_sum : A(classes)) * log_sum_i - weighted);
      } else if (kept) {
        loss = gk_nan<A>();
        *bad_target = 1;
      }
      row_loss[row] = loss;
      row_max[row] = m_i;
      log_sum[row] = log_sum_i;
    }
  }
}

// A block per tile of ``chunk`` columns of one row (a grid-stride loop over
// tiles), so that a few long rows fill the GPU as well as many short ones.
// scale[row * scale_stride] is the row's upstream gradient, already divided by
// the mean's denominator; weight_sum as in the forward.
template <typename T>
__device__ __forceinline__ void cross_entropy_bwd(const T* __restrict__ logits, const i64* __restrict__ target,
                                                  const T* __restrict__ weight, const acc_t<T>* __restrict__ weight_sum,
                                                  const acc_t<T>* __restrict__ row_max,
                                                  const acc_t<T>* __restrict__ log_sum,
                                                  const acc_t<T>* __restrict__ scale, i64 scale_stride,
                                                  T* __restrict__ grad, i64 rows, i64 classes, i64 chunk,
                                                  i64 ignore_index, double smoothing) {
  typedef acc_t<T> A;
  const i64 chunks = (classes + chunk - 1) / chunk;
  for (i64 tile = blockIdx.x; tile < rows * chunks; tile += gridDim.x) {
    const i64 row = tile / chunks, first = (tile - row * chunks) * chunk;
    const i64 end = first + chunk < classes ? first + chunk : classes;
    const i64 t = target[row];
    const bool counted = t != ignore_index && t >= 0 && t < classes;
    const A s = counted ? scale[row * scale_stride] : A(0);
    const A target_coef = A(1.0 - smoothing) * s * target_weight(weight, t, counted);
    const A smooth_coef = A(smoothing / (double)classes) * s;
    const A proportional_coef = smooth_coef * (weight && smoothing > 0 ? *weight_sum : A(classes));
    const A m_i = row_max[row], log_sum_i = log_sum[row];
    const T* xr = logits + row * classes;
    for (i64 c = first + threadIdx.x; c < end; c += blockDim.x) {
      const A p = gk_exp((to_acc(xr[c]) - m_i) - log_sum_i);
      A g = (c == t ? p - A(1) : p) * target_coef;
      // (e/C)(sum(w) p - w) is exactly 0 where p is one-hot (C == 1), which
      // ((1-e) tw + (e/C) sum(w)) p - ..., rounded otherwise, would not be
      if (smoothing > 0) g += p * proportional_coef - smooth_coef * (weight ? to_acc(weight[c]) : A(1));
      store(grad, row * classes + c, g);
    }
  }
}

#define GK_CROSS_ENTROPY_KERNELS(SUFFIX, T)                                                                       \
  extern "C" __global__ void cross_entropy_fwd_##SUFFIX(                                                          \
      const T* __restrict__ logits, const i64* __restrict__ target, const T* __restrict__ weight,                  \
      const acc_t<T>* __restrict__ weight_sum, acc_t<T>* __restrict__ row_loss, acc_t<T>* __restrict__ row_max,    \
      acc_t<T>* __restrict__ log_sum, int* __restrict__ bad_target, i64 rows, i64 classes, i64 ignore_index,       \
      double smoothing) {                                                                                          \
    cross_entropy_fwd<T>(logits, target, weight, weight_sum, row_loss, row_max, log_sum, bad_target, rows,         \
                         classes, ignore_index, smoothing);                                                        \
  }                                                                                                                \
  extern "C" __global__ void cross_entropy_bwd_##SUFFIX(                                                          \
      const T* __restrict__ logits, const i64* __restrict__ target, const T* __restrict__ weight,                  \
      const acc_t<T>* __restrict__ weight_sum, const acc_t<T>* __restrict__ row_max,                               \
      const acc_t<T>* __restrict__ log_sum, const acc_t<T>* __restrict__ scale, i64 scale_stride,                  \
      T* __restrict__ grad, i64 rows, i64 classes, i64 chunk, i64 ignore_index, double smoothing) {                \
    cross_entropy_bwd<T>(logits, target, weight, weight_sum, row_max, log_sum, scale, scale_stride, grad, rows,    \
                         classes, chunk, ignore_index, smoothing);                                                 \
  }
GK_FOR_EACH_DTYPE(GK_CROSS_ENTROPY_KERNELS)
