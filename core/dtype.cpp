#include "core/dtype.hpp"

#include <cstring>

namespace moert {

std::size_t size_of(dtype type) {
  return type == dtype::f32 ? 4 : 2;
}

std::string_view safetensors_name(dtype type) {
  switch (type) {
    case dtype::f32:
      return "F32";
    case dtype::bf16:
      return "BF16";
    case dtype::f16:
      return "F16";
  }
  return "?";
}

std::optional<dtype> parse_safetensors_dtype(std::string_view name) {
  if (name == "F32")
    return dtype::f32;
  if (name == "BF16")
    return dtype::bf16;
  if (name == "F16")
    return dtype::f16;
  return std::nullopt;
}

float bf16_to_f32(std::uint16_t bits) {
  std::uint32_t wide = std::uint32_t{bits} << 16;
  float out;
  std::memcpy(&out, &wide, sizeof out);
  return out;
}

float f16_to_f32(std::uint16_t bits) {
  std::uint32_t sign = std::uint32_t{bits & 0x8000u} << 16;
  std::uint32_t exponent = (bits >> 10) & 0x1fu;
  std::uint32_t mantissa = bits & 0x3ffu;
  std::uint32_t out_bits;
  if (exponent == 0x1f) {  // inf / nan
    out_bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    out_bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    out_bits = sign;
  } else {  // subnormal: normalise the mantissa
    int shift = 0;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      ++shift;
    }
    mantissa &= 0x3ffu;
    out_bits = sign | (std::uint32_t(113 - shift) << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &out_bits, sizeof out);
  return out;
}

void convert_to_f32(dtype type, const void* src, std::size_t count, float* dst) {
  auto bytes = static_cast<const unsigned char*>(src);
  if (type == dtype::f32) {
    std::memcpy(dst, bytes, count * sizeof(float));
    return;
  }
  for (std::size_t i = 0; i < count; ++i) {
    std::uint16_t bits = std::uint16_t(bytes[2 * i] | (bytes[2 * i + 1] << 8));
    dst[i] = type == dtype::bf16 ? bf16_to_f32(bits) : f16_to_f32(bits);
  }
}

}  // namespace moert
