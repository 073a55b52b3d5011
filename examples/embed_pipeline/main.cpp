// A serving pipeline that embeds moert: client threads submit requests to one Engine and
// collect each request's tokens. Then it checks moert's promise: the same requests on a
// differently placed engine (other device counts, plan and scheduler) give the same tokens.
#include <moert/engine.hpp>

#include <cstdio>
#include <thread>
#include <vector>

namespace {

// A small synthetic qwen3_moe-style model: weights are generated from EngineConfig::weight_seed.
const char* model_json = R"({"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 128,
  "norm_topk_prob": true})";

using Tokens = std::vector<std::int32_t>;

// Serves `requests` from two client threads; returns each request's tokens (empty on error).
std::vector<Tokens> serve(const moert::EngineConfig& config, const std::vector<moert::Request>& requests) {
  auto engine = moert::Engine::create(config);
  if (!engine.ok()) {
    std::fprintf(stderr, "engine: %s\n", engine.err().what().c_str());
    return {};
  }
  std::vector<std::shared_ptr<moert::TokenStream>> streams(requests.size());
  std::vector<std::thread> clients;
  for (std::size_t c = 0; c < 2; ++c)
    clients.emplace_back([&, c] {
      for (std::size_t i = c; i < requests.size(); i += 2)
        streams[i] = (*engine)->submit(requests[i]);
    });
  for (auto& client : clients)
    client.join();
  std::vector<Tokens> out;
  for (auto& stream : streams) {
    auto tokens = stream->wait();
    if (!tokens.ok())
      std::fprintf(stderr, "request failed: %s\n", tokens.err().message.c_str());
    out.push_back(tokens.ok() ? *tokens : Tokens{});
  }
  (*engine)->shutdown();
  auto report = (*engine)->report();
  std::printf("  %zu attention + %zu expert devices: %llu tokens, mean expert batch %.1f\n",
              config.attention_devices, config.expert_devices, (unsigned long long)report.tokens,
              report.expert_batch_mean);
  return out;
}

}  // namespace

int main() {
  // Fixed ids: sampling is keyed by the request id, so both runs draw the same random numbers.
  std::vector<moert::Request> requests;
  for (std::uint64_t i = 0; i < 6; ++i) {
    moert::Request r;
    r.id = i + 1;
    r.prompt = {1, std::int32_t(10 * i + 2), 3, 4};
    r.max_new_tokens = 8;
    if (i % 2 == 1)
      r.sampling = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 7};
    requests.push_back(r);
  }

  moert::EngineConfig first;  // 1 attention + 2 expert devices, the default plan
  first.synthetic_config = model_json;
  first.expert_devices = 2;
  moert::EngineConfig second = first;  // 2 attention + 1 expert device, 2 micro-batches
  second.attention_devices = 2;
  second.expert_devices = 1;
  second.plan = {.r1 = 2, .m_a = 0, .r2 = 2, .order = moert::policy::segment_order::aass};
  second.scheduler = moert::policy::queue_policy::mtfs;

  std::printf("embed_pipeline: %zu requests from 2 client threads\n", requests.size());
  auto got = serve(first, requests);
  auto again = serve(second, requests);
  bool same = got.size() == requests.size() && got == again;
  for (std::size_t i = 0; i < got.size(); ++i) {
    std::printf("  request %zu:", i + 1);
    for (auto t : got[i])
      std::printf(" %d", t);
    std::printf(i < again.size() && got[i] == again[i] && !got[i].empty() ? "\n" : "  MISMATCH\n");
    same = same && !got[i].empty();
  }
  std::printf("embed_pipeline: tokens %s across placements\n", same ? "identical" : "DIFFER");
  return same ? 0 : 1;
}
