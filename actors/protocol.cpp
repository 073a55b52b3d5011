#include "actors/protocol.hpp"

namespace moert::actors {

void register_message_types(caf::actor_system_config& config) {
  config.add_message_type<admit_request>("moert::admit_request");
  config.add_message_type<request_ended>("moert::request_ended");
  config.add_message_type<token_event>("moert::token_event");
  config.add_message_type<routed_tokens>("moert::routed_tokens");
  config.add_message_type<expert_outputs>("moert::expert_outputs");
  config.add_message_type<plan_update>("moert::plan_update");
  config.add_message_type<shape_report>("moert::shape_report");
  config.add_message_type<scheduler_update>("moert::scheduler_update");
  config.add_message_type<std::vector<caf::actor>>("std::vector<caf::actor>");
}

}  // namespace moert::actors
