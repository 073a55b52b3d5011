#include "model/safetensors.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <system_error>
#include <utility>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moert::model {

namespace fs = std::filesystem;
using json = nlohmann::json;

// One read-only mapping of a whole file. An empty file is not mapped (mmap rejects length 0):
// data() is then null and size() 0, and the header check rejects it as too short.
class mapped_file {
public:
  static result<std::unique_ptr<mapped_file>> open(const fs::path& path);

  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file() {
    if (base_ != nullptr)
      ::munmap(base_, size_);
  }

  const std::byte* data() const { return static_cast<const std::byte*>(base_); }
  std::size_t size() const { return size_; }

private:
  mapped_file(void* base, std::size_t size) : base_(base), size_(size) {}

  void* base_;
  std::size_t size_;
};

result<std::unique_ptr<mapped_file>> mapped_file::open(const fs::path& path) {
  auto io_failure = [&](const char* what) {
    return make_error(error_code::io_error,
                      path.string() + ": " + what + ": " + std::strerror(errno));
  };
  // O_NONBLOCK so that a FIFO posing as a checkpoint cannot hang open(); it is then
  // rejected as not a regular file.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0)
    return io_failure("cannot open");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    auto err = io_failure("cannot stat");
    ::close(fd);
    return err;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return make_error(error_code::io_error, path.string() + ": not a regular file");
  }
  auto size = static_cast<std::size_t>(st.st_size);
  void* base = nullptr;
  if (size != 0) {
    base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
      auto err = io_failure("cannot mmap");
      ::close(fd);
      return err;
    }
  }
  ::close(fd);  // the mapping keeps the file alive
  return std::unique_ptr<mapped_file>(new mapped_file(base, size));
}

namespace {

// Same limit as the reference implementation: a header this large is not a checkpoint.
constexpr std::uint64_t max_header_bytes = std::uint64_t{100} << 20;

error bad(const fs::path& file, const std::string& what) {
  return make_error(error_code::invalid_checkpoint, file.string() + ": " + what);
}

error bad_tensor(const fs::path& file, const std::string& name, const std::string& what) {
  return bad(file, "tensor '" + name + "': " + what);
}

std::string range_string(std::uint64_t begin, std::uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// nlohmann stores non-negative integers as unsigned and negative ones as signed.
bool is_negative_integer(const json& v) {
  return v.is_number_integer() && !v.is_number_unsigned();
}

struct parsed_tensor {
  tensor_view view;
  std::uint64_t begin = 0;  // offsets inside the data area, kept for the overlap check
  std::uint64_t end = 0;
};

result<parsed_tensor> parse_entry(const fs::path& path, const std::string& name,
                                  const json& entry, const std::byte* data_area,
                                  std::uint64_t data_size) {
  if (!entry.is_object())
    return bad_tensor(path, name, "entry is not a JSON object");

  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string())
    return bad_tensor(path, name, "missing or non-string \"dtype\"");
  const auto& dtype_name = dtype_it->get_ref<const std::string&>();
  auto type = parse_safetensors_dtype(dtype_name);
  if (!type)
    return bad_tensor(path, name, "unsupported dtype '" + dtype_name + "'");

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array())
    return bad_tensor(path, name, "missing or non-array \"shape\"");
  parsed_tensor out;
  out.view.name = name;
  out.view.type = *type;
  out.view.file = path;
  std::uint64_t elements = 1;
  for (const json& dim : *shape_it) {
    if (is_negative_integer(dim))
      return bad_tensor(path, name, "negative dimension in \"shape\"");
    if (!dim.is_number_unsigned())
      return bad_tensor(path, name, "\"shape\" holds a non-integer");
    auto d = dim.get<std::uint64_t>();
    if (d > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
      return bad_tensor(path, name, "dimension " + std::to_string(d) + " is too large");
    if (__builtin_mul_overflow(elements, d, &elements))
      return bad_tensor(path, name, "element count of \"shape\" overflows 64 bits");
    out.view.shape.push_back(static_cast<std::int64_t>(d));
  }
  std::uint64_t bytes = 0;
  if (__builtin_mul_overflow(elements, std::uint64_t(size_of(*type)), &bytes))
    return bad_tensor(path, name, "byte size of shape " + shape_string(out.view.shape) +
                                      " overflows 64 bits");

  auto offsets_it = entry.find("data_offsets");
  if (offsets_it == entry.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned())
    return bad_tensor(path, name,
                      "\"data_offsets\" must be two non-negative integers [begin, end]");
  auto begin = (*offsets_it)[0].get<std::uint64_t>();
  auto end = (*offsets_it)[1].get<std::uint64_t>();
  std::string range = "data_offsets " + range_string(begin, end);
  if (begin > end)
    return bad_tensor(path, name, range + " begin after end");
  if (end > data_size)
    return bad_tensor(path, name, range + " end past the data area (" +
                                      std::to_string(data_size) + " bytes)");
  if (end - begin != bytes)
    return bad_tensor(path, name, range + " span " + std::to_string(end - begin) +
                                      " bytes but shape " + shape_string(out.view.shape) +
                                      " of " + dtype_name + " needs " + std::to_string(bytes));

  out.view.data = data_area + begin;
  out.view.num_bytes = bytes;
  out.view.num_elements = elements;
  out.begin = begin;
  out.end = end;
  return out;
}

// Two tensors may not share a byte. Empty tensors occupy no bytes, so they never overlap.
status check_overlaps(const fs::path& path, std::vector<parsed_tensor>& tensors) {
  std::vector<const parsed_tensor*> by_begin;
  for (const auto& t : tensors)
    if (t.end > t.begin)
      by_begin.push_back(&t);
  std::sort(by_begin.begin(), by_begin.end(),
            [](const parsed_tensor* a, const parsed_tensor* b) { return a->begin < b->begin; });
  // Sorted and pairwise disjoint so far, so the previous range has the largest end.
  for (std::size_t i = 1; i < by_begin.size(); ++i) {
    const auto& prev = *by_begin[i - 1];
    const auto& cur = *by_begin[i];
    if (cur.begin < prev.end)
      return bad(path, "tensor '" + cur.view.name + "' data_offsets " +
                           range_string(cur.begin, cur.end) + " overlap tensor '" +
                           prev.view.name + "' data_offsets " +
                           range_string(prev.begin, prev.end));
  }
  return status::success();
}

// Validates one file's header and returns views into its data area.
result<std::vector<parsed_tensor>> parse_shard(const mapped_file& file, const fs::path& path) {
  const std::uint64_t size = file.size();
  if (size < 8)
    return bad(path, "file is " + std::to_string(size) +
                         " bytes, too short for the 8-byte header length");
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i)
    header_len = (header_len << 8) | std::to_integer<std::uint64_t>(file.data()[i]);
  if (header_len > size - 8)
    return bad(path, "header length " + std::to_string(header_len) +
                         " runs past the end of the file (" + std::to_string(size) + " bytes)");
  if (header_len > max_header_bytes)
    return bad(path, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                         std::to_string(max_header_bytes) + " bytes");

