// Cross-entropy over the rows of a (rows, C) logit matrix (each row contiguous,
// row_stride elements after the last; the gradient contiguous), with
// class-index targets (target, one per row) or class-probability targets
// (probs, the logits' shape; then target is null).
//
// Forward: one block per row (a grid-stride loop over rows), an online
// log-sum-exp over the row (each thread over its columns, then combined across
// the block) giving the row's max m and log_sum = log sum_c exp(x[c] - m),
// saved for the backward, and the row's loss; with smoothing or probabilities,
// a second pass for mass = sum_c q[c] and sum_c q[c] (x[c] - m), q the target
// weights below. Then one block sums the rows' losses in a fixed order (the
// reduced loss, deterministic) and checks the targets. Backward: elementwise
// from the statistics, one read of the logits and one write of the gradient.
//
// With p = exp((x - m) - log_sum), e the smoothing, w the class weights (1 when
// absent) and s the row's share of the upstream gradient (over the mean's
// denominator for mean):
// class indices t, tw = w[t] (0 for ignored rows), q = w:
//   loss = (1-e) tw (log_sum - (x[t] - m)) + (e/C) (sum(w) log_sum - sum_c w[c] (x[c] - m))
//   grad[c] = s ((1-e) tw (p[c] - [c == t]) + (e/C) (sum(w) p[c] - w[c]))
// (the e terms only when e > 0), in the order backends/numpy/cross_entropy.py
// computes them; a target outside [0, C) that is not ignore_index is only
// compared, never read through.
// probabilities y, q = w ((1-e) y + e/C):
//   loss = mass log_sum - sum_c q[c] (x[c] - m)
//   grad[c] = s (mass p[c] - q[c]),  d loss / d y[c] = -s (1-e) w[c] ((x[c] - m) - log_sum)
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

// q[c] of the row: w[c] for class indices, w[c] ((1-e) y[c] + e/C) for probabilities y.
template <typename T>
__device__ __forceinline__ acc_t<T> target_coef(const T* __restrict__ weight, const T* __restrict__ probs_row, i64 c,
                                                i64 classes, double smoothing) {
  typedef acc_t<T> A;
  const A w = weight ? to_acc(weight[c]) : A(1);
  if (!probs_row) return w;
  const A y = to_acc(probs_row[c]);
  return smoothing > 0 ? w * (A(1.0 - smoothing) * y + A(smoothing / (double)classes)) : w * y;
}

// Each row's loss into row_loss (nan for a class index out of range), its
// statistics, and for probabilities its mass.
template <typename T>
__device__ __forceinline__ void cross_entropy_fwd(const T* __restrict__ logits, const i64* __restrict__ target,
                                                  const T* __restrict__ probs, const T* __restrict__ weight,
                                                  acc_t<T>* __restrict__ row_loss, acc_t<T>* __restrict__ row_max,
                                                  acc_t<T>* __restrict__ log_sum, acc_t<T>* __restrict__ target_mass,
                                                  i64 rows, i64 classes, i64 row_stride, i64 ignore_index,
                                                  double smoothing) {
  typedef acc_t<T> A;
  const A neg_inf = gk_neg_inf<A>();
  for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = logits + row * row_stride;
    const T* yr = probs ? probs + row * classes : 0;
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

    A weighted = 0, mass = 0;  // this thread's share of sum_c q[c] (x[c] - m) and of sum_c q[c]
    if (smoothing > 0 || probs) {
      for (i64 c = threadIdx.x; c < classes; c += blockDim.x) {
        const A q = target_coef(weight, yr, c, classes, smoothing);
        weighted += (to_acc(xr[c]) - m_i) * q;
        mass += q;
      }
      weighted = block_sum(weighted);
      mass = block_sum(mass);
    }
    if (threadIdx.x == 0) {
      A loss = 0;
      if (probs) {
        loss = mass * log_sum_i - weighted;
        target_mass[row] = mass;
      } else {
        const i64 t = target[row];
        const bool kept = t != ignore_index, counted = kept && t >= 0 && t < classes;
        if (counted) {
          loss = A(1.0 - smoothing) * target_weight(weight, t, true) * (log_sum_i - (to_acc(xr[t]) - m_i));
          if (smoothing > 0) loss += A(smoothing / (double)classes) * (mass * log_sum_i - weighted);
        } else if (kept) {
          loss = gk_nan<A>();
        }
      }
      row_loss[row] = loss;
      row_max[row] = m_i;
      log_sum[row] = log_sum_i;
    }
  }
}

