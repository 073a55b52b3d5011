#include "transport/fault_injector.hpp"

namespace moert::transport {

namespace {

// splitmix64's finaliser: every input bit moves every output bit.
std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t hash_of(std::uint64_t seed, const message_identity& id) {
  std::uint64_t h = mix(seed);
  for (std::uint64_t field : {std::uint64_t(id.kind), std::uint64_t(id.shard), id.step, std::uint64_t(id.micro_batch),
                              std::uint64_t(id.layer), std::uint64_t(id.chunk), std::uint64_t(id.expert_device),
                              std::uint64_t(id.attempt), id.detail})
    h = mix(h ^ field);
  return h;
}

// A uniform double in [0, 1) from the top 53 bits.
double unit(std::uint64_t bits) {
  return double(bits >> 11) * 0x1.0p-53;
}

std::atomic<std::uint64_t> drops_for_testing{0};

// Takes one of the test seam's drops, if any are left.
bool take_test_drop() {
  std::uint64_t left = drops_for_testing.load(std::memory_order_relaxed);
  while (left > 0)
    if (drops_for_testing.compare_exchange_weak(left, left - 1))
      return true;
  return false;
}

}  // namespace

fault_plan without_faults() {
  fault_plan plan;
  plan.retransmit_ms = 1000.0;
  plan.retransmit_max_ms = 10000.0;
  plan.max_retransmits = 60;
  return plan;
}

void fault_injector::drop_next_for_testing(std::uint64_t n) {
  drops_for_testing.store(n);
}

const char* to_string(fault_actor actor) {
  switch (actor) {
    case fault_actor::expert: return "expert";
    case fault_actor::attention: return "attention";
    case fault_actor::queue: return "queue";
  }
  return "?";
}

const char* to_string(fault_action action) {
  switch (action) {
    case fault_action::deliver: return "deliver";
    case fault_action::drop: return "drop";
    case fault_action::duplicate: return "duplicate";
    case fault_action::reorder: return "reorder";
    case fault_action::delay: return "delay";
  }
  return "?";
}

const char* to_string(fault_signal signal) {
  return signal == fault_signal::kill ? "kill" : "stop";
}

fault_injector::fault_injector(fault_plan plan)
    : plan_(std::move(plan)),
      fired_(plan_.kill.size()),
      disarmed_(plan_.kill.size(), false),
      node_fired_(plan_.nodes.size()) {}

void fault_injector::disarm_kills(fault_actor actor, std::uint32_t device) {
  for (std::size_t i = 0; i < plan_.kill.size(); ++i)
    if (plan_.kill[i].actor == actor && plan_.kill[i].device == device)
      disarmed_[i] = true;
}

void fault_injector::watch_node(const std::string& name) {
  own_nodes_.clear();
  for (std::size_t i = 0; i < plan_.nodes.size(); ++i)
    if (plan_.nodes[i].node == name)
      own_nodes_.push_back(i);
}

std::optional<fault_node> fault_injector::node_fault_due() {
  if (own_nodes_.empty())
    return std::nullopt;
  std::uint64_t sent = messages_.load();
  for (std::size_t i : own_nodes_)
    if (sent >= plan_.nodes[i].after_messages && !node_fired_[i].exchange(true))
      return plan_.nodes[i];
  return std::nullopt;
}

fault_decision fault_injector::decide(const message_identity& id) const {
  if (!plan_.message_faults())
    return {};
  std::uint64_t h = hash_of(plan_.seed, id);
  // One draw picks the action (the probabilities partition [0, 1)), a second the delay.
  double u = unit(h);
  double edge = plan_.drop;
  if (u < edge)
    return {fault_action::drop, 0.0};
  if (u < (edge += plan_.duplicate))
    return {fault_action::duplicate, 0.0};
  if (u < (edge += plan_.reorder))
    return {fault_action::reorder, 0.0};
  if (u < (edge += plan_.delay_probability))
    return {fault_action::delay, unit(mix(h)) * plan_.delay_max_ms};
  return {};
}

fault_decision fault_injector::decide_and_count(const message_identity& id) {
  fault_decision d = take_test_drop() ? fault_decision{fault_action::drop, 0.0} : decide(id);
  ++messages_;
  switch (d.action) {
    case fault_action::deliver: break;
    case fault_action::drop: ++dropped_; break;
    case fault_action::duplicate: ++duplicated_; break;
    case fault_action::reorder: ++reordered_; break;
    case fault_action::delay: ++delayed_; break;
  }
  return d;
}

bool fault_injector::watches(fault_actor actor, std::uint32_t device) const {
  for (const fault_kill& k : plan_.kill)
    if (k.actor == actor && k.device == device)
      return true;
  return false;
}

std::optional<fault_kill> fault_injector::kill_due(fault_actor actor, std::uint32_t device, std::uint64_t messages) {
  for (std::size_t i = 0; i < plan_.kill.size(); ++i) {
    const fault_kill& k = plan_.kill[i];
    if (k.actor == actor && k.device == device && messages >= k.after_messages && !disarmed_[i] &&
        !fired_[i].exchange(true))
      return k;
  }
  return std::nullopt;
}

std::string fault_injector::kills_text(fault_actor actor, std::uint32_t device) const {
  std::string out;
  for (std::size_t i = 0; i < plan_.kill.size(); ++i) {
    const fault_kill& k = plan_.kill[i];
    if (k.actor == actor && k.device == device && fired_[i].load())
      out += (out.empty() ? "" : "; ") + std::string{"the fault injector killed the "} + to_string(actor) +
             " actor of device " + std::to_string(device) + " after " + std::to_string(k.after_messages) + " messages";
  }
  return out;
}

double fault_injector::slowdown(std::string_view kind, std::size_t index) const {
  std::string name = std::string{kind} + ":" + std::to_string(index);
  double factor = 1.0;
  for (const fault_slow& s : plan_.slow)
    if (s.device == name)
      factor *= s.factor;
  return factor;
}

fault_counts fault_injector::counts() const {
  fault_counts c;
  c.messages = messages_;
  c.dropped = dropped_;
  c.duplicated = duplicated_;
  c.reordered = reordered_;
  c.delayed = delayed_;
  for (const auto& fired : fired_)
    c.killed += fired.load();
  c.retransmitted = retransmitted_;
  c.ignored_e2a = ignored_e2a_;
  c.failed_batches = failed_batches_;
  return c;
}

}  // namespace moert::transport
