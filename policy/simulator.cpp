#include "policy/simulator.hpp"

#include "core/rng.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numeric>
#include <queue>

namespace moert::policy {

std::string_view to_string(graph_policy policy) {
  switch (policy) {
    case graph_policy::findep:
      return "findep";
    case graph_policy::pppipe:
      return "pppipe";
    case graph_policy::synchronous:
      return "synchronous";
  }
  return "?";
}

std::string_view to_string(resource r) {
  static constexpr std::string_view names[] = {"AG", "A2E", "EG", "E2A"};
  return names[std::size_t(r)];
}

std::string_view to_string(task_kind kind) {
  static constexpr std::string_view names[] = {"attention", "shared", "A2E", "expert", "E2A"};
  return names[std::size_t(kind)];
}

// -- task graph --------------------------------------------------------------------------------

namespace {

// Event-driven execution of the in-order task graph. Each resource walks its fixed task order;
// the head task starts once the resource is free and its predecessors have finished, and its
// completion is an event. Task ids: A and S by t·r1 + i; C, E, R by (t·r1 + i)·r2 + j, which is
// also their (lexicographic) position on the link and EG resources.
class graph_des {
public:
  explicit graph_des(const graph_config& c)
      : c_(c), num_mb_(c.num_layers * c.r1), num_chunks_(num_mb_ * c.r2), pending_a_(num_mb_),
        pending_s_(num_mb_, 1), pending_c_(num_chunks_), pending_e_(num_chunks_, 1),
        pending_r_(num_chunks_, 1) {
    bool after_shared = c.policy != graph_policy::findep;
    for (std::size_t t = 0; t < c.num_layers; ++t)
      for (std::size_t i = 0; i < c.r1; ++i) {
        std::size_t barrier = c.policy == graph_policy::synchronous && i > 0 ? 1 : 0;
        pending_a_[t * c.r1 + i] = std::uint32_t((t > 0 ? 1 + c.r2 : 0) + barrier);
      }
    std::fill(pending_c_.begin(), pending_c_.end(), after_shared ? 2 : 1);
  }

  graph_report run() {
    graph_report report;
    for (std::size_t r = 0; r < num_resources; ++r)
      try_start(resource(r), 0.0, report);
    while (!events_.empty()) {
      event ev = events_.top();
      events_.pop();
      report.makespan = std::max(report.makespan, ev.time);
      finish(ev.where);
      busy_[std::size_t(ev.where)] = false;
      ++cursor_[std::size_t(ev.where)];
      for (std::size_t r = 0; r < num_resources; ++r)
        try_start(resource(r), ev.time, report);
    }
    for (std::size_t r = 0; r < num_resources; ++r)
      report.idle[r] = report.makespan - report.busy[r];
    return report;
  }

  bool complete() const {
    return cursor_[0] == 2 * num_mb_ && cursor_[1] == num_chunks_ && cursor_[2] == num_chunks_ &&
           cursor_[3] == num_chunks_;
  }

private:
  struct event {
    double time;
    std::uint64_t seq;
    resource where;
    bool operator>(const event& o) const { return time != o.time ? time > o.time : seq > o.seq; }
  };

  // The AG's k-th task: (is_shared, micro-batch id t·r1 + i).
  std::pair<bool, std::size_t> ag_task(std::size_t k) const {
    std::size_t per_layer = 2 * c_.r1;
    std::size_t t = k / per_layer, pos = k % per_layer;
    // Synchronous execution runs each micro-batch to completion, so its AG order is ASAS.
    if (c_.order == segment_order::asas || c_.policy == graph_policy::synchronous)
      return {pos % 2 == 1, t * c_.r1 + pos / 2};
    return {pos >= c_.r1, t * c_.r1 + pos % c_.r1};
  }