// One block. reduction: 0 none (the rows' losses are the loss: nothing here), 1
// sum, 2 mean (over the kept rows' target weights; over the rows for
// probabilities) into *reduced, in the accumulator's type (the host rounds it
// once to the loss's dtype). For class indices (probabilities == 0; a flag, as
// an empty tensor's address is null) also totals = {that denominator, sum(w) (C
// without weights)} and *ok = whether every target is ignore_index or in [0, C).
template <typename T>
__device__ __forceinline__ void cross_entropy_total(const acc_t<T>* __restrict__ row_loss,
                                                    const i64* __restrict__ target, const T* __restrict__ weight,
                                                    acc_t<T>* __restrict__ reduced, acc_t<T>* __restrict__ totals,
                                                    bool* __restrict__ ok, i64 rows, i64 classes, i64 ignore_index,
                                                    i64 reduction, i64 probabilities) {
  typedef acc_t<T> A;
  A total = 0, counted = 0, weights = 0;
  int bad = 0;
  for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
    total += row_loss[i];
    if (!probabilities) {
      const i64 t = target[i];
      if (t != ignore_index) {
        if (t >= 0 && t < classes) {
          counted += weight ? to_acc(weight[t]) : A(1);
        } else {
          bad = 1;
        }
      }
    }
  }
  if (!probabilities && weight)
    for (i64 c = threadIdx.x; c < classes; c += blockDim.x) weights += to_acc(weight[c]);
  total = block_sum(total);
  counted = block_sum(counted);
  weights = block_sum(weights);
  bad = block_sum(bad);
  if (threadIdx.x == 0) {
    const A denominator = probabilities ? A(rows) : counted;
    if (reduction == 1) *reduced = total;
    // nan when it is 0 (every row ignored, or of class weight 0), not inf from a smoothed loss's sum
    if (reduction == 2) *reduced = denominator != A(0) ? total / denominator : gk_nan<A>();
    if (!probabilities) {
      totals[0] = denominator;
      totals[1] = weight ? weights : A(classes);
      *ok = bad == 0;
    }
  }
}

// A block per tile of ``chunk`` columns of one row (a grid-stride loop over
// tiles), so that a few long rows fill the GPU as well as many short ones.
// grad_loss[row * grad_stride] is the row's upstream gradient (a stride of 0
// for one value), divided here by the mean's denominator when mean != 0:
// totals[0] for class indices, the rows for probabilities. target_grad may be
// null (not asked for).
template <typename T>
__device__ __forceinline__ void cross_entropy_bwd(const T* __restrict__ logits, const i64* __restrict__ target,
                                                  const T* __restrict__ probs, const T* __restrict__ weight,
                                                  const acc_t<T>* __restrict__ row_max,
                                                  const acc_t<T>* __restrict__ log_sum,
                                                  const acc_t<T>* __restrict__ target_mass,
                                                  const acc_t<T>* __restrict__ totals,
                                                  const acc_t<T>* __restrict__ grad_loss,
                                                  i64 grad_stride, i64 mean, T* __restrict__ grad,
                                                  T* __restrict__ target_grad, i64 rows, i64 classes,
                                                  i64 row_stride, i64 chunk, i64 ignore_index, double smoothing) {
  typedef acc_t<T> A;
  const i64 chunks = (classes + chunk - 1) / chunk;
  for (i64 tile = blockIdx.x; tile < rows * chunks; tile += gridDim.x) {
    const i64 row = tile / chunks, first = (tile - row * chunks) * chunk;
    const i64 end = first + chunk < classes ? first + chunk : classes;
    A s = to_acc(grad_loss[row * grad_stride]);
    if (mean) s = probs ? s / A(rows) : (totals[0] != A(0) ? s / totals[0] : A(0));  // no rows kept: no gradient
    const A m_i = row_max[row], log_sum_i = log_sum[row];
    const T* xr = logits + row * row_stride;
    if (probs) {
      const T* yr = probs + row * classes;
      const A mass = target_mass[row], target_grad_coef = -A(1.0 - smoothing) * s;
      for (i64 c = first + threadIdx.x; c < end; c += blockDim.x) {
        const A logp = (to_acc(xr[c]) - m_i) - log_sum_i;
        store(grad, row * classes + c, s * (mass * gk_exp(logp) - target_coef(weight, yr, c, classes, smoothing)));
        if (target_grad)
          store(target_grad, row * classes + c, target_grad_coef * (weight ? to_acc(weight[c]) : A(1)) * logp);
      }
      continue;
    }
    const i64 t = target[row];
    const bool counted = t != ignore_index && t >= 0 && t < classes;
    if (!counted) s = 0;
    const A index_coef = A(1.0 - smoothing) * s * target_weight(weight, t, counted);
    const A smooth_coef = A(smoothing / (double)classes) * s;
    const A proportional_coef = smooth_coef * (weight ? totals[1] : A(classes));
    for (i64 c = first + threadIdx.x; c < end; c += blockDim.x) {
      const A p = gk_exp((to_acc(xr[c]) - m_i) - log_sum_i);
      A g = (c == t ? p - A(1) : p) * index_coef;
      // (e/C)(sum(w) p - w) is exactly 0 where p is one-hot (C == 1), which
      // ((1-e) tw + (e/C) sum(w)) p - ..., rounded otherwise, would not be
      if (smoothing > 0) g += p * proportional_coef - smooth_coef * (weight ? to_acc(weight[c]) : A(1));
      store(grad, row * classes + c, g);
    }
  }
}

