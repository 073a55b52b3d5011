#include "core/error.hpp"

namespace moert {

const char* to_string(error_code code) {
  switch (code) {
    case error_code::invalid_argument:
      return "invalid argument";
    case error_code::invalid_config:
      return "invalid config";
    case error_code::invalid_checkpoint:
      return "invalid checkpoint";
    case error_code::io_error:
      return "I/O error";
    case error_code::unsupported:
      return "unsupported";
    case error_code::device_error:
      return "device error";
  }
  return "error";
}

std::string error::what() const {
  std::string out = to_string(code);
  out += ": ";
  out += message;
  return out;
}

}  // namespace moert
