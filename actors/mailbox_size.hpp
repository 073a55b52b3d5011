#pragma once

#include <cstddef>

namespace caf {
class scheduled_actor;
}

namespace moert::actors {

// How many messages wait in `self`'s mailbox, read by the actor itself while it handles one
// (runtime_stats::note_mailbox). Only from `self`'s own handler: CAF's inbox is single-reader.
//
// In a translation unit of its own because CAF 0.17's intrusive queues downcast their sentinel
// node to a mailbox_element (task_queue::promote); inside libcaf_core that is not instrumented,
// but instantiated in our code UBSan's vptr check stops on it, so this file is built without it
// under MOERT_SANITIZE (actors/CMakeLists.txt) and nothing else calls mailbox().size().
std::size_t mailbox_size(caf::scheduled_actor& self);

}  // namespace moert::actors