#define GK_CROSS_ENTROPY_KERNELS(SUFFIX, T)                                                                       \
  extern "C" __global__ void cross_entropy_fwd_##SUFFIX(                                                          \
      const T* __restrict__ logits, const i64* __restrict__ target, const T* __restrict__ probs,                   \
      const T* __restrict__ weight, acc_t<T>* __restrict__ row_loss, acc_t<T>* __restrict__ row_max,               \
      acc_t<T>* __restrict__ log_sum, acc_t<T>* __restrict__ target_mass, i64 rows, i64 classes,                   \
      i64 row_stride, i64 ignore_index, double smoothing) {                                                        \
    cross_entropy_fwd<T>(logits, target, probs, weight, row_loss, row_max, log_sum, target_mass, rows, classes,   \
                         row_stride, ignore_index, smoothing);                                                     \
  }                                                                                                                \
  extern "C" __global__ void cross_entropy_total_##SUFFIX(                                                        \
      const acc_t<T>* __restrict__ row_loss, const i64* __restrict__ target, const T* __restrict__ weight,         \
      acc_t<T>* __restrict__ reduced, acc_t<T>* __restrict__ totals, bool* __restrict__ ok, i64 rows,              \
      i64 classes, i64 ignore_index, i64 reduction, i64 probabilities) {                                           \
    cross_entropy_total<T>(row_loss, target, weight, reduced, totals, ok, rows, classes, ignore_index, reduction,  \
                           probabilities);                                                                         \
  }                                                                                                                \
  extern "C" __global__ void cross_entropy_bwd_##SUFFIX(                                                          \
      const T* __restrict__ logits, const i64* __restrict__ target, const T* __restrict__ probs,                   \
      const T* __restrict__ weight, const acc_t<T>* __restrict__ row_max, const acc_t<T>* __restrict__ log_sum,    \
      const acc_t<T>* __restrict__ target_mass, const acc_t<T>* __restrict__ totals,                               \
      const acc_t<T>* __restrict__ grad_loss, i64 grad_stride, i64 mean, T* __restrict__ grad,                     \
      T* __restrict__ target_grad, i64 rows, i64 classes, i64 row_stride, i64 chunk, i64 ignore_index,             \
      double smoothing) {                                                                                          \
    cross_entropy_bwd<T>(logits, target, probs, weight, row_max, log_sum, target_mass, totals, grad_loss,          \
                         grad_stride, mean, grad, target_grad, rows, classes, row_stride, chunk, ignore_index,     \
                         smoothing);                                                                               \
  }
GK_FOR_EACH_DTYPE(GK_CROSS_ENTROPY_KERNELS)