  void try_start(resource where, double now, graph_report& report) {
    std::size_t r = std::size_t(where);
    if (busy_[r])
      return;
    std::size_t k = cursor_[r];
    double duration = 0.0;
    task_kind kind;
    std::size_t mb, chunk = 0;
    switch (where) {
      case resource::ag: {
        if (k >= 2 * num_mb_)
          return;
        auto [shared, id] = ag_task(k);
        if ((shared ? pending_s_ : pending_a_)[id] != 0)
          return;
        kind = shared ? task_kind::shared : task_kind::attention;
        duration = shared ? c_.times.shared : c_.times.attention;
        mb = id;
        break;
      }
      case resource::a2e:
      case resource::eg:
      case resource::e2a: {
        if (k >= num_chunks_)
          return;
        const auto& pending = where == resource::a2e ? pending_c_ : where == resource::eg ? pending_e_ : pending_r_;
        if (pending[k] != 0)
          return;
        kind = where == resource::a2e ? task_kind::a2e : where == resource::eg ? task_kind::expert : task_kind::e2a;
        duration = where == resource::a2e ? c_.times.a2e : where == resource::eg ? c_.times.expert : c_.times.e2a;
        mb = k / c_.r2;
        chunk = k % c_.r2;
        break;
      }
    }
    busy_[r] = true;
    report.busy[r] += duration;
    if (c_.record_tasks)
      report.tasks.push_back({where, kind, std::uint32_t(mb / c_.r1), std::uint32_t(mb % c_.r1),
                              std::uint32_t(chunk), now, now + duration});
    events_.push({now + duration, seq_++, where});
  }

  // Releases the successors of the task that `where` just finished.
  void finish(resource where) {
    std::size_t k = cursor_[std::size_t(where)];
    std::size_t r1 = c_.r1, r2 = c_.r2;
    switch (where) {
      case resource::ag: {
        auto [shared, id] = ag_task(k);
        std::size_t t = id / r1;
        if (!shared) {
          --pending_s_[id];
          for (std::size_t j = 0; j < r2; ++j)
            --pending_c_[id * r2 + j];
        } else {
          if (c_.policy != graph_policy::findep)
            for (std::size_t j = 0; j < r2; ++j)
              --pending_c_[id * r2 + j];
          if (t + 1 < c_.num_layers)
            --pending_a_[id + r1];
        }
        break;
      }
      case resource::a2e:
        --pending_e_[k];
        break;
      case resource::eg:
        --pending_r_[k];
        break;
      case resource::e2a: {
        std::size_t id = k / r2, t = id / r1, i = id % r1;
        if (t + 1 < c_.num_layers)
          --pending_a_[id + r1];
        if (c_.policy == graph_policy::synchronous && k % r2 == r2 - 1 && i + 1 < r1)
          --pending_a_[id + 1];
        break;
      }
    }
  }

