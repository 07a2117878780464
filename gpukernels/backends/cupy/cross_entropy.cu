// Cross-entropy over the rows of a contiguous (rows, C) logit matrix, the loss
// and the gradient of the reduced loss in one kernel. One block per row (a
// grid-stride loop over rows). Pass 1: an online log-sum-exp over the row
// (each thread over its columns, then combined across the block). Pass 2, when
// there is smoothing or a gradient to write: sum_c w[c] logp[c] and the gradient.
//
// With logp = log_softmax(x), e the smoothing, t the target, w the class
// weights (1 when absent), tw = w[t] (0 for ignored rows):
//   loss = -(1-e) tw logp[t] - (e/C) sum_c w[c] logp[c]   (the second term only when e > 0)
//   grad[c] = scale * ((1-e) tw (p[c] - [c == t]) + (e/C) (sum(w) p[c] - w[c]))
// in the order backends/numpy/cross_entropy.py computes them.
#include "_common.cu"

// exp(a - b) for a <= b, where a == b == -inf (nothing seen yet) gives 0, not nan.
template <typename A> __device__ __forceinline__ A exp_below(A a, A b) {
  return (a == b && a == gk_neg_inf<A>()) ? A(0) : gk_exp(a - b);
}

// ``stats`` holds what was reduced over all rows beforehand: [0] the mean's
// denominator sum(tw), [1] sum(w). A target outside [0, C) that is not
// ignore_index is never read: the row's loss is nan and *bad_target is set.
template <typename T>
__device__ __forceinline__ void cross_entropy(const T* __restrict__ logits, const i64* __restrict__ target,
                                              const T* __restrict__ weight, const acc_t<T>* __restrict__ stats,
                                              acc_t<T>* __restrict__ row_loss, T* __restrict__ grad,
                                              int* __restrict__ bad_target, i64 rows, i64 classes,
                                              i64 ignore_index, double smoothing, int mean_reduction) {
  typedef acc_t<T> A;
  const A neg_inf = gk_neg_inf<A>();
  const A target_coef = A(1.0 - smoothing);
  const A smooth_coef = A(smoothing / (double)classes);
  const A denominator = stats[0], weight_sum = stats[1];
  const A scale = mean_reduction ? (denominator != A(0) ? A(1) / denominator : A(0)) : A(1);
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = logits + row * classes;
    const i64 t = target[row];
    const bool kept = t != ignore_index;
    const bool in_range = t >= 0 && t < classes;
    const bool counted = kept && in_range;
    if (kept && !in_range && threadIdx.x == 0) *bad_target = 1;

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
    const A row_max = block_max(m);
    const A log_sum = gk_log(block_sum(s * exp_below(m, row_max)));

    const A tw = counted ? (weight ? to_acc(weight[t]) : A(1)) : A(0);
    const A grad_coef = target_coef * tw;
    A weighted_logp = 0;  // this thread's share of sum_c w[c] logp[c]
    if (smoothing > 0 || grad) {
      for (i64 c = threadIdx.x; c < classes; c += blockDim.x) {
        const A logp = (to_acc(xr[c]) - row_max) - log_sum;
        const A wc = weight ? to_acc(weight[c]) : A(1);
        if (smoothing > 0) weighted_logp += wc * logp;
        if (grad) {
          const A p = gk_exp(logp);
          A g = (c == t ? p - A(1) : p) * grad_coef;
          // (e/C)(sum(w) p - w) is exactly 0 where p is one-hot (C == 1), which
          // (1-e) tw p + (e/C) sum(w) p - ..., rounded otherwise, would not be
          if (smoothing > 0 && counted) g += smooth_coef * (weight_sum * p - wc);
          store(grad, row * classes + c, g * scale);
        }
      }
    }
    const A smoothed = smoothing > 0 ? block_sum(weighted_logp) : A(0);
    if (threadIdx.x == 0) {
      A loss = 0;
      if (counted) {
        loss = -target_coef * tw * ((to_acc(xr[t]) - row_max) - log_sum);
        if (smoothing > 0) loss -= smooth_coef * smoothed;
      } else if (kept) {
        loss = gk_nan<A>();  // an out-of-range target
      }
      row_loss[row] = loss;
    }
  }
}

#define GK_CROSS_ENTROPY_KERNEL(SUFFIX, T)                                                            \
  extern "C" __global__ void cross_entropy_##SUFFIX(                                                  \
      const T* __restrict__ logits, const i64* __restrict__ target, const T* __restrict__ weight,      \
      const acc_t<T>* __restrict__ stats, acc_t<T>* __restrict__ row_loss, T* __restrict__ grad,       \
      int* __restrict__ bad_target, i64 rows, i64 classes, i64 ignore_index, double smoothing,        \
      int mean_reduction) {                                                                           \
    cross_entropy<T>(logits, target, weight, stats, row_loss, grad, bad_target, rows, classes,        \
                     ignore_index, smoothing, mean_reduction);                                        \
  }
GK_FOR_EACH_DTYPE(GK_CROSS_ENTROPY_KERNEL)
