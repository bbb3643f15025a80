// Fused SoftAdam step for CPU tensors: one C++ call for a whole parameter group.
//
// Per tensor it reads the gradient once for sum(g^2), then makes one elementwise pass
// that updates m, v and the parameter together (what torch's fused AdamW does in its
// one pass). The per-tensor mean of v needs no pass of its own because it follows the
// same recurrence as v:
//     mean(v_t) = beta2_t * mean(v_{t-1}) + (1 - beta2_t) * mean(g_t^2),
// carried across steps in float64 by the caller (softadam_nlp/softadam.py, which also
// computes every step coefficient, so the scalar algorithm stays written once).
//
// Both passes run inside one parallel region per tensor: each thread sums its own
// contiguous slice, the threads meet at a barrier to add the slices' sums (in a fixed
// order, so a step is deterministic for a given thread count), and each thread then
// updates the slice it has just read (what is still in its cache is read again from
// there). One region instead of two halves the fork/join cost of the many mid-sized
// tensors of a transformer. (Updating the slice from its end back, to start where the
// sum pass left off, measured about 1 ms slower per step on the transformer's shapes
// than going forward, which the hardware prefetchers follow best.)
//
// Arithmetic is float32 for float32/bfloat16/float16 parameters (state in float32) and
// float64 for float64 ones, in the order of the per-tensor reference path, each
// operation rounded as written (the build disables FMA contraction). torch's own
// kernels fuse some multiply-adds, so results agree with the reference executions to
// float rounding, not to the bit. The extension links the libgomp that torch has
// already loaded (same soname), so its threads are torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kGrain = 32768;  // elements per thread at least: smaller tensors run on one thread
constexpr int64_t kBlock = 4096;   // elements per float partial sum, before it is added in float64
constexpr int64_t kLanes = 64;     // independent partial sums in the sum-of-squares loop

template <typename opmath_t>
struct Coefficients {
  opmath_t grad_sign;      // -1 with maximize, else 1 (exact)
  opmath_t beta1;
  opmath_t one_minus_beta1;
  opmath_t beta2_t;
  opmath_t weight;         // 1 - beta2_t
  opmath_t decay;          // 1 - lr * weight_decay (exactly 1 without weight decay)
  opmath_t denom_offset;   // 1 + eta - eta * gamma
  opmath_t step_size;      // -lr * (1 + eta)
};

// Sum of g^2 over [begin, end) in float64. kLanes independent float partial sums: a
// fixed-width inner loop the compiler maps onto vector registers without reassociating
// anything (a plain reduction loop would be one sequential chain of adds).
template <typename param_t, typename opmath_t>
double sum_of_squares(const param_t* __restrict__ grad, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t stop = std::min(end, start + kBlock);
    opmath_t lanes[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const opmath_t g = static_cast<opmath_t>(grad[i + j]);
        lanes[j] += g * g;
      }
    }
    for (; i < stop; ++i) {
      const opmath_t g = static_cast<opmath_t>(grad[i]);
      lanes[0] += g * g;
    }
    for (int64_t j = 0; j < kLanes; ++j) total += static_cast<double>(lanes[j]);
  }
  return total;
}

// The update of [begin, end). The branches are template parameters,
// so the inner loop has none and vectorises.
template <typename param_t, typename opmath_t, bool kNesterov, bool kUseDenom>
void update_range(param_t* __restrict__ param, const param_t* __restrict__ grad, opmath_t* __restrict__ exp_avg,
                  opmath_t* __restrict__ exp_avg_sq, int64_t begin, int64_t end, const Coefficients<opmath_t> c,
                  const opmath_t denom_scale) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const opmath_t g = static_cast<opmath_t>(grad[i]) * c.grad_sign;
    const opmath_t m = exp_avg[i] * c.beta1 + g * c.one_minus_beta1;
    const opmath_t v = exp_avg_sq[i] * c.beta2_t + g * g * c.weight;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    const opmath_t numerator = kNesterov ? m * c.beta1 + g * c.one_minus_beta1 : m;
    const opmath_t p = static_cast<opmath_t>(param[i]) * c.decay;
    // Without the denominator (eta = 0) d = 1 exactly: SGD with momentum.
    param[i] = static_cast<param_t>(kUseDenom ? p + c.step_size * (numerator / (std::sqrt(v) * denom_scale +
                                                                                c.denom_offset))
                                              : p + c.step_size * numerator);
  }
}