  const graph_config& c_;
  std::size_t num_mb_, num_chunks_;
  std::vector<std::uint32_t> pending_a_, pending_s_, pending_c_, pending_e_, pending_r_;
  std::size_t cursor_[num_resources] = {};
  bool busy_[num_resources] = {};
  std::priority_queue<event, std::vector<event>, std::greater<>> events_;
  std::uint64_t seq_ = 0;
};

}  // namespace

result<graph_report> simulate_graph(const graph_config& c) {
  if (c.num_layers == 0 || c.r1 == 0 || c.r2 == 0)
    return make_error(error_code::invalid_argument, "simulate_graph: num_layers, r1 and r2 must be positive");
  const stage_times& st = c.times;
  for (double d : {st.attention, st.shared, st.a2e, st.expert, st.e2a})
    if (!(d >= 0.0) || !std::isfinite(d))
      return make_error(error_code::invalid_argument, "simulate_graph: task durations must be finite and >= 0");
  if (double(c.num_layers) * double(c.r1) * double(c.r2) > 5e7)
    return make_error(error_code::invalid_argument, "simulate_graph: more than 5e7 chunks");
  graph_des des{c};
  graph_report report = des.run();
  if (!des.complete())
    return make_error(error_code::invalid_argument, "simulate_graph: the task graph deadlocked");
  return report;
}

result<graph_report> simulate_plan(const findep_instance& inst, std::size_t m_a, std::size_t r1,
                                   std::size_t r2, segment_order order, graph_policy policy,
                                   bool record_tasks) {
  if (m_a == 0 || r1 == 0 || r2 == 0)
    return make_error(error_code::invalid_argument, "simulate_plan: m_a, r1 and r2 must be positive");
  graph_config c;
  c.num_layers = inst.num_layers;
  c.order = order;
  c.policy = policy;
  c.record_tasks = record_tasks;
  c.r1 = r1;
  c.r2 = policy == graph_policy::findep ? r2 : 1;
  std::size_t samples = m_a;
  if (policy == graph_policy::synchronous) {
    samples = r1 * m_a;
    c.r1 = 1;
  }
  c.times = stage_times_for(inst.tasks, double(samples), chunk_tokens(inst, samples, c.r2));
  return simulate_graph(c);
}

// -- skew --------------------------------------------------------------------------------------

result<expert_skew> parse_skew(std::string_view text) {
  expert_skew skew;
  auto colon = text.find(':');
  std::string_view kind = text.substr(0, colon);
  std::string_view arg = colon == std::string_view::npos ? std::string_view{} : text.substr(colon + 1);
  auto number = [](std::string_view s, double& out) {
    auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
    return ec == std::errc{} && end == s.data() + s.size();
  };
  if (kind == "uniform" && arg.empty())
    return skew;
  if (kind == "zipf" || kind == "exp" || kind == "exponential") {
    skew.kind = kind == "zipf" ? skew_kind::zipf : skew_kind::exponential;
    if (!number(arg, skew.param) || skew.param < 0)
      return make_error(error_code::invalid_argument,
                        "skew '" + std::string(text) + "': parameter must be a number >= 0");
    return skew;
  }
  if (kind == "weights") {
    skew.kind = skew_kind::explicit_weights;
    while (!arg.empty()) {
      auto comma = arg.find(',');
      double w = 0;
      if (!number(arg.substr(0, comma), w) || w < 0)
        return make_error(error_code::invalid_argument,
                          "skew '" + std::string(text) + "': weights must be numbers >= 0");
      skew.weights.push_back(w);
      arg = comma == std::string_view::npos ? std::string_view{} : arg.substr(comma + 1);
    }
    return skew;
  }
  return make_error(error_code::invalid_argument, "skew '" + std::string(text) +
                                                       "': expected uniform, zipf:S, exp:LAMBDA or weights:W,W,…");
}

result<std::vector<double>> expert_probabilities(const expert_skew& skew, std::size_t num_experts) {
  std::vector<double> p(num_experts, 1.0);
  for (std::size_t rank = 0; rank < num_experts; ++rank) {
    if (skew.kind == skew_kind::zipf)
      p[rank] = std::pow(double(rank + 1), -skew.param);
    else if (skew.kind == skew_kind::exponential)
      p[rank] = std::exp(-skew.param * double(rank));
  }
  if (skew.kind == skew_kind::explicit_weights) {
    if (skew.weights.size() != num_experts)
      return make_error(error_code::invalid_argument,
                        "skew weights: " + std::to_string(skew.weights.size()) + " given for " +
                            std::to_string(num_experts) + " experts");
    p = skew.weights;
  }
  double total = std::accumulate(p.begin(), p.end(), 0.0);
  if (!(total > 0.0))
    return make_error(error_code::invalid_argument, "skew weights: must not all be zero");
  for (double& v : p)
    v /= total;
  return p;
}

// -- asynchronous μ-queues -----------------------------------------------------------------------

namespace {

// Routing shared by the asynchronous and synchronous simulations: each (token, layer, iteration)
// draws its top-k experts without replacement (Gumbel-top-k) from the layer's probabilities, keyed
// by the seed so that draws never depend on event order.
class router {
public:
  static result<router> make(const async_config& c) {
    auto p = expert_probabilities(c.skew, c.num_experts);
    if (!p)
      return p.err();
    router r;
    r.c_ = &c;
    r.log_p_.resize(c.num_layers * c.num_experts);
    rng gen{mix64(c.seed ^ 0x736b6577ull)};
    std::vector<std::size_t> rank(c.num_experts);
    for (std::size_t layer = 0; layer < c.num_layers; ++layer) {
      std::iota(rank.begin(), rank.end(), 0);
      if (c.reshuffle_per_layer)
        for (std::size_t i = c.num_experts; i > 1; --i)
          std::swap(rank[i - 1], rank[gen.next_u64() % i]);
      for (std::size_t e = 0; e < c.num_experts; ++e)
        r.log_p_[layer * c.num_experts + rank[e]] = std::log((*p)[e]);
    }
    return r;
  }