  const auto* header = reinterpret_cast<const char*>(file.data() + 8);
  json root = json::parse(header, header + header_len, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded())
    return bad(path, "header is not valid JSON");
  if (!root.is_object())
    return bad(path, "header is not a JSON object");

  const std::byte* data_area = file.data() + 8 + header_len;
  const std::uint64_t data_size = size - 8 - header_len;
  std::vector<parsed_tensor> tensors;
  for (const auto& item : root.items()) {
    if (item.key() == "__metadata__") {
      if (!item.value().is_object())
        return bad(path, "\"__metadata__\" is not a JSON object");
      for (const auto& meta : item.value().items())
        if (!meta.value().is_string())
          return bad(path, "\"__metadata__\" value for '" + meta.key() + "' is not a string");
      continue;
    }
    auto tensor = parse_entry(path, item.key(), item.value(), data_area, data_size);
    if (!tensor)
      return tensor.err();
    tensors.push_back(std::move(*tensor));
  }
  MOERT_TRY(check_overlaps(path, tensors));
  return tensors;
}

// A shard must live in the checkpoint directory itself: no separators, no "." or "..",
// so an index cannot point outside it.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string("/\\\0", 3)) == std::string::npos;
}

}  // namespace

checkpoint::checkpoint(checkpoint&&) noexcept = default;
checkpoint& checkpoint::operator=(checkpoint&&) noexcept = default;
checkpoint::~checkpoint() = default;

