#include "engine/fault_plan.hpp"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <iterator>

namespace moert {
namespace {

using json = nlohmann::json;

error fail(const std::string& source, const std::string& key, const std::string& what) {
  return make_error(error_code::invalid_config, source + ": '" + key + "' " + what);
}

status only_keys(const json& object, std::initializer_list<const char*> allowed, const std::string& source,
                 const std::string& path) {
  for (auto it = object.begin(); it != object.end(); ++it) {
    bool known = false;
    for (const char* key : allowed)
      known = known || it.key() == key;
    if (!known) {
      std::string list;
      for (const char* key : allowed)
        list += (list.empty() ? "" : ", ") + std::string{key};
      return fail(source, path + it.key(), "is not a fault plan key (expected one of: " + list + ")");
    }
  }
  return status::success();
}

std::string shortest(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

result<double> number(const json& object, const char* key, double fallback, double low, double high,
                      const std::string& source, const std::string& path) {
  auto it = object.find(key);
  if (it == object.end())
    return fallback;
  if (!it->is_number() || it->get<double>() < low || it->get<double>() > high)
    return fail(source, path + key,
                "must be a number from " + shortest(low) + " to " + shortest(high) + ", not " + it->dump());
  return it->get<double>();
}

result<std::uint64_t> integer(const json& object, const char* key, std::uint64_t fallback, std::uint64_t high,
                              const std::string& source, const std::string& path) {
  auto it = object.find(key);
  if (it == object.end())
    return fallback;
  if (!it->is_number_integer() || (it->is_number_integer() && !it->is_number_unsigned() && it->get<std::int64_t>() < 0) ||
      it->get<std::uint64_t>() > high)
    return fail(source, path + key, "must be an integer from 0 to " + std::to_string(high) + ", not " + it->dump());
  return it->get<std::uint64_t>();
}

result<fault_plan> parse(const json& root, const std::string& source) {
  if (!root.is_object())
    return make_error(error_code::invalid_config, source + ": a fault plan is a JSON object");
  MOERT_TRY(only_keys(root, {"seed", "drop", "duplicate", "reorder", "delay", "kill", "slow", "nodes", "retransmit"},
                      source, ""));
  fault_plan plan;
  auto seed = integer(root, "seed", 0, ~std::uint64_t{0}, source, "");
  MOERT_TRY(seed);
  plan.seed = *seed;
  auto probability = [&](const json& object, const char* key, const std::string& path, double& out) -> status {
    auto p = number(object, key, 0.0, 0.0, 1.0, source, path);
    MOERT_TRY(p);
    out = *p;
    return status::success();
  };
  MOERT_TRY(probability(root, "drop", "", plan.drop));
  MOERT_TRY(probability(root, "duplicate", "", plan.duplicate));
  MOERT_TRY(probability(root, "reorder", "", plan.reorder));
  if (auto it = root.find("delay"); it != root.end()) {
    if (!it->is_object())
      return fail(source, "delay", "must be an object {\"probability\": p, \"max_ms\": ms}");
    MOERT_TRY(only_keys(*it, {"probability", "max_ms"}, source, "delay."));
    MOERT_TRY(probability(*it, "probability", "delay.", plan.delay_probability));
    auto max_ms = number(*it, "max_ms", 0.0, 0.0, 60000.0, source, "delay.");
    MOERT_TRY(max_ms);
    plan.delay_max_ms = *max_ms;
  }
  double sum = plan.drop + plan.duplicate + plan.reorder + plan.delay_probability;
  if (sum > 1.0)
    return make_error(error_code::invalid_config,
                      source + ": drop + duplicate + reorder + delay.probability is " + shortest(sum) +
                          ", more than 1 (they are exclusive per message)");
  if (auto it = root.find("kill"); it != root.end()) {
    if (!it->is_array())
      return fail(source, "kill", "must be a list of {\"actor\", \"device\", \"after_messages\"}");
    for (std::size_t i = 0; i < it->size(); ++i) {
      const json& entry = (*it)[i];
      std::string path = "kill[" + std::to_string(i) + "].";
      if (!entry.is_object())
        return fail(source, path.substr(0, path.size() - 1), "must be an object");
      MOERT_TRY(only_keys(entry, {"actor", "device", "after_messages"}, source, path));
      transport::fault_kill kill;
      auto actor = entry.find("actor");
      if (actor == entry.end())
        return fail(source, path + "actor", "is missing (expert, attention or queue)");
      if (*actor == "expert")
        kill.actor = transport::fault_actor::expert;
      else if (*actor == "attention")
        kill.actor = transport::fault_actor::attention;
      else if (*actor == "queue")
        kill.actor = transport::fault_actor::queue;
      else
        return fail(source, path + "actor", "must be expert, attention or queue, not " + actor->dump());
      auto device = integer(entry, "device", 0, 4095, source, path);
      MOERT_TRY(device);
      kill.device = std::uint32_t(*device);
      auto after = integer(entry, "after_messages", 0, ~std::uint64_t{0} >> 1, source, path);
      MOERT_TRY(after);
      kill.after_messages = *after;
      plan.kill.push_back(kill);
    }
  }
  if (auto it = root.find("slow"); it != root.end()) {
    if (!it->is_array())
      return fail(source, "slow", "must be a list of {\"device\": \"expert:N\" or \"attention:N\", \"factor\"}");
    for (std::size_t i = 0; i < it->size(); ++i) {
      const json& entry = (*it)[i];
      std::string path = "slow[" + std::to_string(i) + "].";
      if (!entry.is_object())
        return fail(source, path.substr(0, path.size() - 1), "must be an object");
      MOERT_TRY(only_keys(entry, {"device", "factor"}, source, path));
      transport::fault_slow slow;
      auto device = entry.find("device");
      auto valid_device = [](const std::string& name) {
        for (std::string kind : {"expert:", "attention:"})
          if (name.size() > kind.size() && name.compare(0, kind.size(), kind) == 0 &&
              name.size() - kind.size() <= 4 &&
              name.find_first_not_of("0123456789", kind.size()) == std::string::npos)
            return true;
        return false;
      };
      if (device == entry.end() || !device->is_string() || !valid_device(device->get<std::string>()))
        return fail(source, path + "device",
                    "must be \"expert:N\" or \"attention:N\"" +
                        (device == entry.end() ? std::string{" (missing)"} : ", not " + device->dump()));
      slow.device = device->get<std::string>();
      auto factor = number(entry, "factor", 1.0, 1.0, 1000.0, source, path);
      MOERT_TRY(factor);
      slow.factor = *factor;
      plan.slow.push_back(slow);
    }
  }
  if (auto it = root.find("nodes"); it != root.end()) {
    if (!it->is_array())
      return fail(source, "nodes", "must be a list of {\"node\", \"signal\", \"after_messages\", \"for_ms\"}");
    for (std::size_t i = 0; i < it->size(); ++i) {
      const json& entry = (*it)[i];
      std::string path = "nodes[" + std::to_string(i) + "].";
      if (!entry.is_object())
        return fail(source, path.substr(0, path.size() - 1), "must be an object");
      MOERT_TRY(only_keys(entry, {"node", "signal", "after_messages", "for_ms"}, source, path));
      transport::fault_node fault;
      auto node = entry.find("node");
      if (node == entry.end() || !node->is_string() || node->get<std::string>().empty())
        return fail(source, path + "node",
                    "must be the name of a node of the cluster file" +
                        (node == entry.end() ? std::string{" (missing)"} : ", not " + node->dump()));
      fault.node = node->get<std::string>();
      auto signal = entry.find("signal");
      if (signal == entry.end())
        return fail(source, path + "signal", "is missing (kill or stop)");
      if (*signal == "kill")
        fault.signal = transport::fault_signal::kill;
      else if (*signal == "stop")
        fault.signal = transport::fault_signal::stop;
      else
        return fail(source, path + "signal", "must be kill or stop, not " + signal->dump());
      auto after = integer(entry, "after_messages", 0, ~std::uint64_t{0} >> 1, source, path);
      MOERT_TRY(after);
      fault.after_messages = *after;
      auto for_ms = integer(entry, "for_ms", 0, 3600000, source, path);
      MOERT_TRY(for_ms);
      fault.for_ms = *for_ms;
      if (fault.signal == transport::fault_signal::stop && fault.for_ms == 0)
        return fail(source, path + "for_ms", "must be given (1 to 3600000) for a stop: how long the node stays stopped");
      if (fault.signal == transport::fault_signal::kill && entry.contains("for_ms"))
        return fail(source, path + "for_ms", "applies to stop only, not kill");
      plan.nodes.push_back(fault);
    }
  }
  if (auto it = root.find("retransmit"); it != root.end()) {
    if (!it->is_object())
      return fail(source, "retransmit", "must be an object {\"ms\", \"max_ms\", \"max_retries\"}");
    MOERT_TRY(only_keys(*it, {"ms", "max_ms", "max_retries"}, source, "retransmit."));
    auto ms = number(*it, "ms", plan.retransmit_ms, 0.1, 600000.0, source, "retransmit.");
    MOERT_TRY(ms);
    plan.retransmit_ms = *ms;
    auto max_ms = number(*it, "max_ms", std::max(plan.retransmit_max_ms, plan.retransmit_ms), plan.retransmit_ms,
                         600000.0, source, "retransmit.");
    MOERT_TRY(max_ms);
    plan.retransmit_max_ms = *max_ms;
    auto retries = integer(*it, "max_retries", plan.max_retransmits, 1000, source, "retransmit.");
    MOERT_TRY(retries);
    plan.max_retransmits = std::uint32_t(*retries);
  }
  return plan;
}

}  // namespace

result<fault_plan> parse_fault_plan(const std::string& json_text, const std::string& source) {
  json root = json::parse(json_text, nullptr, false);
  if (root.is_discarded())
    return make_error(error_code::invalid_config, source + ": not valid JSON");
  return parse(root, source);
}

result<fault_plan> load_fault_plan(const std::string& path) {
  std::ifstream in{path};
  if (!in)
    return make_error(error_code::io_error, "cannot open fault file '" + path + "'");
  std::string text{std::istreambuf_iterator<char>{in}, std::istreambuf_iterator<char>{}};
  return parse_fault_plan(text, path);
}

std::string to_json(const fault_plan& plan) {
  json out;
  out["seed"] = plan.seed;
  out["drop"] = plan.drop;
  out["duplicate"] = plan.duplicate;
  out["reorder"] = plan.reorder;
  out["delay"] = {{"probability", plan.delay_probability}, {"max_ms", plan.delay_max_ms}};
  out["kill"] = json::array();
  for (const auto& k : plan.kill)
    out["kill"].push_back({{"actor", transport::to_string(k.actor)}, {"device", k.device},
                           {"after_messages", k.after_messages}});
  out["slow"] = json::array();
  for (const auto& s : plan.slow)
    out["slow"].push_back({{"device", s.device}, {"factor", s.factor}});
  out["nodes"] = json::array();
  for (const auto& n : plan.nodes) {
    json entry{{"node", n.node}, {"signal", transport::to_string(n.signal)}, {"after_messages", n.after_messages}};
    if (n.signal == transport::fault_signal::stop)
      entry["for_ms"] = n.for_ms;
    out["nodes"].push_back(entry);
  }
  out["retransmit"] = {{"ms", plan.retransmit_ms}, {"max_ms", plan.retransmit_max_ms},
                       {"max_retries", plan.max_retransmits}};
  return out.dump();
}

}  // namespace moert