  // Writes top_k distinct experts for the token into `out`.
  void route(std::size_t token, std::size_t layer, std::size_t iteration, std::vector<std::size_t>& out) {
    const async_config& c = *c_;
    keys_.resize(c.num_experts);
    std::uint64_t key = mix64(mix64(mix64(c.seed ^ token) ^ layer) ^ (iteration << 20));
    for (std::size_t e = 0; e < c.num_experts; ++e) {
      double u = (double((mix64(key + e) >> 11)) + 0.5) * 0x1.0p-53;
      keys_[e] = {log_p_[layer * c.num_experts + e] - std::log(-std::log(u)), e};
    }
    std::partial_sort(keys_.begin(), keys_.begin() + c.top_k, keys_.end(), std::greater<>());
    out.clear();
    for (std::size_t k = 0; k < c.top_k; ++k)
      out.push_back(keys_[k].second);
  }

private:
  const async_config* c_ = nullptr;
  std::vector<double> log_p_;
  std::vector<std::pair<double, std::size_t>> keys_;
};

status validate(const async_config& c) {
  auto bad = [](const std::string& what) { return make_error(error_code::invalid_argument, what); };
  if (c.num_attention_devices == 0 || c.num_expert_devices == 0)
    return bad("num_attention_devices and num_expert_devices must be positive");
  if (c.num_layers == 0 || c.num_iterations == 0 || c.sequences_per_device == 0)
    return bad("num_layers, num_iterations and sequences_per_device must be positive");
  if (c.num_experts == 0 || c.num_experts % c.num_expert_devices != 0)
    return bad("num_experts (" + std::to_string(c.num_experts) + ") must be a positive multiple of num_expert_devices");
  if (c.top_k == 0 || c.top_k > c.num_experts)
    return bad("top_k must be in 1..num_experts");
  return status::success();
}

std::int64_t to_ns(double ms) {
  return std::llround(ms * 1e6);
}

class async_des {
public:
  async_des(const async_config& c, router r)
      : c_(c), router_(std::move(r)), local_(c.num_experts / c.num_expert_devices),
        num_tokens_(c.num_attention_devices * c.sequences_per_device), pending_(num_tokens_, 0),
        iteration_(num_tokens_, 0), start_(num_tokens_, 0) {
    std::size_t num_devices = c.num_attention_devices + c.num_expert_devices;
    devices_.resize(num_devices);
    for (std::size_t d = 0; d < num_devices; ++d) {
      bool expert = d >= c.num_attention_devices;
      devices_[d].matrix = queue_matrix{c.num_layers, expert ? local_ : 1};
      devices_[d].tokens.resize(c.num_layers * (expert ? local_ : 1));
    }
  }

  async_report run() {
    for (std::size_t token = 0; token < num_tokens_; ++token) {
      std::size_t layer = c_.staggered_start ? mix64(c_.seed ^ (token << 8) ^ 0x5747) % c_.num_layers : 0;
      start_[token] = layer;
      enqueue(token / c_.sequences_per_device, layer, 0, token, 0.0);
    }
    for (std::size_t d = 0; d < c_.num_attention_devices; ++d)
      dispatch(d, 0.0);
    while (!events_.empty()) {
      event ev = events_.top();
      events_.pop();
      now_ = ev.time;
      if (ev.device_done)
        complete(ev.device);
      else
        deliver(ev);
    }
    return summarise();
  }

private:
  struct device {
    queue_matrix matrix{1, 1};
    std::vector<std::vector<std::uint32_t>> tokens;  // per (layer, local expert)
    bool busy = false;
    double busy_time = 0.0;
    std::size_t layer = 0, slot = 0;  // of the running batch
    std::vector<std::uint32_t> running;
  };
  struct event {
    double time;
    std::uint64_t seq;
    bool device_done;
    std::size_t device;
    std::size_t layer;
    std::vector<std::pair<std::uint32_t, std::uint32_t>> tokens;  // (slot, token)
    bool operator>(const event& o) const { return time != o.time ? time > o.time : seq > o.seq; }
  };

  void push(event ev) {
    ev.seq = seq_++;
    events_.push(std::move(ev));
  }

  void enqueue(std::size_t d, std::size_t layer, std::size_t slot, std::uint32_t token, double now) {
    device& dev = devices_[d];
    auto& list = dev.tokens[layer * dev.matrix.num_experts() + slot];
    std::size_t count = dev.matrix.tokens(layer, slot);
    dev.matrix.set(layer, slot, count + 1, count == 0 ? std::chrono::nanoseconds{to_ns(now)} : dev.matrix.oldest(layer, slot));
    list.push_back(token);
  }