result<checkpoint> checkpoint::open(const fs::path& path) try {
  checkpoint ck;
  ck.root_ = path;

  // Maps and validates one file, then adds its tensors; a name in two files is an error.
  auto add_file = [&ck](const fs::path& file) -> result<std::set<std::string>> {
    auto mapped = mapped_file::open(file);
    if (!mapped)
      return mapped.err();
    auto parsed = parse_shard(**mapped, file);
    if (!parsed)
      return parsed.err();
    std::set<std::string> names;
    for (auto& t : *parsed) {
      auto [it, inserted] = ck.tensors_.emplace(t.view.name, t.view);
      if (!inserted)
        return bad(file, "tensor '" + t.view.name + "' is also in " + it->second.file.string());
      names.insert(t.view.name);
    }
    ck.files_.push_back(std::move(*mapped));
    return names;
  };

  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    MOERT_TRY(add_file(path));
    return ck;
  }
  if (!fs::is_directory(path, ec))
    return make_error(error_code::io_error,
                      path.string() + ": no such checkpoint file or directory");

  const fs::path index_path = path / "model.safetensors.index.json";
  if (!fs::exists(index_path, ec)) {
    const fs::path single = path / "model.safetensors";
    if (!fs::exists(single, ec))
      return make_error(error_code::io_error,
                        path.string() +
                            ": holds neither model.safetensors.index.json nor model.safetensors");
    MOERT_TRY(add_file(single));
    return ck;
  }

  std::ifstream in(index_path, std::ios::binary);
  if (!in)
    return make_error(error_code::io_error, index_path.string() + ": cannot open");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (in.bad())
    return make_error(error_code::io_error, index_path.string() + ": cannot read");
  json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded())
    return bad(index_path, "not valid JSON");
  if (!index.is_object())
    return bad(index_path, "not a JSON object");
  auto map_it = index.find("weight_map");
  if (map_it == index.end() || !map_it->is_object())
    return bad(index_path, "missing or non-object \"weight_map\"");

  std::map<std::string, std::vector<std::string>> listed;  // shard -> tensors it should hold
  for (const auto& item : map_it->items()) {
    if (!item.value().is_string())
      return bad(index_path, "weight_map entry for tensor '" + item.key() + "' is not a string");
    const auto& shard = item.value().get_ref<const std::string&>();
    if (!is_plain_file_name(shard))
      return bad(index_path, "tensor '" + item.key() + "': shard name '" + shard +
                                 "' is not a plain file name in the checkpoint directory");
    listed[shard].push_back(item.key());
  }
  for (const auto& [shard, names] : listed) {
    const fs::path shard_path = path / shard;
    if (!fs::is_regular_file(shard_path, ec))
      return bad(index_path, "shard '" + shard + "' (named for tensor '" + names.front() +
                                 "') does not exist in " + path.string());
    auto present = add_file(shard_path);
    if (!present)
      return present.err();
    for (const auto& name : names)
      if (present->count(name) == 0)
        return bad(index_path, "tensor '" + name + "' is listed in shard '" + shard +
                                   "', which does not hold it");
  }
  return ck;
} catch (const std::exception& e) {
  // Only allocation failures or filesystem errors should get here; never let one escape.
  return make_error(error_code::io_error, path.string() + ": " + e.what());
}

const tensor_view* checkpoint::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

result<const tensor_view*> checkpoint::view(
    const std::string& name, const std::vector<std::int64_t>& expected_shape) const {
  const tensor_view* view = find(name);
  if (view == nullptr)
    return make_error(error_code::invalid_checkpoint,
                      "tensor '" + name + "' is missing from " + root_.string());
  if (view->shape != expected_shape)
    return bad_tensor(view->file, name,
                      "shape " + shape_string(view->shape) + ", expected " +
                          shape_string(expected_shape));
  return view;
}

result<std::vector<float>> checkpoint::read_f32(
    const std::string& name, const std::vector<std::int64_t>& expected_shape) const {
  auto found = view(name, expected_shape);
  if (!found)
    return found.err();
  const tensor_view* v = *found;
  std::vector<float> out(v->num_elements);
  // An empty vector's data() may be null, which memcpy must not see even for 0 bytes.
  if (!out.empty())
    convert_to_f32(v->type, v->data, out.size(), out.data());
  return out;
}

void checkpoint::release(const tensor_view& view) const {
  if (view.num_bytes == 0)
    return;
  // A read fault also maps cached pages around it (the kernel's fault-around, and whole large
  // folios of the page cache), so reading one tensor maps edges of its neighbours in the file,
  // which may have been released already. Dropping a 2 MiB-aligned window past both ends takes
  // those back; a neighbour still to be read just faults its pages in again. Page-exact
  // releases left 41 MiB mapped on the 843-tensor bench checkpoint, a 256 KiB window 12 MiB.
  constexpr std::uintptr_t window = std::uintptr_t{2} << 20;
  auto file = std::find_if(files_.begin(), files_.end(), [&](const auto& f) {
    return view.data >= f->data() && view.data < f->data() + f->size();
  });
  if (file == files_.end())
    return;
  auto lo = reinterpret_cast<std::uintptr_t>((*file)->data());  // page-aligned: an mmap base
  auto hi = lo + (*file)->size();
  auto begin = std::max(lo, reinterpret_cast<std::uintptr_t>(view.data) & ~(window - 1));
  auto end = std::min(hi, (reinterpret_cast<std::uintptr_t>(view.data) + view.num_bytes + window - 1) & ~(window - 1));
  // Failure only means the pages stay resident, so it is not an error.
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0)
      out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

}  // namespace moert::model
