#pragma once

// In-repository spelling of the public API (<moert/engine.hpp>), plus the model's weights
// for the callers here that build them (EngineConfig::weights).

#include <moert/engine.hpp>

#include "model/weights.hpp"