  // An idle device drains the queue its policy picks, whole.
  void dispatch(std::size_t d, double now) {
    device& dev = devices_[d];
    if (dev.busy)
      return;
    auto choice = pick_queue(dev.matrix, c_.policy, c_.params, std::chrono::nanoseconds{to_ns(now)});
    if (!choice)
      return;
    dev.layer = choice->layer;
    dev.slot = choice->expert;
    dev.running = std::move(dev.tokens[dev.layer * dev.matrix.num_experts() + dev.slot]);
    dev.tokens[dev.layer * dev.matrix.num_experts() + dev.slot].clear();
    dev.matrix.set(dev.layer, dev.slot, 0);
    bool expert = d >= c_.num_attention_devices;
    double duration = (expert ? c_.expert : c_.attention)(double(dev.running.size()));
    dev.busy = true;
    dev.busy_time += duration;
    if (expert) {
      ++executions_;
      visits_ += dev.running.size();
    }
    if (c_.record_tasks)
      records_.push_back({std::uint32_t(d), expert, std::uint32_t(dev.layer),
                          std::uint32_t(dev.running.size()), now, now + duration});
    push({now + duration, 0, true, d, 0, {}});
  }

  void complete(std::size_t d) {
    device& dev = devices_[d];
    dev.busy = false;
    bool expert = d >= c_.num_attention_devices;
    std::size_t num_targets = expert ? c_.num_attention_devices : c_.num_expert_devices;
    std::vector<std::vector<std::pair<std::uint32_t, std::uint32_t>>> out(num_targets);
    for (std::uint32_t token : dev.running) {
      if (expert) {
        out[token / c_.sequences_per_device].push_back({0, token});
        continue;
      }
      router_.route(token, dev.layer, iteration_[token], experts_);
      pending_[token] = std::uint32_t(experts_.size());
      for (std::size_t e : experts_)
        out[e / local_].push_back({std::uint32_t(e % local_), token});
    }
    for (std::size_t target = 0; target < num_targets; ++target)
      if (!out[target].empty()) {
        double arrival = now_ + c_.transfer(double(out[target].size()));
        std::size_t to = expert ? target : c_.num_attention_devices + target;
        push({arrival, 0, false, to, dev.layer, std::move(out[target])});
      }
    dev.running.clear();
    dispatch(d, now_);
  }

  void deliver(const event& ev) {
    bool expert = ev.device >= c_.num_attention_devices;
    for (auto [slot, token] : ev.tokens) {
      if (expert) {
        enqueue(ev.device, ev.layer, slot, token, now_);
        continue;
      }
      if (--pending_[token] > 0)
        continue;  // top-K join: wait for every routed expert's output
      std::size_t next = ev.layer + 1 == c_.num_layers ? 0 : ev.layer + 1;
      if (next == start_[token] && ++iteration_[token] == c_.num_iterations)
        continue;
      enqueue(ev.device, next, 0, token, now_);
    }
    dispatch(ev.device, now_);
  }

  async_report summarise() {
    async_report r;
    r.makespan = now_;
    r.tokens = num_tokens_ * c_.num_iterations;
    r.throughput = r.makespan > 0 ? double(r.tokens) / r.makespan * 1e3 : 0.0;
    for (std::size_t d = 0; d < devices_.size(); ++d) {
      double idle = r.makespan > 0 ? 1.0 - devices_[d].busy_time / r.makespan : 0.0;
      (d < c_.num_attention_devices ? r.attention_idle : r.expert_idle) += idle;
    }
    r.attention_idle /= double(c_.num_attention_devices);
    r.expert_idle /= double(c_.num_expert_devices);
    r.expert_executions = executions_;
    r.mean_expert_batch = executions_ ? double(visits_) / double(executions_) : 0.0;
    r.fragmentation = double(executions_) / double(c_.num_iterations * c_.num_layers * c_.num_experts);
    r.tasks = std::move(records_);
    return r;
  }

