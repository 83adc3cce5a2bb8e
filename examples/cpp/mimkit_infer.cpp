// mimkit_infer: one image through a `mimkit export` -- an AOTInductor package (--format aoti) or a TorchScript
// file (--format torchscript) -- from C++, with the preprocessing the export recorded; prints the cls embedding
// (an encoder) or the class scores (a classifier) and the time per image.
//
//   mimkit_infer MODEL IMAGE.ppm [--record JSON] [--size H[xW]] [--resize R] [--mean a,b,c] [--std a,b,c]
//                [--repeat N] [--threads N] [--save FILE]
//
// IMAGE is a binary PPM (P6, RGB) or PGM (P5, grey), 8-bit: no image library needed. Write one with Pillow:
//   python -c "from PIL import Image; Image.open('photo.jpg').convert('RGB').save('photo.ppm')"
// The preprocessing comes from MODEL.export.json (written by mimkit export beside MODEL); the flags override it:
// pixels / 255, bicubic antialiased resize (square size: shorter side to `resize`; else both sides), centre crop
// to `size`, (x - mean) / std. Exit status: 0 ok, 2 bad arguments or image, 3 the model cannot run here.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr int kWarmup = 3;  // untimed runs before the timed ones

// A mistake in the arguments or the inputs: one line, exit `code`.
struct Failure {
  int code;
  std::string message;
};

[[noreturn]] void fail(int code, const std::string& message) { throw Failure{code, message}; }

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ---- the export record: a flat lookup of the few keys we read, enough for the JSON mimkit export writes ----

// The raw JSON value after "key": (a number, string, array or null); nullopt when the key is absent.
std::optional<std::string> json_value(const std::string& text, const std::string& key) {
  const std::string quoted = "\"" + key + "\"";
  for (size_t at = text.find(quoted); at != std::string::npos; at = text.find(quoted, at + 1)) {
    size_t i = text.find_first_not_of(" \t\r\n", at + quoted.size());
    if (i == std::string::npos || text[i] != ':') continue;  // the key text inside a value, not a key
    i = text.find_first_not_of(" \t\r\n", i + 1);
    if (i == std::string::npos) return std::nullopt;
    size_t end = i;
    if (text[i] == '[') {
      end = text.find(']', i) + 1;  // flat arrays only (the ones we read)
    } else if (text[i] == '"') {
      end = text.find('"', i + 1) + 1;
    } else {
      end = text.find_first_of(",}\n", i);
    }
    return text.substr(i, end - i);
  }
  return std::nullopt;
}

std::vector<double> numbers(const std::string& s) {
  std::vector<double> out;
  std::string t = s;
  for (char& ch : t)
    if (ch == '[' || ch == ']' || ch == ',' || ch == 'x') ch = ' ';
  std::istringstream in(t);
  for (std::string word; in >> word;) {
    char* end = nullptr;
    double v = std::strtod(word.c_str(), &end);
    if (end == word.c_str() || *end != '\0') fail(2, "not a number: '" + word + "' in '" + s + "'");
    out.push_back(v);
  }
  return out;
}

std::string unquote(const std::string& s) { return s.size() >= 2 && s[0] == '"' ? s.substr(1, s.size() - 2) : s; }

// ---- the image: binary 8-bit PGM / PPM ----

