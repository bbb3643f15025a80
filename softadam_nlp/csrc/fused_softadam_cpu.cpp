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
// Both calls lay the group's tensors end to end and split all their elements into one
// contiguous range per thread, in one parallel region: a thread walks the pieces of the
// tensors its range overlaps. A parameter list of many medium-sized tensors (a
// transformer's) then costs one parallel region per call instead of one per tensor, and
// every thread streams an equal share of memory. The update pass walks each range
// backwards, starting with what its thread read last in the sums pass (still in its
// cache). Partial sums are added in a fixed order, so a step is deterministic for a given
// thread count; the update is elementwise, the same for any thread count.
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
#include <unordered_set>
#include <vector>

namespace {

constexpr int64_t kGrain = 32768;  // elements per thread at least: smaller groups run on one thread
constexpr int64_t kBlock = 4096;   // elements whose float partial sums are added into float64 together
constexpr int64_t kLanes = 64;     // independent partial sums in the sum-of-squares loop
constexpr int64_t kStreams = 4;    // gradient segments the sums pass reads side by side
constexpr int64_t kSegment = 16384;  // elements per segment of the sums pass (a multiple of kBlock / kStreams)

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

// Sum of g^2 over [begin, end) in float64, from float partial sums of kBlock elements
// each. One sequential read stream per core falls short of the memory's bandwidth here
// (too few misses in flight: docs/RESULTS.md), so the range is read in spans of kStreams
// segments side by side, segment s in lanes of its own. The spans follow each other in
// address order, so the update pass, walking backwards, starts on what this pass read
// last. The fixed-width inner loops map onto vector registers without reassociating
// anything (a plain reduction loop would be one sequential chain of adds), and every
// float lane adds up kBlock / kLanes elements whichever loop it is in.
template <typename param_t, typename opmath_t>
double sum_of_squares(const param_t* __restrict__ grad, int64_t begin, int64_t end) {
  constexpr int64_t width = kLanes / kStreams, chunk = kBlock / kStreams;
  double total = 0.0;
  int64_t start = begin;
  for (; start + kStreams * kSegment <= end; start += kStreams * kSegment) {
    for (int64_t offset = start; offset < start + kSegment; offset += chunk) {
      opmath_t lanes[kStreams][width] = {};
      for (int64_t i = offset; i < offset + chunk; i += width) {
        for (int64_t s = 0; s < kStreams; ++s) {
          for (int64_t j = 0; j < width; ++j) {
            const opmath_t g = static_cast<opmath_t>(grad[i + s * kSegment + j]);
            lanes[s][j] += g * g;
          }
        }
      }
      for (int64_t s = 0; s < kStreams; ++s) {
        for (int64_t j = 0; j < width; ++j) total += static_cast<double>(lanes[s][j]);
      }
    }
  }
  for (; start < end; start += kBlock) {
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

// The number of threads for a pass over n elements: one per kGrain elements at most.
int threads_for(int64_t n) {
  if (at::in_parallel_region()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain)));
}

// Element offsets of tensors laid end to end: tensor k holds [offsets[k], offsets[k + 1]).
std::vector<int64_t> element_offsets(const std::vector<at::Tensor>& tensors) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t k = 0; k < tensors.size(); ++k) offsets[k + 1] = offsets[k] + tensors[k].numel();
  return offsets;
}

// Calls body(k, begin, end, thread) for each piece [begin, end) of tensor k that lies in
// the calling thread's range, in one parallel region of `threads` threads. Each range is a
// whole number of kBlock elements of the tensors laid end to end; a thread visits its
// pieces in tensor order, or in reverse.
template <typename Body>
void for_each_range(const std::vector<int64_t>& offsets, int threads, bool reverse, const Body& body) {
  const int64_t total = offsets.back();
  auto run_range = [&](int64_t begin, int64_t end, int thread) {
    if (begin >= end) return;
    // The tensor holding element `begin`, and the first tensor starting at or after `end`
    // (empty tensors in between yield no piece).
    const int64_t first = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    const int64_t stop = std::lower_bound(offsets.begin(), offsets.end(), end) - offsets.begin();
    for (int64_t i = 0; i < stop - first; ++i) {
      const int64_t k = reverse ? stop - 1 - i : first + i;
      const int64_t lo = std::max(begin, offsets[k]), hi = std::min(end, offsets[k + 1]);
      if (hi > lo) body(k, lo - offsets[k], hi - offsets[k], thread);
    }
  };
  if (threads <= 1) {
    run_range(0, total, 0);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t blocks = (total + kBlock - 1) / kBlock;
    const int64_t per_thread = (blocks + team - 1) / team * kBlock;
    const int64_t begin = std::min(total, thread * per_thread), end = std::min(total, begin + per_thread);
    run_range(begin, end, thread);
  }
}

// The denominator's scale eta*gamma/sqrt(mean(v_t) + eps^2), with the reference's floor
// (softadam.py: _eps_squared): with eps = 0 an all-zero tensor keeps 1/sqrt(0 + tiny)
// finite, and its step 0 / d = 0.
template <typename opmath_t>
opmath_t denominator_scale(double denom_scale, double eps_squared, double mean) {
  eps_squared = std::max(eps_squared, static_cast<double>(std::numeric_limits<opmath_t>::min()));
  return static_cast<opmath_t>(denom_scale / std::sqrt(mean + eps_squared));
}

