// Fused SoftAdam step for CPU tensors, in two calls for a whole parameter group list.
//
// grad_sq_sums() reads every gradient once for its sum(g^2). The caller (softadam.py)
// checks those sums before anything is written: a NaN or inf gradient (or one whose
// square overflows) makes its sum non-finite, so a bad step is refused while every
// parameter and moment is still untouched. The same sums, added up across ranks, give
// the mean over a whole tensor that FSDP shards across processes.
//
// fused_softadam_() then makes one elementwise pass per tensor that updates m, v and
// the parameter together (what torch's fused AdamW does in its one pass). The
// per-tensor mean of v needs no pass of its own because it follows the same
// recurrence as v:
//     mean(v_t) = beta2_t * mean(v_{t-1}) + (1 - beta2_t) * sum(g_t^2) / numel,
// which the caller (softadam.py: _advance_means) carries across steps in float64 and
// hands over, with every step coefficient, so the scalar algorithm stays written once.
//
// Both calls split a large tensor into one contiguous slice per thread, in a fixed
// order, so a step is deterministic for a given thread count; small tensors run on one
// thread each, several at once.
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

// The number of threads for an elementwise pass over n elements: one below kGrain each.
int threads_for(int64_t n) {
  if (at::in_parallel_region()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain)));
}

// Calls body(begin, end) on one contiguous slice per thread, in a parallel region when
// the tensor is large enough to share.
template <typename Body>
void for_slices(int64_t n, int threads, const Body& body) {
  if (threads <= 1) {
    body(int64_t{0}, n, 0);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t per_thread = (n + team - 1) / team;
    const int64_t begin = std::min(n, thread * per_thread), end = std::min(n, begin + per_thread);
    body(begin, end, thread);
  }
}

template <typename param_t, typename opmath_t>
double tensor_sum_of_squares(const param_t* grad, int64_t n, int threads) {
  std::vector<double> slice_sums(std::max(threads, 1), 0.0);
  for_slices(n, threads, [&](int64_t begin, int64_t end, int thread) {
    slice_sums[thread] = sum_of_squares<param_t, opmath_t>(grad, begin, end);
  });
  double sum = 0.0;
  for (double s : slice_sums) sum += s;  // a fixed order
  return sum;
}

template <typename param_t, typename opmath_t, bool kNesterov, bool kUseDenom>
void step_tensor(param_t* param, const param_t* grad, opmath_t* exp_avg, opmath_t* exp_avg_sq, int64_t n,
                 const Coefficients<opmath_t> c, double denom_scale, double eps_squared, double mean) {
  opmath_t scale = 0;
  if (kUseDenom) {
    // The reference's floor (softadam.py: _eps_squared): with eps = 0 an all-zero tensor
    // keeps 1/sqrt(0 + tiny) finite, and its step 0 / d = 0.
    eps_squared = std::max(eps_squared, static_cast<double>(std::numeric_limits<opmath_t>::min()));
    // The denominator's scale eta*gamma/sqrt(mean(v_t) + eps^2).
    scale = static_cast<opmath_t>(denom_scale / std::sqrt(mean + eps_squared));
  }
  for_slices(n, threads_for(n), [&](int64_t begin, int64_t end, int) {
    update_range<param_t, opmath_t, kNesterov, kUseDenom>(param, grad, exp_avg, exp_avg_sq, begin, end, c, scale);
  });
}

template <typename param_t, typename opmath_t>
void step_tensor_dispatch(bool nesterov, bool use_denom, param_t* param, const param_t* grad, opmath_t* exp_avg,
                          opmath_t* exp_avg_sq, int64_t n, const Coefficients<opmath_t>& c, double denom_scale,
                          double eps_squared, double mean) {
  auto run = [&](auto kernel) { kernel(param, grad, exp_avg, exp_avg_sq, n, c, denom_scale, eps_squared, mean); };
  if (nesterov) {
    use_denom ? run(step_tensor<param_t, opmath_t, true, true>) : run(step_tensor<param_t, opmath_t, true, false>);
  } else {
    use_denom ? run(step_tensor<param_t, opmath_t, false, true>) : run(step_tensor<param_t, opmath_t, false, false>);
  }
}

// Runs fn(k) for every tensor k: the ones large enough to be split between threads one
// after another (each splits itself), the small ones several at once, one per thread.
template <typename Fn>
void for_each_tensor(const std::vector<at::Tensor>& tensors, bool reverse, const Fn& fn) {
  std::vector<int64_t> small;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const size_t k = reverse ? tensors.size() - 1 - i : i;
    if (threads_for(tensors[k].numel()) > 1) {
      fn(k);
    } else {
      small.push_back(static_cast<int64_t>(k));
    }
  }
  const int64_t count = static_cast<int64_t>(small.size());
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), count));
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t k : small) fn(static_cast<size_t>(k));
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t i = 0; i < count; ++i) fn(static_cast<size_t>(small[i]));
}

