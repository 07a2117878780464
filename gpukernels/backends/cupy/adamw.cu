// AdamW over many tensors in one launch. Each block updates one chunk of one
// tensor, found through a table of device pointers built by adamw.py (one
// int64 array, T = the number of tensors):
//   [0T, 1T) params        [1T, 2T) grads       [2T, 3T) exp_avgs
//   [3T, 4T) exp_avg_sqs   [4T, 5T) max_exp_avg_sqs (0 without amsgrad)
//   [5T, 6T) steps (fp32, already incremented)   [6T, 7T) numels
//   [7T, 8T) first block of each tensor           [8T, 8T + blocks) tensor of each block
// The update follows backends/numpy/adamw.py operation for operation (the
// module is compiled without FMA contraction, so each operation is rounded as
// there): scalars from the step and lr in double, then rounded once to the
// state type; the first moment by PyTorch's two-formula lerp. grad_scale (null:
// none) is read once per block, rounded to the state type, and multiplies each
// gradient as it is read (the gradients are not written). found_inf (null: none)
// nonzero: every block returns before it writes (adamw.py left the steps as they were).
#include "_common.cu"

enum TableColumn { PARAMS, GRADS, EXP_AVGS, EXP_AVG_SQS, MAX_EXP_AVG_SQS, STEPS, NUMELS, FIRST_BLOCKS, COLUMNS };

template <typename P>
__device__ __forceinline__ void adamw(const i64* __restrict__ table, i64 tensors, i64 chunk,
                                      const double* __restrict__ lr_ptr, double beta1, double beta2,
                                      double eps, double weight_decay, int amsgrad, int maximize,
                                      const double* __restrict__ grad_scale,
                                      const float* __restrict__ found_inf) {
  if (found_inf && *found_inf != 0.0f) return;  // the same for every thread: no barrier passed yet
  typedef acc_t<P> A;
  const i64 block = blockIdx.x;
  const i64 k = table[COLUMNS * tensors + block];
  P* param = (P*)table[PARAMS * tensors + k];
  const P* grad = (const P*)table[GRADS * tensors + k];
  A* exp_avg = (A*)table[EXP_AVGS * tensors + k];
  A* exp_avg_sq = (A*)table[EXP_AVG_SQS * tensors + k];
  A* max_exp_avg_sq = (A*)table[MAX_EXP_AVG_SQS * tensors + k];
  const i64 start = (block - table[FIRST_BLOCKS * tensors + k]) * chunk;
  const i64 numel = table[NUMELS * tensors + k];
  const i64 end = start + chunk < numel ? start + chunk : numel;

  // Per-tensor scalars, worked out once per block in double as PyTorch does in Python floats, and the scale.
  __shared__ double step_scalars[4];
  if (threadIdx.x == 0) {
    const double lr = *lr_ptr;
    const double t = (double)*(const float*)table[STEPS * tensors + k];
    step_scalars[0] = 1.0 - lr * weight_decay;
    step_scalars[1] = -(lr / (1.0 - pow(beta1, t)));
    step_scalars[2] = sqrt(1.0 - pow(beta2, t));
    step_scalars[3] = grad_scale ? *grad_scale : 1.0;
  }
  __syncthreads();
  const A decay = A(step_scalars[0]), neg_step_size = A(step_scalars[1]);
  const A bias_correction2_sqrt = A(step_scalars[2]), scale = A(step_scalars[3]);
  const A lerp_weight = A(1.0 - beta1), lerp_complement = A(1) - lerp_weight;
  const A beta2_a = A(beta2), one_minus_beta2 = A(1.0 - beta2), eps_a = A(eps);

  for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
    A g = to_acc(grad[i]) * scale;  // exact without a scale: times 1
    if (maximize) g = -g;
    const A p = to_acc(param[i]) * decay;  // a no-op multiply by 1 without weight decay
    const A m_old = exp_avg[i];
    // each formula exact at its own end of the weight range, as torch.lerp
    const A m = lerp_weight < A(0.5) ? m_old + lerp_weight * (g - m_old) : g - (g - m_old) * lerp_complement;
    const A v = exp_avg_sq[i] * beta2_a + one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    A second = v;
    if (amsgrad) {
      const A v_max = max_exp_avg_sq[i];
      second = (v_max > v || v_max != v_max) ? v_max : v;  // np.maximum: nan wins
      max_exp_avg_sq[i] = second;
    }
    const A denom = gk_sqrt(second) / bias_correction2_sqrt + eps_a;
    store(param, i, p + neg_step_size * m / denom);
  }
}

#define GK_ADAMW_KERNEL(SUFFIX, P)                                                                 \
  extern "C" __global__ void adamw_##SUFFIX(const i64* __restrict__ table, i64 tensors, i64 chunk, \
                                            const double* __restrict__ lr, double beta1,           \
                                            double beta2, double eps, double weight_decay,         \
                                            int amsgrad, int maximize,                             \
                                            const double* __restrict__ grad_scale,                 \
                                            const float* __restrict__ found_inf) {                 \
    adamw<P>(table, tensors, chunk, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,        \
             grad_scale, found_inf);                                                               \
  }
GK_FOR_EACH_DTYPE(GK_ADAMW_KERNEL)