  const async_config& c_;
  router router_;
  std::size_t local_;
  std::size_t num_tokens_;
  std::vector<std::uint32_t> pending_;
  std::vector<std::size_t> iteration_, start_;
  std::vector<device> devices_;
  std::priority_queue<event, std::vector<event>, std::greater<>> events_;
  std::uint64_t seq_ = 0;
  double now_ = 0.0;
  std::size_t executions_ = 0, visits_ = 0;
  std::vector<std::size_t> experts_;
  std::vector<device_record> records_;
};

}  // namespace

result<async_report> simulate_async(const async_config& c) {
  MOERT_TRY(validate(c));
  auto r = router::make(c);
  if (!r)
    return r.err();
  return async_des{c, std::move(*r)}.run();
}

result<async_config> with_decode_costs(async_config c, const model_shape& shape, const testbed& bed,
                                       std::size_t context) {
  MOERT_TRY(validate(shape));
  auto comm = comm_model(bed, c.num_attention_devices, c.num_expert_devices);
  if (!comm)
    return comm.err();
  double m = double(shape.hidden);
  c.num_layers = shape.num_moe_layers();
  c.num_experts = shape.num_experts;
  c.top_k = shape.top_k;
  c.attention.alpha = double(attention_gemms(shape).size()) * bed.gemm.alpha + bed.attention.alpha;
  c.attention.beta = bed.gemm.beta * double(attention_params(shape)) +
                     bed.attention.beta * double(context) * double(attention_core_macs_per_pair(shape));
  c.expert = {3 * bed.gemm.alpha, 3 * bed.gemm.beta * m * double(shape.expert_intermediate), 1.0};
  c.transfer = {comm->alpha, comm->beta * m * double(shape.dtype_bytes), 1.0};
  return c;
}

result<async_report> simulate_sync_ep(const async_config& c) {
  MOERT_TRY(validate(c));
  auto made = router::make(c);
  if (!made)
    return made.err();
  router& route = *made;
  std::size_t na = c.num_attention_devices, ne = c.num_expert_devices, local = c.num_experts / ne;
  std::size_t spd = c.sequences_per_device;
  std::vector<double> busy(na + ne, 0.0);
  std::vector<std::size_t> load(c.num_experts), a2e(na * ne), experts;
  async_report r;
  double now = 0.0;
  auto record = [&](std::size_t d, bool expert, std::size_t layer, std::size_t tokens, double start, double d_ms) {
    busy[d] += d_ms;
    if (c.record_tasks)
      r.tasks.push_back({std::uint32_t(d), expert, std::uint32_t(layer), std::uint32_t(tokens), start, start + d_ms});
  };
  for (std::size_t it = 0; it < c.num_iterations; ++it)
    for (std::size_t layer = 0; layer < c.num_layers; ++layer) {
      double phase = 0.0;
      for (std::size_t a = 0; a < na; ++a) {
        record(a, false, layer, spd, now, c.attention(double(spd)));
        phase = std::max(phase, c.attention(double(spd)));
      }
      now += phase;
      std::fill(load.begin(), load.end(), 0);
      std::fill(a2e.begin(), a2e.end(), 0);
      for (std::size_t token = 0; token < na * spd; ++token) {
        route.route(token, layer, it, experts);
        for (std::size_t e : experts) {
          ++load[e];
          ++a2e[(token / spd) * ne + e / local];
        }
      }
      double link = 0.0;
      for (std::size_t n : a2e)
        if (n > 0)
          link = std::max(link, c.transfer(double(n)));
      now += link;  // A2E; E2A carries the same counts back
      phase = 0.0;
      for (std::size_t d = 0; d < ne; ++d) {
        double t = 0.0;
        for (std::size_t e = d * local; e < (d + 1) * local; ++e)
          if (load[e] > 0) {
            record(na + d, true, layer, load[e], now + t, c.expert(double(load[e])));
            t += c.expert(double(load[e]));
            ++r.expert_executions;
          }
        phase = std::max(phase, t);
      }
      now += phase + link;
    }
  r.makespan = now;
  r.tokens = na * spd * c.num_iterations;
  r.throughput = double(r.tokens) / now * 1e3;
  for (std::size_t d = 0; d < na + ne; ++d)
    (d < na ? r.attention_idle : r.expert_idle) += 1.0 - busy[d] / now;
  r.attention_idle /= double(na);
  r.expert_idle /= double(ne);
  r.mean_expert_batch = double(r.tokens * c.num_layers * c.top_k) / double(r.expert_executions);
  r.fragmentation = double(r.expert_executions) / double(c.num_iterations * c.num_layers * c.num_experts);
  return r;
}

}  // namespace moert::policy