at::Tensor read_pnm(const std::string& path) {  // -> uint8 (C, H, W)
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(2, "cannot open image " + path);
  auto token = [&f]() {  // header fields are separated by whitespace; '#' starts a comment
    std::string t;
    while (f && t.empty()) {
      int ch = f.get();
      if (ch == '#') {
        std::string skip;
        std::getline(f, skip);
      } else if (ch != EOF && !std::isspace(ch)) {
        t.push_back(static_cast<char>(ch));
        while (f && !std::isspace(f.peek()) && f.peek() != EOF) t.push_back(static_cast<char>(f.get()));
      } else if (ch == EOF) {
        break;
      }
    }
    return t;
  };
  const std::string magic = token();
  if (magic != "P6" && magic != "P5")
    fail(2, path + " is not a binary PPM (P6) or PGM (P5) image; convert it, e.g. python -c \"from PIL import "
            "Image; Image.open('in.jpg').convert('RGB').save('in.ppm')\"");
  const long w = std::atol(token().c_str()), h = std::atol(token().c_str()), maxval = std::atol(token().c_str());
  if (w <= 0 || h <= 0) fail(2, path + ": bad image size in the header");
  if (maxval != 255) fail(2, path + ": only 8-bit images (maxval 255) are read, this one has maxval " +
                                 std::to_string(maxval));
  f.get();  // the single whitespace byte before the pixels
  const long c = magic == "P6" ? 3 : 1;
  std::vector<uint8_t> buf(static_cast<size_t>(w * h * c));
  f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(buf.size()));
  if (f.gcount() != static_cast<std::streamsize>(buf.size())) fail(2, path + ": the file ends before its pixels do");
  return at::from_blob(buf.data(), {h, w, c}, at::kByte).permute({2, 0, 1}).clone();
}

// ---- preprocessing: mimkit.tasks.aoti.preprocess, op for op ----

struct Recipe {
  std::vector<long> size;    // (h, w) the model takes
  std::vector<long> resize;  // (r) shorter side, or (rh, rw); empty: no resize (the image must be >= size)
  std::vector<double> mean, std;
  long channels = 3;
};

at::Tensor to_channels(const at::Tensor& img, long channels) {
  if (img.size(0) == channels) return img;
  if (channels == 3) return img.expand({3, img.size(1), img.size(2)}).contiguous();
  if (channels != 1 || img.size(0) != 3) fail(2, "cannot turn a " + std::to_string(img.size(0)) +
                                                     "-channel image into " + std::to_string(channels));
  auto rgb = img.to(at::kInt);  // PIL's integer 'L' luma, so the grey values match Pillow's
  auto l = (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000).floor_divide(65536);
  return l.to(at::kByte).unsqueeze(0);
}

at::Tensor preprocess(const at::Tensor& img, const Recipe& r) {  // uint8 (C, H, W) -> float (1, C, h, w)
  const long h = r.size[0], w = r.size[1];
  at::Tensor x = to_channels(img, r.channels).to(at::kFloat).div(255).unsqueeze(0);
  const long ih = x.size(2), iw = x.size(3);
  long rh = ih, rw = iw;
  if (r.resize.size() == 1) {  // torchvision's Resize(int): shorter side to r, longer in proportion (floored)
    const long s = r.resize[0];
    if (ih <= iw) {
      rh = s, rw = static_cast<long>(static_cast<double>(s) * iw / ih);
    } else {
      rh = static_cast<long>(static_cast<double>(s) * ih / iw), rw = s;
    }
  } else if (r.resize.size() == 2) {
    rh = r.resize[0], rw = r.resize[1];
  }
  if (!r.resize.empty()) x = at::_upsample_bicubic2d_aa(x, {rh, rw}, /*align_corners=*/false);
  if (rh < h || rw < w)
    fail(2, "the image (" + std::to_string(rh) + "x" + std::to_string(rw) + " after resizing) is smaller than the "
            "model's input " + std::to_string(h) + "x" + std::to_string(w));
  // torchvision's CenterCrop: int(round(d / 2)), Python's round-half-even = nearbyint's default mode
  const long top = static_cast<long>(std::nearbyint((rh - h) / 2.0));
  const long left = static_cast<long>(std::nearbyint((rw - w) / 2.0));
  x = x.slice(2, top, top + h).slice(3, left, left + w);
  if (!r.mean.empty()) {
    std::vector<float> m(r.mean.begin(), r.mean.end()), s(r.std.begin(), r.std.end());
    x = (x - at::tensor(m).view({1, -1, 1, 1})) / at::tensor(s).view({1, -1, 1, 1});
  }
  return x.contiguous();
}

