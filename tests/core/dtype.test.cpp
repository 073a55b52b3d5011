#include <catch2/catch.hpp>

#include "core/dtype.hpp"

#include <cmath>
#include <cstring>

using namespace moert;

TEST_CASE("bf16 and f16 upcast exactly") {
  CHECK(bf16_to_f32(0x3f80) == 1.0f);
  CHECK(bf16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x3c00) == 1.0f);
  CHECK(f16_to_f32(0xc000) == -2.0f);
  CHECK(f16_to_f32(0x7bff) == 65504.0f);
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
  CHECK(f16_to_f32(0x03ff) == std::ldexp(1023.0f, -24));  // largest subnormal
  CHECK(std::isinf(f16_to_f32(0x7c00)));
  CHECK(std::isnan(f16_to_f32(0x7e00)));
  CHECK(std::signbit(f16_to_f32(0x8000)));
}

TEST_CASE("every f16 value round-trips through f32 with its own value") {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    float f = f16_to_f32(std::uint16_t(bits));
    if (std::isnan(f))
      continue;
    // f16 has 11 significant bits: the f32 must have no more.
    std::uint32_t raw;
    std::memcpy(&raw, &f, 4);
    if (f != 0.0f && std::fabs(f) >= std::ldexp(1.0f, -14))
      CHECK((raw & 0x1fff) == 0);
  }
}

TEST_CASE("dtype names follow safetensors") {
  CHECK(parse_safetensors_dtype("BF16") == dtype::bf16);
  CHECK(parse_safetensors_dtype("F64") == std::nullopt);
  CHECK(size_of(dtype::f16) == 2);
  unsigned char bytes[4] = {0x80, 0x3f, 0x00, 0xc0};
  float out[2];
  convert_to_f32(dtype::bf16, bytes, 2, out);
  CHECK(out[0] == 1.0f);
  CHECK(out[1] == -2.0f);
}
