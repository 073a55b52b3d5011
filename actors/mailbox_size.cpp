#include "actors/mailbox_size.hpp"

#include <caf/scheduled_actor.hpp>

namespace moert::actors {

std::size_t mailbox_size(caf::scheduled_actor& self) {
  return self.mailbox().size();
}

}  // namespace moert::actors