template <typename param_t, typename opmath_t, bool kNesterov, bool kUseDenom>
void step_tensor(param_t* param, const param_t* grad, opmath_t* exp_avg, opmath_t* exp_avg_sq, int64_t n,
                 const Coefficients<opmath_t> c, double denom_scale, double eps_squared, double* mean) {
  const double old_mean = *mean;
  // The reference's floor (softadam.py: _eps_squared): with eps = 0 an all-zero tensor
  // keeps 1/sqrt(0 + tiny) finite, and its step 0 / d = 0.
  eps_squared = std::max(eps_squared, static_cast<double>(std::numeric_limits<opmath_t>::min()));
  // mean(v_t) from the slices' sums, then the denominator's scale eta*gamma/sqrt(mean + eps^2).
  auto scale_from = [&](double sum) {
    const double new_mean = c.beta2_t * old_mean + c.weight * (n > 0 ? sum / n : 0.0);
    return std::pair<double, opmath_t>(new_mean, static_cast<opmath_t>(denom_scale / std::sqrt(new_mean + eps_squared)));
  };
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n / kGrain));
  if (threads <= 1 || at::in_parallel_region()) {
    double new_mean = old_mean;
    opmath_t scale = 0;
    if (kUseDenom) std::tie(new_mean, scale) = scale_from(sum_of_squares<param_t, opmath_t>(grad, 0, n));
    update_range<param_t, opmath_t, kNesterov, kUseDenom>(param, grad, exp_avg, exp_avg_sq, 0, n, c, scale);
    *mean = new_mean;
    return;
  }
  std::vector<double> slice_sums(threads, 0.0);
  double new_mean = old_mean;
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t per_thread = (n + team - 1) / team;
    const int64_t begin = std::min(n, thread * per_thread), end = std::min(n, begin + per_thread);
    opmath_t scale = 0;
    if (kUseDenom) {
      slice_sums[thread] = sum_of_squares<param_t, opmath_t>(grad, begin, end);
#pragma omp barrier
      double sum = 0.0;
      for (int t = 0; t < team; ++t) sum += slice_sums[t];  // same order on every thread
      const auto mean_and_scale = scale_from(sum);
      scale = mean_and_scale.second;
      if (thread == 0) new_mean = mean_and_scale.first;
    }
    update_range<param_t, opmath_t, kNesterov, kUseDenom>(param, grad, exp_avg, exp_avg_sq, begin, end, c, scale);
  }
  *mean = new_mean;
}

template <typename param_t, typename opmath_t>
void step_tensor_dispatch(bool nesterov, bool use_denom, param_t* param, const param_t* grad, opmath_t* exp_avg,
                          opmath_t* exp_avg_sq, int64_t n, const Coefficients<opmath_t>& c, double denom_scale,
                          double eps_squared, double* mean) {
  auto run = [&](auto kernel) { kernel(param, grad, exp_avg, exp_avg_sq, n, c, denom_scale, eps_squared, mean); };
  if (nesterov) {
    use_denom ? run(step_tensor<param_t, opmath_t, true, true>) : run(step_tensor<param_t, opmath_t, true, false>);
  } else {
    use_denom ? run(step_tensor<param_t, opmath_t, false, true>) : run(step_tensor<param_t, opmath_t, false, false>);
  }
}

}  // namespace

// One step for every tensor of a group. The per-tensor vectors carry each tensor's own
// step coefficients (tensors that joined the group later have their own step counts).
// exp_avg_sq_means: float64 0-dim tensors holding mean(v_{t-1}), updated in place to
// mean(v_t) (left as they are when eta = 0, where no denominator is computed).
void fused_softadam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<at::Tensor>& exp_avg_sq_means, const std::vector<double>& beta2_t,
                     const std::vector<double>& second_moment_weight, const std::vector<double>& denom_offset,
                     const std::vector<double>& denom_scale, double lr, double beta1, double eps_squared, double eta,
                     double weight_decay, bool nesterov, bool maximize) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  exp_avg_sq_means.size() == count && beta2_t.size() == count &&
                  second_moment_weight.size() == count && denom_offset.size() == count && denom_scale.size() == count,
              "fused_softadam_: every list needs one entry per parameter");
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor& param = params[k];
    const at::Tensor& grad = grads[k];
    const at::Tensor& exp_avg = exp_avgs[k];
    const at::Tensor& exp_avg_sq = exp_avg_sqs[k];
    const at::Tensor& mean = exp_avg_sq_means[k];
    TORCH_CHECK(param.device().is_cpu() && grad.device().is_cpu() && exp_avg.device().is_cpu() &&
                    exp_avg_sq.device().is_cpu() && mean.device().is_cpu(),
                "fused_softadam_: CPU tensors only");
    TORCH_CHECK(param.is_contiguous() && grad.is_contiguous() && exp_avg.is_contiguous() && exp_avg_sq.is_contiguous(),
                "fused_softadam_: contiguous tensors only");
    TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "fused_softadam_: gradient dtype must match the parameter");
    TORCH_CHECK(grad.numel() == param.numel() && exp_avg.numel() == param.numel() &&
                    exp_avg_sq.numel() == param.numel(),
                "fused_softadam_: gradient and moments must have the parameter's size");
    TORCH_CHECK(mean.scalar_type() == at::kDouble && mean.numel() == 1, "fused_softadam_: means are float64 scalars");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "fused_softadam_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      TORCH_CHECK(exp_avg.scalar_type() == c10::CppTypeToScalarType<opmath_t>::value &&
                      exp_avg_sq.scalar_type() == exp_avg.scalar_type(),
                  "fused_softadam_: moments must be in the state dtype (float32 for low-precision parameters)");
      const Coefficients<opmath_t> c{static_cast<opmath_t>(maximize ? -1 : 1),
                                     static_cast<opmath_t>(beta1),
                                     static_cast<opmath_t>(1 - beta1),
                                     static_cast<opmath_t>(beta2_t[k]),
                                     static_cast<opmath_t>(second_moment_weight[k]),
                                     static_cast<opmath_t>(1 - lr * weight_decay),
                                     static_cast<opmath_t>(denom_offset[k]),
                                     static_cast<opmath_t>(-lr * (1 + eta))};
      step_tensor_dispatch<scalar_t, opmath_t>(nesterov, eta != 0.0, param.data_ptr<scalar_t>(),
                                               grad.data_ptr<scalar_t>(), exp_avg.data_ptr<opmath_t>(),
                                               exp_avg_sq.data_ptr<opmath_t>(), param.numel(), c, denom_scale[k],
                                               eps_squared, mean.data_ptr<double>());
    });
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_softadam_", &fused_softadam_, "SoftAdam step for a list of CPU tensors (in place)");
}