template <typename param_t, typename opmath_t>
void update_range_dispatch(bool nesterov, bool use_denom, param_t* param, const param_t* grad, opmath_t* exp_avg,
                           opmath_t* exp_avg_sq, int64_t begin, int64_t end, const Coefficients<opmath_t>& c,
                           opmath_t scale) {
  auto run = [&](auto kernel) { kernel(param, grad, exp_avg, exp_avg_sq, begin, end, c, scale); };
  if (nesterov) {
    use_denom ? run(update_range<param_t, opmath_t, true, true>) : run(update_range<param_t, opmath_t, true, false>);
  } else {
    use_denom ? run(update_range<param_t, opmath_t, false, true>)
              : run(update_range<param_t, opmath_t, false, false>);
  }
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
  const int64_t count = static_cast<int64_t>(grads.size());
  const std::vector<int64_t> offsets = element_offsets(grads);
  const int threads = threads_for(offsets.back());
  // One slot per thread and tensor: each thread sums its own pieces, added up below in
  // thread order (a fixed order for a given thread count).
  std::vector<double> partial(static_cast<size_t>(std::max(threads, 1) * count), 0.0);
  for_each_range(offsets, threads, false, [&](int64_t k, int64_t begin, int64_t end, int thread) {
    const at::Tensor& grad = grads[k];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "grad_sq_sums", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      partial[thread * count + k] = sum_of_squares<scalar_t, opmath_t>(grad.data_ptr<scalar_t>(), begin, end);
    });
  });
  at::Tensor sums = at::zeros({count}, at::kDouble);
  double* out = sums.data_ptr<double>();
  for (int thread = 0; thread < std::max(threads, 1); ++thread) {
    for (int64_t k = 0; k < count; ++k) out[k] += partial[thread * count + k];
  }
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
  // Per tensor, the coefficients and the denominator's scale, made once (not per piece).
  std::vector<double> scales(count, 0.0);
  if (eta != 0.0) {
    for (size_t k = 0; k < count; ++k) {
      scales[k] = params[k].scalar_type() == at::kDouble
                      ? denominator_scale<double>(denom_scale[k], eps_squared, exp_avg_sq_means[k])
                      : denominator_scale<float>(denom_scale[k], eps_squared, exp_avg_sq_means[k]);
    }
  }
  const std::vector<int64_t> offsets = element_offsets(params);
  for_each_range(offsets, threads_for(offsets.back()), true, [&](int64_t k, int64_t begin, int64_t end, int) {
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
      update_range_dispatch<scalar_t, opmath_t>(nesterov, eta != 0.0, param.data_ptr<scalar_t>(),
                                                grads[k].data_ptr<scalar_t>(), exp_avgs[k].data_ptr<opmath_t>(),
                                                exp_avg_sqs[k].data_ptr<opmath_t>(), begin, end, c,
                                                static_cast<opmath_t>(scales[k]));
    });
  });
}

// The step's scalar state, moved without a dispatched op per tensor: a transformer has
// hundreds of 0-dim counters and means, and a torch op on each (_foreach_add_ falls back
// to one per tensor on the CPU) cost more than a millisecond per step. No arithmetic
// beyond the counters' +1 happens here; the scalar algorithm stays in softadam.py.
void check_scalar(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && at::isFloatingType(t.scalar_type()),
              "fused_softadam_: ", what, " must be one-element floating-point CPU tensors");
}

// Adds 1 to every step counter, once to a counter that several entries share (the pieces
// of one flattened tensor), in the counter's dtype as `counter += 1` does; returns each
// entry's new count.
std::vector<double> increment_steps(const std::vector<at::Tensor>& steps) {
  std::vector<double> counts;
  counts.reserve(steps.size());
  std::unordered_set<const void*> done;
  for (const at::Tensor& step : steps) {
    check_scalar(step, "step counters");
    const bool first = done.insert(step.data_ptr()).second;
    AT_DISPATCH_FLOATING_TYPES(step.scalar_type(), "increment_steps", [&] {
      scalar_t* count = step.data_ptr<scalar_t>();
      if (first) *count += 1;
      counts.push_back(static_cast<double>(*count));
    });
  }
  return counts;
}

// The values of one-element tensors, as doubles.
std::vector<double> read_scalars(const std::vector<at::Tensor>& tensors) {
  std::vector<double> values;
  values.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    check_scalar(t, "means of v");
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "read_scalars",
                               [&] { values.push_back(static_cast<double>(*t.data_ptr<scalar_t>())); });
  }
  return values;
}

// Writes `values` into one-element tensors, each rounded to its dtype.
void write_scalars(const std::vector<at::Tensor>& tensors, const std::vector<double>& values) {
  TORCH_CHECK(tensors.size() == values.size(), "write_scalars: one value per tensor");
  for (size_t k = 0; k < tensors.size(); ++k) {
    check_scalar(tensors[k], "means of v");
    AT_DISPATCH_FLOATING_TYPES(tensors[k].scalar_type(), "write_scalars",
                               [&] { *tensors[k].data_ptr<scalar_t>() = static_cast<scalar_t>(values[k]); });
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("increment_steps", &increment_steps, "step counters += 1 (shared ones once); the new counts");
  m.def("read_scalars", &read_scalars, "values of one-element CPU tensors");
  m.def("write_scalars", &write_scalars, "write values into one-element CPU tensors");
  m.def("grad_sq_sums", &grad_sq_sums, "sum(g^2) per gradient, float64 (CPU, contiguous)");
  m.def("fused_softadam_", &fused_softadam_, "SoftAdam step for a list of CPU tensors (in place), after grad_sq_sums");
}