void check_cpu_contiguous(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fused_softadam_: CPU tensors only (", what, ")");
  TORCH_CHECK(t.is_contiguous(), "fused_softadam_: contiguous tensors only (", what, ")");
}

}  // namespace

// sum(g^2) of every gradient, in float64 (each accumulated as sum_of_squares does).
at::Tensor grad_sq_sums(const std::vector<at::Tensor>& grads) {
  for (const at::Tensor& grad : grads) {
    check_cpu_contiguous(grad, "gradient");
    TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "fused_softadam_: floating-point gradients only");
  }
  at::Tensor sums = at::zeros({static_cast<int64_t>(grads.size())}, at::kDouble);
  double* out = sums.data_ptr<double>();
  for_each_tensor(grads, false, [&](size_t k) {
    const at::Tensor& grad = grads[k];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "grad_sq_sums", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      out[k] = tensor_sum_of_squares<scalar_t, opmath_t>(grad.data_ptr<scalar_t>(), grad.numel(),
                                                         threads_for(grad.numel()));
    });
  });
  return sums;
}

// One step for every tensor of a group, after grad_sq_sums. The per-tensor vectors carry
// each tensor's own step coefficients (tensors that joined the group later have their
// own step counts, and the pieces of a flattened or sharded parameter are tensors here).
// exp_avg_sq_means: mean(v_t) of each tensor's whole original tensor, already advanced
// to this step by the caller (unused when eta = 0, where no denominator is computed).
void fused_softadam_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                     const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                     const std::vector<double>& exp_avg_sq_means, const std::vector<double>& beta2_t,
                     const std::vector<double>& second_moment_weight, const std::vector<double>& denom_offset,
                     const std::vector<double>& denom_scale, double lr, double beta1, double eps_squared, double eta,
                     double weight_decay, bool nesterov, bool maximize) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && exp_avgs.size() == count && exp_avg_sqs.size() == count &&
                  exp_avg_sq_means.size() == count && beta2_t.size() == count &&
                  second_moment_weight.size() == count && denom_offset.size() == count &&
                  denom_scale.size() == count,
              "fused_softadam_: every list needs one entry per parameter");
  for (size_t k = 0; k < count; ++k) {
    const at::Tensor& param = params[k];
    check_cpu_contiguous(param, "parameter");
    TORCH_CHECK(at::isFloatingType(param.scalar_type()), "fused_softadam_: floating-point parameters only");
    check_cpu_contiguous(grads[k], "gradient");
    check_cpu_contiguous(exp_avgs[k], "exp_avg");
    check_cpu_contiguous(exp_avg_sqs[k], "exp_avg_sq");
    TORCH_CHECK(grads[k].scalar_type() == param.scalar_type(), "fused_softadam_: gradient dtype must match the parameter");
    TORCH_CHECK(grads[k].numel() == param.numel() && exp_avgs[k].numel() == param.numel() &&
                    exp_avg_sqs[k].numel() == param.numel(),
                "fused_softadam_: gradient and moments must have the parameter's size");
    const auto state_dtype = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(exp_avgs[k].scalar_type() == state_dtype && exp_avg_sqs[k].scalar_type() == state_dtype,
                "fused_softadam_: moments must be in the state dtype (float32 for low-precision parameters)");
  }
  for_each_tensor(params, true, [&](size_t k) {
    const at::Tensor& param = params[k];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "fused_softadam_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const Coefficients<opmath_t> c{static_cast<opmath_t>(maximize ? -1 : 1),
                                     static_cast<opmath_t>(beta1),
                                     static_cast<opmath_t>(1 - beta1),
                                     static_cast<opmath_t>(beta2_t[k]),
                                     static_cast<opmath_t>(second_moment_weight[k]),
                                     static_cast<opmath_t>(1 - lr * weight_decay),
                                     static_cast<opmath_t>(denom_offset[k]),
                                     static_cast<opmath_t>(-lr * (1 + eta))};
      step_tensor_dispatch<scalar_t, opmath_t>(nesterov, eta != 0.0, param.data_ptr<scalar_t>(),
                                               grads[k].data_ptr<scalar_t>(), exp_avgs[k].data_ptr<opmath_t>(),
                                               exp_avg_sqs[k].data_ptr<opmath_t>(), param.numel(), c, denom_scale[k],
                                               eps_squared, exp_avg_sq_means[k]);
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("grad_sq_sums", &grad_sq_sums, "sum(g^2) per gradient, float64 (CPU, contiguous)");
  m.def("fused_softadam_", &fused_softadam_, "SoftAdam step for a list of CPU tensors (in place), after grad_sq_sums");
}
