#pragma once

// How a device task tells its actor that it is done: as caf::anon_send would, but through
// the device's execution unit (device::completion_unit), so that a device_runnable actor
// handles it on the device thread right after the task instead of waiting for one of CAF's
// workers to wake up (actors/device.hpp says why that matters).
//
// Thread safety: any thread (the device thread, a pool thread of a concurrent task, a
// backend's callback thread).

#include "actors/device.hpp"

#include <caf/all.hpp>

#include <utility>

namespace moert::actors {

template <class... Ts>
void send_completion(device& dev, const caf::actor& dest, Ts&&... xs) {
  if (dest)
    dest->eq_impl(caf::make_message_id(), nullptr, dev.completion_unit(dest->home_system()), std::forward<Ts>(xs)...);
}

// As send_completion, with `sender` as the message's sender (what current_sender() says in
// dest's handler), as though `sender` had sent it from its own handler.
template <class... Ts>
void send_completion_from(device& dev, const caf::actor& sender, const caf::actor& dest, Ts&&... xs) {
  if (dest)
    dest->eq_impl(caf::make_message_id(), caf::actor_cast<caf::strong_actor_ptr>(sender),
                  dev.completion_unit(dest->home_system()), std::forward<Ts>(xs)...);
}

}  // namespace moert::actors
