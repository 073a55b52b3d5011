#include "policy/perf_model.hpp"

namespace moert::policy {

result<linear_fit> fit_linear(std::span<const double> x, std::span<const double> y) {
  if (x.size() != y.size())
    return make_error(error_code::invalid_argument, "fit_linear: x and y differ in length");
  if (x.size() < 2)
    return make_error(error_code::invalid_argument, "fit_linear: needs at least two points");
  double n = double(x.size());
  double mean_x = 0.0, mean_y = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    mean_x += x[i];
    mean_y += y[i];
  }
  mean_x /= n;
  mean_y /= n;
  double sxx = 0.0, sxy = 0.0, syy = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxx += (x[i] - mean_x) * (x[i] - mean_x);
    sxy += (x[i] - mean_x) * (y[i] - mean_y);
    syy += (y[i] - mean_y) * (y[i] - mean_y);
  }
  if (sxx == 0.0)
    return make_error(error_code::invalid_argument, "fit_linear: all x are equal");
  linear_fit fit;
  fit.beta = sxy / sxx;
  fit.alpha = mean_y - fit.beta * mean_x;
  double ss_res = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    double r = y[i] - fit(x[i]);
    ss_res += r * r;
  }
  fit.r2 = syy > 0.0 ? 1.0 - ss_res / syy : 1.0;
  return fit;
}

result<linear_fit> fit_linear_nonnegative(std::span<const double> x, std::span<const double> y) {
  auto fit = fit_linear(x, y);
  if (!fit || fit->alpha >= 0.0)
    return fit;
  double sxy = 0.0, sxx = 0.0, mean_y = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxy += x[i] * y[i];
    sxx += x[i] * x[i];
    mean_y += y[i];
  }
  mean_y /= double(y.size());
  linear_fit origin{0.0, sxy / sxx, 1.0};
  double ss_res = 0.0, ss_tot = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    ss_res += (y[i] - origin(x[i])) * (y[i] - origin(x[i]));
    ss_tot += (y[i] - mean_y) * (y[i] - mean_y);
  }
  origin.r2 = ss_tot > 0.0 ? 1.0 - ss_res / ss_tot : 1.0;
  return origin;
}

result<linear_fit> comm_model(const testbed& bed, std::size_t ag, std::size_t eg) {
  for (const comm_fit& c : bed.comm)
    if (c.ag == ag && c.eg == eg)
      return c.fit;
  if (bed.comm_default)
    return *bed.comm_default;
  return make_error(error_code::invalid_config,
                    "testbed '" + bed.name + "' has no 'comm' entry for ag " + std::to_string(ag) +
                        ", eg " + std::to_string(eg) + " and no 'comm_default'");
}

result<task_models> make_task_models(const model_shape& shape, const testbed& bed, std::size_t ag,
                                     std::size_t eg, std::size_t seq_len) {
  MOERT_TRY(validate(shape));
  if (ag == 0 || eg == 0)
    return make_error(error_code::invalid_argument, ag == 0 ? "ag must be positive" : "eg must be positive");
  if (seq_len == 0)
    return make_error(error_code::invalid_argument, "seq_len must be positive");
  auto comm = comm_model(bed, ag, eg);
  if (!comm)
    return comm.err();

  double s = double(seq_len);
  double m = double(shape.hidden);
  double experts_per_device = double((shape.num_experts + eg - 1) / eg);
  task_models t;

  double num_gemms = double(attention_gemms(shape).size());
  t.attention.alpha = num_gemms * bed.gemm.alpha + bed.attention.alpha;
  t.attention.beta = bed.gemm.beta * s * double(attention_params(shape)) +
                     bed.attention.beta * s * s * double(attention_core_macs_per_pair(shape));

  if (shape.num_shared > 0) {
    linear_fit one = bed.shared_expert.value_or(linear_fit{3 * bed.gemm.alpha, 3 * bed.gemm.beta});
    double n = double(shape.num_shared);
    t.shared.alpha = n * one.alpha;
    t.shared.beta = n * one.beta * s * m * double(shape.shared_intermediate);
  }

  t.expert.alpha = 3 * experts_per_device * bed.gemm.alpha;
  t.expert.beta = 3 * experts_per_device * bed.gemm.beta * m * double(shape.expert_intermediate);

  t.a2e.alpha = comm->alpha;
  t.a2e.beta = comm->beta * experts_per_device * m * double(shape.dtype_bytes);

  t.tokens_per_sample = double(ag) * double(shape.top_k) * s / double(shape.num_experts);
  return t;
}

stage_times stage_times_for(const task_models& models, double m_a, double m_e) {
  stage_times st;
  st.attention = models.attention(m_a);
  st.shared = models.shared(m_a);
  st.a2e = models.a2e(m_e);
  st.expert = models.expert(m_e);
  st.e2a = st.a2e;
  return st;
}

}  // namespace moert::policy