// ---- the two model formats behind one call ----

struct Model {
  std::string format, device = "cpu";
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> aoti;
  torch::jit::Module script;

  at::Tensor run(const at::Tensor& x) {
    if (aoti) return aoti->run({x.to(device)})[0].cpu();
    return script.forward({x}).toTensor().cpu();  // .cpu(): the time includes getting the result back
  }
};

// The CPU instruction set the package was compiled for must be one this CPU runs: otherwise its code would die
// on an illegal instruction, which cannot be caught.
void check_cpu_isa(const std::string& isa, const std::string& path) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  std::istringstream words(isa);  // e.g. "AVX512 AVX512_VNNI", "AVX2"
  for (std::string w; words >> w;) {
    bool ok = true;
    if (w == "AVX512")
      ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    else if (w == "AVX512_VNNI")
      ok = __builtin_cpu_supports("avx512vnni");
    else if (w == "AVX2")
      ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!ok)
      fail(3, path + " was compiled for a CPU with " + isa + " but this CPU lacks " + w + "; export it again on a "
              "machine like this one (mimkit export ... --format aoti)");
  }
#endif
}

Model load(const std::string& path, const std::string& format, const std::string& recorded_torch) {
  Model m;
  m.format = format;
  if (format == "aoti") {
    auto meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
    m.device = meta.count("AOTI_DEVICE_KEY") ? meta["AOTI_DEVICE_KEY"] : "cpu";
    const std::string ours = TORCH_VERSION;
    if (!recorded_torch.empty() && recorded_torch.substr(0, recorded_torch.find('+')) != ours)
      fail(3, path + " was compiled by torch " + recorded_torch + " and an AOTInductor package runs only with "
              "the torch that compiled it (this program: libtorch " + ours + "); export it again with this torch");
    if (m.device == "cuda" && !at::hasCUDA())
      fail(3, path + " is a CUDA package but this machine has no usable CUDA GPU; export a CPU package "
              "(mimkit export ... --format aoti --device cpu) or run it where a GPU is");
    if (m.device != "cpu" && m.device != "cuda")
      fail(3, path + " was compiled for device '" + m.device + "', which this program does not run");
    if (m.device == "cpu") check_cpu_isa(meta.count("AOTI_CPU_ISA") ? meta["AOTI_CPU_ISA"] : "", path);
    m.aoti = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model");
  } else {
    m.script = torch::jit::load(path, at::kCPU);
    m.script.eval();
  }
  return m;
}

void usage() {
  std::cerr << "usage: mimkit_infer MODEL IMAGE.ppm [--record JSON] [--format aoti|torchscript] [--size H[xW]]\n"
               "                    [--resize R|RHxRW|0] [--mean a,b,c] [--std a,b,c] [--repeat N] [--threads N]\n"
               "                    [--save FILE]\n"
               "MODEL: a `mimkit export --format aoti` package (.aoti.pt2) or --format torchscript file; its\n"
               "<MODEL>.export.json gives the preprocessing (the flags override it). IMAGE: binary 8-bit PPM/PGM.\n";
}

