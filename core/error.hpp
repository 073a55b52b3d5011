#pragma once

// Errors of the lower layers (core, model, gpu, transport): a value, never an exception
// across a layer boundary. A message always names the thing that is wrong (file, tensor,
// field, token id) so the CLI can print it as one line.

#include <cassert>
#include <string>
#include <utility>
#include <variant>

namespace moert {

enum class error_code {
  invalid_argument,  // a caller passed a value outside the documented range
  invalid_config,    // config.json (or a moert config) is malformed or unsupported
  invalid_checkpoint,  // a safetensors file or its index is malformed
  io_error,          // a file could not be opened, read or mapped
  unsupported,       // well-formed, but a feature moert does not implement
  device_error,      // a device (GPU) call failed, or no such device is present
};

const char* to_string(error_code code);

struct error {
  error_code code;
  std::string message;

  // "invalid checkpoint: <message>"
  std::string what() const;
};

inline error make_error(error_code code, std::string message) {
  return error{code, std::move(message)};
}

// An expected-like result: either a value or an error. Cheap to move; not thread-safe.
template <class T>
class [[nodiscard]] result {
public:
  result(T value) : storage_(std::move(value)) {}
  result(error err) : storage_(std::move(err)) {}

  bool ok() const { return storage_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & {
    assert(ok());
    return std::get<0>(storage_);
  }
  const T& value() const& {
    assert(ok());
    return std::get<0>(storage_);
  }
  T&& value() && {
    assert(ok());
    return std::get<0>(std::move(storage_));
  }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  const error& err() const {
    assert(!ok());
    return std::get<1>(storage_);
  }

private:
  std::variant<T, error> storage_;
};

// A result without a value.
class [[nodiscard]] status {
public:
  status() = default;
  status(error err) : err_(std::move(err)), failed_(true) {}

  static status success() { return {}; }
  bool ok() const { return !failed_; }
  explicit operator bool() const { return ok(); }
  const error& err() const {
    assert(failed_);
    return err_;
  }

private:
  error err_{error_code::invalid_argument, {}};
  bool failed_ = false;
};

}  // namespace moert

// Propagates a failed result/status from the enclosing function.
#define MOERT_TRY(expr)                  \
  do {                                   \
    auto&& moert_try_result_ = (expr);   \
    if (!moert_try_result_.ok())         \
      return moert_try_result_.err();    \
  } while (false)
