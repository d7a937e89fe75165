// sdturbo_request: one image (or several seeds) from `sdturbo serve`, from C++; a working use of
// sdturbo_client.hpp. Build: g++ -std=c++17 -O2 -o sdturbo_request sdturbo_request.cpp
//
//   sdturbo_request "a cinematic shot of a baby racoon" --seed 7 --out racoon.ppm
//   sdturbo_request "a lighthouse" --image photo.ppm --strength 0.5 --steps 2 --out lighthouse.ppm
//
// Images are binary PPM (P6, 8 bits), which needs no library to read or write (`convert x.ppm x.png`, or PIL).
// Exit status: 0 done; 1 the server refused the request or could not be reached (its message on stderr);
// 2 a bad command line.
#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "sdturbo_client.hpp"

namespace {

const char* kUsage =
    "usage: sdturbo_request PROMPT --out OUT.ppm [--url HOST:PORT] [--seed N] [--steps N] [--size WxH]\n"
    "                       [--image IN.ppm] [--strength S] [--count N] [--timeout S] [--connect-timeout S]\n"
    "  --url     the server's HTTP address (default 127.0.0.1:8000)\n"
    "  --count   N images, seeds SEED to SEED+N-1, one request each over one connection; written as\n"
    "            OUT-0.ppm ... OUT-(N-1).ppm\n"
    "  --timeout the longest wait for the server's next bytes, in s (default 300)\n"
    "  --connect-timeout  the longest wait to connect, in s (default 10)\n";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "sdturbo_request: " << message << "\n" << kUsage;
  std::exit(2);
}

long long integer(const std::string& flag, const std::string& text, long long lo, long long hi) {
  char* end = nullptr;
  errno = 0;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || value < lo || value > hi)
    usage_error(flag + " " + text + " is not an integer from " + std::to_string(lo) + " to " + std::to_string(hi));
  return value;
}

struct Ppm {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;
};

Ppm read_ppm(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) usage_error("cannot read " + path + ": " + std::strerror(errno));
  auto token = [&]() {
    std::string t;
    int c;
    while ((c = in.get()) != EOF) {
      if (c == '#') {
        while ((c = in.get()) != EOF && c != '\n') {
        }
      } else if (std::isspace(c)) {
        if (!t.empty()) break;
      } else {
        t += static_cast<char>(c);
      }
    }
    return t;
  };
  Ppm p;
  if (token() != "P6") usage_error(path + " is not a binary PPM (P6)");
  p.width = static_cast<int>(integer(path + ": width", token(), 1, 1 << 15));
  p.height = static_cast<int>(integer(path + ": height", token(), 1, 1 << 15));
  if (token() != "255") usage_error(path + " is not an 8-bit PPM (maxval 255)");
  p.rgb.resize(static_cast<size_t>(p.width) * static_cast<size_t>(p.height) * 3);
  in.read(reinterpret_cast<char*>(p.rgb.data()), static_cast<std::streamsize>(p.rgb.size()));
  if (in.gcount() != static_cast<std::streamsize>(p.rgb.size())) usage_error(path + " is cut short");
  return p;
}

bool write_ppm(const std::string& path, const sdturbo::Image& image) {
  std::string part = path + ".part";  // then renamed: never a half-written image under the name asked for
  std::ofstream out(part, std::ios::binary);
  out << "P6\n" << image.width << " " << image.height << "\n255\n";
  out.write(reinterpret_cast<const char*>(image.rgb.data()), static_cast<std::streamsize>(image.rgb.size()));
  out.close();
  if (!out || std::rename(part.c_str(), path.c_str()) != 0) {
    std::cerr << "sdturbo_request: cannot write " << path << ": " << std::strerror(errno) << "\n";
    std::remove(part.c_str());
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  sdturbo::Request request;
  std::string out, url = "127.0.0.1:8000", image_path;
  long long count = 1, timeout_s = 300, connect_timeout_s = 10;
  bool have_prompt = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (arg.rfind("--", 0) != 0) {
      if (have_prompt) usage_error("one prompt only (quote it): got '" + request.prompt + "' and '" + arg + "'");
      request.prompt = arg, have_prompt = true;
      continue;
    }
    if (i + 1 >= argc) usage_error(arg + " needs a value");
    std::string value = argv[++i];
    if (arg == "--out") out = value;
    else if (arg == "--url") url = value;
    else if (arg == "--seed") request.seed = integer(arg, value, 0, INT64_MAX);
    else if (arg == "--steps") request.steps = static_cast<int32_t>(integer(arg, value, INT32_MIN, INT32_MAX));
    else if (arg == "--count") count = integer(arg, value, 1, 1000);
    else if (arg == "--timeout") timeout_s = integer(arg, value, 1, 86400);
    else if (arg == "--connect-timeout") connect_timeout_s = integer(arg, value, 1, 3600);
    else if (arg == "--image") image_path = value;
    else if (arg == "--strength") {
      char* end = nullptr;
      request.strength = std::strtof(value.c_str(), &end);
      if (value.empty() || *end != '\0') usage_error("--strength " + value + " is not a number");
    } else if (arg == "--size") {
      size_t x = value.find('x');
      if (x == std::string::npos) usage_error("--size " + value + " is not WIDTHxHEIGHT");
      request.width = static_cast<int32_t>(integer("--size width", value.substr(0, x), INT32_MIN, INT32_MAX));
      request.height = static_cast<int32_t>(integer("--size height", value.substr(x + 1), INT32_MIN, INT32_MAX));
    } else {
      usage_error("unknown option " + arg);
    }
  }
  if (!have_prompt) usage_error("no prompt");
  if (out.empty()) usage_error("no --out");
  size_t colon = url.rfind(':');
  if (colon == std::string::npos) usage_error("--url " + url + " is not HOST:PORT");
  int port = static_cast<int>(integer("--url port", url.substr(colon + 1), 1, 65535));
  Ppm picture;
  if (!image_path.empty()) {
    picture = read_ppm(image_path);
    request.image = picture.rgb.data();
    request.image_height = picture.height, request.image_width = picture.width;
  }
  int64_t first_seed = request.seed.value_or(0);
  if (count > 1 && first_seed > INT64_MAX - (count - 1)) usage_error("--seed + --count - 1 is over 2**63 - 1");

  std::string host = url.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);  // [::1]
  sdturbo::Client client(host, port, "sdturbo", static_cast<int>(timeout_s),
                         static_cast<int>(connect_timeout_s));
  for (long long k = 0; k < count; ++k) {
    if (count > 1) request.seed = first_seed + k;
    std::string path = out;
    if (count > 1) {
      size_t dot = out.rfind('.');
      bool ext = dot != std::string::npos && out.find('/', dot) == std::string::npos;
      path = ext ? out.substr(0, dot) + "-" + std::to_string(k) + out.substr(dot) : out + "-" + std::to_string(k);
    }
    try {
      sdturbo::Image image = client.generate(request);
      if (!write_ppm(path, image)) return 1;
    } catch (const sdturbo::Error& e) {
      std::cerr << "sdturbo_request: " << (e.status() ? "HTTP " + std::to_string(e.status()) + ": " : "") << e.what()
                << "\n";
      return 1;
    }
  }
  std::cerr << "sdturbo_request: " << count << " image(s) over " << client.connections() << " connection(s)\n";
  return 0;
}