int run(int argc, char** argv) {
  std::vector<std::string> pos;
  std::map<std::string, std::string> opt;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      usage();
      return 0;
    }
    if (a.rfind("--", 0) == 0) {
      if (i + 1 >= argc) fail(2, a + " needs a value");
      opt[a.substr(2)] = argv[++i];
    } else {
      pos.push_back(a);
    }
  }
  const std::vector<std::string> known = {"record", "format", "size", "resize", "mean", "std", "repeat", "threads",
                                          "save"};
  for (const auto& [k, v] : opt)
    if (std::find(known.begin(), known.end(), k) == known.end()) fail(2, "unknown flag --" + k + " (see --help)");
  if (pos.size() != 2) {
    usage();
    return 2;
  }
  const std::string model_path = pos[0], image_path = pos[1];
  if (!std::ifstream(model_path)) fail(2, "cannot open model " + model_path);
  for (const char* ext : {".ppm", ".pgm", ".png", ".jpg", ".jpeg"}) {  // swapped arguments: say the order
    const std::string e(ext);
    if (model_path.size() > e.size() && model_path.compare(model_path.size() - e.size(), e.size(), e) == 0)
      fail(2, model_path + " looks like an image: the order is MODEL IMAGE (the exported .aoti.pt2 or "
              ".torchscript.pt first)");
  }

  // The export record beside the model, unless --record names another; the flags override its values.
  const std::string record_path = opt.count("record") ? opt["record"] : model_path + ".export.json";
  std::string record;
  if (std::ifstream(record_path)) {
    record = read_text(record_path);
  } else if (opt.count("record")) {
    fail(2, "cannot open the export record " + record_path);
  }
  auto value = [&](const std::string& flag, const std::string& key) -> std::optional<std::string> {
    if (opt.count(flag)) return opt[flag];
    if (record.empty()) return std::nullopt;
    auto v = json_value(record, key);
    if (v && *v == "null") return std::nullopt;
    return v;
  };
  Recipe r;
  auto size = value("size", "size");
  if (!size)
    fail(2, "no export record beside " + model_path + " (" + record_path + " not found): this program runs what "
            "`mimkit export CKPT --format aoti|torchscript` writes (a training checkpoint such as final.pt must be "
            "exported first); for a file exported elsewhere pass --size (and --mean, --std)");
  for (double v : numbers(*size)) r.size.push_back(static_cast<long>(v));
  if (r.size.size() == 1) r.size.push_back(r.size[0]);
  if (r.size.size() != 2 || r.size[0] <= 0 || r.size[1] <= 0) fail(2, "bad --size '" + *size + "'");
  if (auto v = value("resize", "resize"))
    for (double x : numbers(*v))
      if (x > 0) r.resize.push_back(static_cast<long>(x));
  if (auto v = value("mean", "mean")) r.mean = numbers(*v);
  if (auto v = value("std", "std")) r.std = numbers(*v);
  if (r.mean.size() != r.std.size()) fail(2, "--mean and --std need as many values each");
  if (auto v = value("channels", "channels")) r.channels = static_cast<long>(numbers(*v).at(0));
  if (!r.mean.empty()) r.channels = static_cast<long>(r.mean.size());
  std::string format = opt.count("format") ? opt["format"] : unquote(json_value(record, "format").value_or(""));
  if (format.empty()) {  // no record: by name, as mimkit export names its files
    const bool pt2 = model_path.size() >= 4 && model_path.compare(model_path.size() - 4, 4, ".pt2") == 0;
    format = pt2 ? "aoti" : "torchscript";
  }
  if (format != "aoti" && format != "torchscript")
    fail(2, model_path + " is a --format " + format + " export; this program runs aoti and torchscript");
  const int repeat = opt.count("repeat") ? std::atoi(opt["repeat"].c_str()) : 20;
  if (repeat < 1) fail(2, "--repeat needs a positive count");
  if (opt.count("threads")) at::set_num_threads(std::atoi(opt["threads"].c_str()));
  const std::string recorded_torch = unquote(json_value(record, "torch").value_or(""));

  // No autograd. Not c10::InferenceMode: under it TorchScript's profiling executor stays on its slow path for
  // ~20 calls (measured), where under NoGradGuard it optimises after 2.
  at::NoGradGuard no_grad;
  Model model;
  try {
    model = load(model_path, format, recorded_torch);
  } catch (const c10::Error& e) {  // a package or file this libtorch cannot load: say so in one line
    if (record.empty())  // no record: most likely not an export of this kind at all
      fail(2, "cannot load " + model_path + " as " + format + " (" + first_line(e.what_without_backtrace()) +
              "); is it a training checkpoint or another format? export it with `mimkit export CKPT --format " +
              format + "`, or give --format");
    fail(3, "cannot load " + model_path + " (" + format + ") with this libtorch " + TORCH_VERSION +
            (at::hasCUDA() ? " (CUDA available)" : " (no CUDA)") + ": " + first_line(e.what_without_backtrace()));
  }

  const at::Tensor img = read_pnm(image_path);
  auto t0 = std::chrono::steady_clock::now();
  const at::Tensor x = preprocess(img, r);
  const double prep_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  at::Tensor out;
  double ms = 0;
  try {
    // Warm-up: first-call allocations stay out of the timing, and TorchScript's profiling executor optimises
    // the graph only after its first profiled runs.
    for (int i = 0; i < kWarmup; ++i) out = model.run(x);
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; ++i) out = model.run(x);
    ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / repeat;
  } catch (const c10::Error& e) {
    fail(3, "running " + model_path + " on a " + std::to_string(x.size(1)) + "x" + std::to_string(x.size(2)) + "x" +
            std::to_string(x.size(3)) + " input failed: " + first_line(e.what_without_backtrace()));
  }

  std::printf("model: %s (%s, %s, libtorch %s, %d threads)\n", model_path.c_str(), format.c_str(),
              model.device.c_str(), TORCH_VERSION, at::get_num_threads());
  std::printf("image: %s (%ldx%ld, %ld channel%s) -> input (1, %ld, %ld, %ld)\n", image_path.c_str(),
              static_cast<long>(img.size(2)), static_cast<long>(img.size(1)), static_cast<long>(img.size(0)),
              img.size(0) > 1 ? "s" : "", r.channels, r.size[0], r.size[1]);
  if (img.size(0) == 1 && r.channels == 3) std::printf("note: a grey image: its one channel is copied to 3\n");
  at::Tensor shown;
  if (out.dim() == 3) {  // tokens (N, 1 + L, D): the cls token is the first
    shown = out[0][0];
    std::printf("output (1, %ld, %ld): tokens; cls embedding, %ld values:\n", static_cast<long>(out.size(1)),
                static_cast<long>(out.size(2)), static_cast<long>(shown.numel()));
  } else {
    shown = out.reshape({-1});
    auto top = shown.topk(std::min<int64_t>(5, shown.numel()));
    std::printf("output (1, %ld): class scores (logits); top:", static_cast<long>(shown.numel()));
    for (int64_t i = 0; i < std::get<0>(top).numel(); ++i)
      std::printf(" %ld (%.4f)", static_cast<long>(std::get<1>(top)[i].item<int64_t>()),
                  std::get<0>(top)[i].item<float>());
    std::printf("\nall %ld scores:\n", static_cast<long>(shown.numel()));
  }
  auto v = shown.contiguous();
  const float* p = v.data_ptr<float>();
  for (int64_t i = 0; i < v.numel(); ++i) std::printf("%s%10.6f", i % 8 ? " " : (i ? "\n  " : "  "), p[i]);
  std::printf("\ntime per image: %.3f ms (model only, mean of %d runs after %d warm-up; preprocessing %.3f ms)\n",
              ms, repeat, kWarmup, prep_ms);

  if (opt.count("save")) {  // every output value at full float precision, for comparisons
    std::ofstream f(opt["save"]);
    if (!f) fail(2, "cannot write " + opt["save"]);
    f << "# shape";
    for (auto s : out.sizes()) f << " " << s;
    f << "\n";
    auto flat = out.contiguous().reshape({-1});
    const float* q = flat.data_ptr<float>();
    char buf[32];
    for (int64_t i = 0; i < flat.numel(); ++i) {
      std::snprintf(buf, sizeof buf, "%.9g\n", q[i]);
      f << buf;
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Failure& f) {
    std::cerr << "mimkit_infer: error: " << f.message << std::endl;
    return f.code;
  } catch (const c10::Error& e) {
    std::cerr << "mimkit_infer: error: " << first_line(e.what_without_backtrace()) << std::endl;
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "mimkit_infer: error: " << first_line(e.what()) << std::endl;
    return 3;
  }
}
