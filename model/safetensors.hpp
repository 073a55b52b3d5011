#pragma once

// A validated, memory-mapped reader for Hugging Face safetensors checkpoints: a single
// `model.safetensors`, or shards listed by `model.safetensors.index.json`.
//
// Every file is untrusted input. open() checks, before any tensor is used: the 8-byte header
// length lies inside the file; the header is well-formed JSON of the expected shape; each
// dtype is known (F32, BF16, F16); shape products and byte sizes are computed with overflow
// checks and equal the tensor's byte range; ranges lie inside the data area and do not
// overlap; an index names only files that exist, and every tensor it lists is in the shard
// it names. Every rejection names the file and, where there is one, the tensor.
//
// Ownership: a checkpoint owns its mappings; tensor_view pointers live as long as it does.
// Thread safety: immutable after open(); const members may be called from any thread.

#include "core/dtype.hpp"
#include "core/error.hpp"

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moert::model {

struct tensor_view {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  const std::byte* data = nullptr;  // inside the file mapping, not necessarily aligned
  std::size_t num_bytes = 0;
  std::size_t num_elements = 0;
  std::filesystem::path file;  // the shard holding it, for error messages
};

class mapped_file;  // private: one read-only mmap

class checkpoint {
public:
  // `path` is a checkpoint directory (model.safetensors.index.json preferred, else
  // model.safetensors) or a single .safetensors file.
  static result<checkpoint> open(const std::filesystem::path& path);

  checkpoint(checkpoint&&) noexcept;
  checkpoint& operator=(checkpoint&&) noexcept;
  ~checkpoint();

  // Null when absent.
  const tensor_view* find(const std::string& name) const;
  const std::map<std::string, tensor_view>& tensors() const { return tensors_; }

  // The tensor, after checking it exists and has exactly `expected_shape`.
  // Errors name the tensor, its file and both shapes.
  result<const tensor_view*> view(const std::string& name,
                                  const std::vector<std::int64_t>& expected_shape) const;

  // The tensor upcast to f32, checked as by view().
  result<std::vector<float>> read_f32(const std::string& name,
                                      const std::vector<std::int64_t>& expected_shape) const;

  // Drops this process's resident pages of `view`'s bytes (and of the pages it shares with
  // neighbours), so a loader that has copied a tensor does not hold it twice. The bytes stay
  // readable: the mapping is private and never written, so a later read faults them back in
  // from the file. Only memory use changes.
  void release(const tensor_view& view) const;

private:
  checkpoint() = default;

  std::filesystem::path root_;  // what open() was given, for error messages
  std::vector<std::unique_ptr<mapped_file>> files_;
  std::map<std::string, tensor_view> tensors_;
};

// "[2, 3]"
std::string shape_string(const std::vector<std::int64_t>& shape);

}  // namespace moert::model
