#pragma once

// Element types of stored tensors. Compute is always f32: bf16 and f16 weights are upcast
// exactly (every bf16/f16 value is representable in f32) when loaded.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moert {

enum class dtype { f32, bf16, f16 };

// Bytes per element.
std::size_t size_of(dtype type);

// Name as safetensors writes it: "F32", "BF16", "F16".
std::string_view safetensors_name(dtype type);

// Parses a safetensors dtype name; nullopt for anything moert cannot load.
std::optional<dtype> parse_safetensors_dtype(std::string_view name);

// Exact conversions to f32 (NaN payloads aside).
float bf16_to_f32(std::uint16_t bits);
float f16_to_f32(std::uint16_t bits);

// Upcasts `count` little-endian elements at `src` (any alignment) to f32.
void convert_to_f32(dtype type, const void* src, std::size_t count, float* dst);

}  // namespace moert
