// sdturbo_client.hpp: call `sdturbo serve` from C++ over HTTP. One header, C++17 and POSIX sockets, nothing to
// install. It speaks the server's protocol (KServe v2 with Triton's binary tensor extension: the prompt, the numbers
// and the pixels travel as raw bytes, not JSON), so the image it returns is byte for byte the one
// `sdturbo generate` writes for the same settings (tests/serve/test_triton.py checks that).
//
//   sdturbo::Client client("127.0.0.1", 8000);           // one connection, kept alive between requests
//   sdturbo::Request request;
//   request.prompt = "a cinematic shot of a baby racoon";
//   request.seed = 7;                                      // every field but the prompt is optional
//   sdturbo::Image image = client.generate(request);      // image.rgb: height x width x 3 bytes, row-major RGB
//
// A refused request throws sdturbo::Error: status() is the HTTP status and what() the server's message: 400 the
// request (naming the field and what is allowed: do not retry it), 404 no such model, 500 the server failed (an
// image that came out NaN, say), 503 the model stopped taking work. status() 0 means there was no answer: the
// server cannot be reached (a server being stopped refuses new connections at once), it closed the connection (a
// request still running when a stopping server exits is cut off), no byte came within the timeout, or the reply
// is not the protocol's. A stopping server still serves requests on a connection kept open and waits for such
// connections to close (up to its stop budget): close() an idle Client, and stop sending to a server being
// stopped. A Client is not thread-safe: one per thread (build with -pthread), or guard it. POSIX only (Linux,
// macOS). Over gRPC, use Triton's C++ client library (README, "From C++").
#pragma once

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sdturbo_client.hpp sends numbers in the host's byte order; KServe v2 wants little-endian"
#endif

namespace sdturbo {

// One request. Unset fields take the server's defaults (seed 0, 1 step or img2img's fewest, 512x512 or the image's
// size, strength 0.5 with an image); the server checks every value and names the one it refuses.
struct Request {
  std::string prompt;                   // UTF-8
  std::optional<int64_t> seed;          // 0 to 2**63 - 1
  std::optional<int32_t> steps;         // 1 to 4 (default 1; img2img: the fewest that run a step)
  std::optional<int32_t> width, height; // multiples of 8 in the bundle's size range
  std::optional<float> strength;        // img2img only: in (0, 1]
  const uint8_t* image = nullptr;       // img2img: image_height x image_width x 3 bytes, row-major RGB
  int32_t image_height = 0, image_width = 0;
};

struct Image {
  int32_t height = 0, width = 0;
  std::vector<uint8_t> rgb;  // height * width * 3 bytes, row-major RGB
};

class Error : public std::runtime_error {
 public:
  Error(int status, const std::string& message) : std::runtime_error(message), status_(status) {}
  int status() const { return status_; }  // the HTTP status; 0: no answer

 private:
  int status_;
};

namespace detail {

// Just enough JSON for the server's reply header and error bodies.
struct Json {
  enum Kind { kNull, kBool, kNumber, kString, kArray, kObject } kind = kNull;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> fields;

  const Json* get(const std::string& key) const {
    for (const auto& f : fields)
      if (f.first == key) return &f.second;
    return nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : s_(text) {}

  Json parse() {
    Json value = parse_value(0);
    skip_space();
    if (i_ != s_.size()) fail("text after the value");
    return value;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const char* what) const {
    throw Error(0, std::string("the server's reply is not the JSON expected (") + what + " at byte " +
                       std::to_string(i_) + "): " + s_.substr(0, 200));
  }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  bool take(char c) {
    skip_space();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!take(c)) fail("unexpected character");
  }
  bool take_word(const char* word) {
    size_t n = std::strlen(word);
    if (s_.compare(i_, n, word) != 0) return false;
    i_ += n;
    return true;
  }

  Json parse_value(int depth) {
    if (depth > 32) fail("nested too deep");
    skip_space();
    if (i_ >= s_.size()) fail("end of text");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      ++i_;
      v.kind = Json::kObject;
      if (take('}')) return v;
      do {
        skip_space();
        if (i_ >= s_.size() || s_[i_] != '"') fail("a key is not a string");
        std::string key = parse_string();
        expect(':');
        v.fields.emplace_back(std::move(key), parse_value(depth + 1));
      } while (take(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      v.kind = Json::kArray;
      if (take(']')) return v;
      do v.items.push_back(parse_value(depth + 1));
      while (take(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Json::kString;
      v.string = parse_string();
    } else if (take_word("true") || take_word("false")) {
      v.kind = Json::kBool;
      v.boolean = s_[i_ - 1] == 'e' && s_[i_ - 2] == 'u';
    } else if (take_word("null")) {
      v.kind = Json::kNull;
    } else {
      const char* start = s_.c_str() + i_;
      char* end = nullptr;
      v.kind = Json::kNumber;
      v.number = std::strtod(start, &end);
      if (end == start) fail("not a value");
      i_ += static_cast<size_t>(end - start);
    }
    return v;
  }

  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("a short \\u escape");
    unsigned code = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[i_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') code |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') code |= static_cast<unsigned>(h - 'A' + 10);
      else fail("a bad \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  std::string parse_string() {
    ++i_;  // the opening quote
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("an unterminated string");
      char c = s_[i_++];
      if (c == '"') return out;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("an unterminated escape");
      char e = s_[i_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = hex4();
          if (code >= 0xD800 && code < 0xDC00 && s_.compare(i_, 2, "\\u") == 0) {
            i_ += 2;
            unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("a lone surrogate");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, code);
          break;
        }
        default: fail("a bad escape");
      }
    }
  }
};

inline std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

template <typename T>
void append_raw(std::string& body, const T& value) {
  body.append(reinterpret_cast<const char*>(&value), sizeof value);
}

}  // namespace detail

class Client {
 public:
  // timeout_s bounds each send and each wait for the reply's next bytes (a first request on a cold server may
  // take a while; a 512x512 image on a CPU takes seconds); connect_timeout_s bounds opening a connection.
  explicit Client(std::string host = "127.0.0.1", int port = 8000, std::string model = "sdturbo", int timeout_s = 300,
                  int connect_timeout_s = 10)
      : host_(std::move(host)),
        port_(port),
        model_(std::move(model)),
        timeout_s_(timeout_s),
        connect_timeout_s_(connect_timeout_s) {
    if (port < 1 || port > 65535) throw Error(0, "port " + std::to_string(port) + " is not 1 to 65535");
    const char* allowed = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-";
    if (model_ == "." || model_ == ".." || model_.empty() || model_.find_first_not_of(allowed) != std::string::npos)
      throw Error(0, "model name '" + model_ + "' is not allowed; use letters, digits, '_', '.' and '-' (not '.' or " +
                         "'..')");
    if (timeout_s < 1 || timeout_s > kMaxTimeout || connect_timeout_s < 1 || connect_timeout_s > kMaxTimeout)
      throw Error(0, "timeouts must be 1 to " + std::to_string(kMaxTimeout) + " s (got " + std::to_string(timeout_s) +
                         " and " + std::to_string(connect_timeout_s) + ")");
  }
  ~Client() { disconnect(); }
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  Client(Client&& other) noexcept { *this = std::move(other); }
  Client& operator=(Client&& other) noexcept {
    if (this != &other) {
      disconnect();
      host_ = std::move(other.host_), model_ = std::move(other.model_);
      port_ = other.port_, timeout_s_ = other.timeout_s_, connect_timeout_s_ = other.connect_timeout_s_;
      fd_ = other.fd_, connections_ = other.connections_;
      other.fd_ = -1;
    }
    return *this;
  }

  Image generate(const Request& request) {
    Message message = encode(request);
    // A kept-alive connection the server has closed since (an idle timeout, a restart) is seen before sending and
    // replaced. Closed in the moment between (the send fails, or the connection is reset with the request unread),
    // the request goes once more on a new one. Closed after the whole request went, it is not sent again: the server may have run
    // it (a stopping server cuts off a request under way), and that is the caller's to decide.
    if (fd_ >= 0 && !idle_and_open()) disconnect();
    bool reused = fd_ >= 0;
    try {
      return exchange(message);
    } catch (const Error& e) {
      if (!reused || e.status() != 0 || !not_taken_) throw;
    }
    return exchange(message);
  }

  int connections() const { return connections_; }  // connections opened so far (1 while the server keeps it)

  // Closes the kept-alive connection now (the next request opens another): an idle Client holds a stopping server
  // open until its stop budget runs out.
  void close() { disconnect(); }

 private:
  std::string host_;
  int port_ = 8000;
  std::string model_;
  int timeout_s_ = 300;
  int connect_timeout_s_ = 10;
  int fd_ = -1;
  int connections_ = 0;
  static constexpr int kMaxTimeout = 1000000;  // s; (x 1000 ms fits an int)
  static constexpr size_t kMaxBody = size_t{1} << 30;  // a reply's most: 1 GiB (a 16384 x 16384 image is 768 MiB)
  bool reply_started_ = false;  // a byte of the reply has arrived
  // Why the request could not be sent whole, where the server stopped taking it (EPIPE, ECONNRESET): it may have
  // answered first (a 413 from a proxy in front, say), and that answer is read and reported; else this is.
  std::string send_error_;
  // The last failure: the server did not take the request. Its connection refused the send (EPIPE, ECONNRESET), or
  // was reset before any reply: a peer that closes with the request unread in its buffer resets the connection,
  // while one that read it and then closed ends it cleanly (EOF), which is not sent again.
  bool not_taken_ = false;

  // host:port, an IPv6 address in brackets (as a URL and the Host header write it)
  std::string where() const {
    return (host_.find(':') != std::string::npos ? "[" + host_ + "]" : host_) + ":" + std::to_string(port_);
  }

  [[noreturn]] void fail(const std::string& what) {
    disconnect();
    throw Error(0, what);
  }

  // The kept-alive connection is open and quiet: not closed by the server, nothing unasked-for waiting on it.
  bool idle_and_open() const {
    pollfd p{fd_, POLLIN, 0};
    return ::poll(&p, 1, 0) == 0;
  }

  // poll(2) for `events` on fd for up to timeout_s: > 0 ready, 0 timed out, < 0 failed (errno). A signal handled
  // meanwhile (a profiler's timer, say) interrupts the wait; it goes on for what is left of the timeout, where
  // starting it again would never time out under a steady stream of signals.
  static int wait_for(int fd, short events, int timeout_s) {
    using clock = std::chrono::steady_clock;
    auto deadline = clock::now() + std::chrono::seconds(timeout_s);
    pollfd p{fd, events, 0};
    int rc;
    do {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now()).count();
      rc = ::poll(&p, 1, static_cast<int>(left > 0 ? left : 0));
    } while (rc < 0 && errno == EINTR);
    return rc;
  }

  void disconnect() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  void connect() {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    int rc = ::getaddrinfo(host_.c_str(), std::to_string(port_).c_str(), &hints, &found);
    if (rc != 0) throw Error(0, "cannot find host " + host_ + ": " + ::gai_strerror(rc));
    std::string last = "no address";
    for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
#ifdef SOCK_CLOEXEC  // not inherited by a program the caller starts (set at creation: no fork in between)
      int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
#else
      int fd = ::socket(a->ai_family, a->ai_socktype, a->ai_protocol);
      if (fd >= 0) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
#endif
      if (fd < 0) {
        last = std::strerror(errno);
        continue;
      }
      if (connect_within(fd, a->ai_addr, a->ai_addrlen, last)) {
        timeval tv{};
        tv.tv_sec = timeout_s_;
        ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        int one = 1;
        ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
#ifdef SO_NOSIGPIPE
        ::setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
        fd_ = fd;
        ++connections_;
        ::freeaddrinfo(found);
        return;
      }
      ::close(fd);
    }
    ::freeaddrinfo(found);
    throw Error(0, "cannot connect to " + where() + ": " + last + " (is `sdturbo serve` running there?)");
  }

  // connect(2) within connect_timeout_s_ (a host that drops packets would otherwise hold it for minutes).
  bool connect_within(int fd, const sockaddr* address, socklen_t length, std::string& error) const {
    int flags = ::fcntl(fd, F_GETFL, 0);
    ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int rc = ::connect(fd, address, length);
    if (rc != 0 && errno == EINPROGRESS) {
      rc = wait_for(fd, POLLOUT, connect_timeout_s_);
      if (rc == 0) {
        error = "no connection within " + std::to_string(connect_timeout_s_) + " s";
        return false;
      }
      int so_error = 0;
      socklen_t size = sizeof so_error;
      if (rc > 0) so_error = ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &size) == 0 ? so_error : errno;
      if (rc > 0 && so_error != 0) errno = so_error;
      rc = rc > 0 && so_error == 0 ? 0 : -1;
    }
    if (rc != 0) {
      error = std::strerror(errno);
      return false;
    }
    ::fcntl(fd, F_SETFL, flags);
    return true;
  }

  // A request on the wire: the HTTP head, the JSON header and the small tensors, then the image's pixels, sent
  // from the caller's buffer (not copied).
  struct Message {
    std::string prefix;
    const char* image = nullptr;
    size_t image_bytes = 0;
  };

  Message encode(const Request& r) const {
    if (r.prompt.size() > 0xFFFFFFFFu) throw Error(0, "the prompt is over 4 GiB");
    bool has_image = r.image != nullptr;
    if (!has_image && (r.image_height != 0 || r.image_width != 0))
      throw Error(0, "image_height and image_width are set but image is null (an empty buffer's data()?)");
    if (has_image && (r.image_height <= 0 || r.image_width <= 0))
      throw Error(0, "image_height and image_width must be positive with an image (got " +
                         std::to_string(r.image_height) + "x" + std::to_string(r.image_width) + ")");
    std::string json = "{\"inputs\":[", data;
    auto input = [&](const char* name, const char* type, const std::string& shape, size_t bytes) {
      if (json.back() != '[') json += ',';
      json += std::string("{\"name\":\"") + name + "\",\"datatype\":\"" + type + "\",\"shape\":[" + shape +
              "],\"parameters\":{\"binary_data_size\":" + std::to_string(bytes) + "}}";
    };
    input("prompt", "BYTES", "1", 4 + r.prompt.size());
    detail::append_raw(data, static_cast<uint32_t>(r.prompt.size()));
    data += r.prompt;
    if (r.seed) input("seed", "INT64", "1", 8), detail::append_raw(data, *r.seed);
    if (r.steps) input("steps", "INT32", "1", 4), detail::append_raw(data, *r.steps);
    if (r.width) input("width", "INT32", "1", 4), detail::append_raw(data, *r.width);
    if (r.height) input("height", "INT32", "1", 4), detail::append_raw(data, *r.height);
    if (r.strength) input("strength", "FP32", "1", 4), detail::append_raw(data, *r.strength);
    Message m;
    if (has_image) {
      m.image_bytes = static_cast<size_t>(r.image_height) * static_cast<size_t>(r.image_width) * 3;
      m.image = reinterpret_cast<const char*>(r.image);
      input("image", "UINT8", std::to_string(r.image_height) + "," + std::to_string(r.image_width) + ",3",
            m.image_bytes);
    }
    json += "],\"outputs\":[{\"name\":\"image\",\"parameters\":{\"binary_data\":true}}]}";
    std::string head = "POST /v2/models/" + model_ + "/infer HTTP/1.1\r\nHost: " + where() +
                       "\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: " +
                       std::to_string(json.size()) +
                       "\r\nContent-Length: " + std::to_string(json.size() + data.size() + m.image_bytes) + "\r\n\r\n";
    m.prefix = head + json + data;
    return m;
  }

  // Sends all of it; false where the server stopped taking it (send_error_ says why; the reply may tell more).
  bool send_all(const char* bytes, size_t size) {
    size_t sent = 0;
    while (sent < size) {
      // each wait for room to send more is bounded by timeout_s_, signals or not (a send then blocks at most as
      // long again, SO_SNDTIMEO, for what does not fit at once)
      if (wait_for(fd_, POLLOUT, timeout_s_) == 0)
        fail("cannot send to " + where() + ": nothing more was taken within " + std::to_string(timeout_s_) + " s");
#ifdef MSG_NOSIGNAL
      ssize_t n = ::send(fd_, bytes + sent, size - sent, MSG_NOSIGNAL);
#else
      ssize_t n = ::send(fd_, bytes + sent, size - sent, 0);
#endif
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        std::string why = "cannot send to " + where() + ": " + std::strerror(errno);
        if (errno != EPIPE && errno != ECONNRESET) fail(why);
        not_taken_ = true;
        send_error_ = why;
        return false;
      }
      sent += static_cast<size_t>(n);
    }
    return true;
  }

  // Reads into buf until it holds at least `want` bytes; false if the server closed the connection first.
  bool fill(std::string& buf, size_t want) {
    char chunk[65536];
    while (buf.size() < want) {
      // each wait for the next bytes is bounded by timeout_s_, signals or not (recv then does not block)
      if (wait_for(fd_, POLLIN, timeout_s_) == 0)
        fail("no answer from " + where() + " within " + std::to_string(timeout_s_) + " s");
      ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        bool timeout = errno == EAGAIN || errno == EWOULDBLOCK;
        not_taken_ = !reply_started_ && errno == ECONNRESET;
        if (!send_error_.empty() && !timeout) fail(send_error_);  // no answer came before the connection went
        fail(timeout ? "no answer from " + where() + " within " + std::to_string(timeout_s_) + " s"
                     : "cannot read from " + where() + ": " + std::strerror(errno));
      }
      if (n == 0) return false;
      reply_started_ = true;
      not_taken_ = false;  // (the server answered)
      buf.append(chunk, static_cast<size_t>(n));
    }
    return true;
  }

  Image exchange(const Message& message) {
    reply_started_ = not_taken_ = false;
    send_error_.clear();
    if (fd_ < 0) connect();
    bool whole = send_all(message.prefix.data(), message.prefix.size()) &&
                 (message.image_bytes == 0 || send_all(message.image, message.image_bytes));
    std::string buf;
    size_t end;
    while ((end = buf.find("\r\n\r\n")) == std::string::npos) {
      if (buf.size() > 65536) fail("the reply from " + where() + " is not HTTP");
      if (!fill(buf, buf.size() + 1)) {
        fail(whole ? "the server at " + where() + " closed the connection without an answer" : send_error_);
      }
    }
    // The status line and the headers we need.
    std::string head = buf.substr(0, end);
    buf.erase(0, end + 4);
    if (head.compare(0, 5, "HTTP/") != 0 || head.find(' ') == std::string::npos)
      fail("the reply from " + where() + " is not HTTP: " + head.substr(0, 80));
    int status = std::atoi(head.c_str() + head.find(' ') + 1);
    long long length = -1, json_length = -1;
    bool chunked = false, close_after = false;
    size_t pos = head.find("\r\n");
    while (pos != std::string::npos) {
      size_t next = head.find("\r\n", pos + 2);
      std::string line = head.substr(pos + 2, next == std::string::npos ? std::string::npos : next - pos - 2);
      size_t colon = line.find(':');
      if (colon != std::string::npos) {
        std::string name = detail::lower(line.substr(0, colon)), value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(" \t"));
        value.erase(value.find_last_not_of(" \t") + 1);
        if (name == "content-length") length = count("Content-Length", value);
        else if (name == "inference-header-content-length")
          json_length = count("Inference-Header-Content-Length", value);
        else if (name == "transfer-encoding") chunked = detail::lower(value).find("chunked") != std::string::npos;
        else if (name == "connection") close_after = detail::lower(value).find("close") != std::string::npos;
      }
      pos = next;
    }
    std::string body = read_body(buf, chunked, length);
    if (close_after || !whole) disconnect();
    if (status != 200) {
      std::string text = body;
      try {
        detail::Json reply = detail::JsonParser(body).parse();
        const detail::Json* error = reply.get("error");
        if (error != nullptr && error->kind == detail::Json::kString) text = error->string;
      } catch (const Error&) {
      }
      throw Error(status, text.empty() ? "HTTP " + std::to_string(status) + " from " + where() : text);
    }
    return decode(body, json_length);
  }

  std::string read_body(std::string& buf, bool chunked, long long length) {
    if (chunked) {
      std::string body;
      while (true) {
        size_t eol;
        while ((eol = buf.find("\r\n")) == std::string::npos)
          if (buf.size() > 1024 || !fill(buf, buf.size() + 1)) fail("the reply from " + where() + " was cut short");
        size_t size = 0, digits = 0;  // the chunk's size in hex (an extension after ';' is ignored)
        for (; digits < eol && std::isxdigit(static_cast<unsigned char>(buf[digits])); ++digits) {
          char h = buf[digits];
          size = size * 16 + static_cast<size_t>(h <= '9' ? h - '0' : (h | 0x20) - 'a' + 10);
          if (size > kMaxBody) fail("the reply from " + where() + " has a chunk over 1 GiB");
        }
        if (digits == 0 || (digits < eol && buf[digits] != ';'))
          fail("the reply from " + where() + " is not chunked as HTTP says");
        buf.erase(0, eol + 2);
        if (!fill(buf, size + 2)) fail("the reply from " + where() + " was cut short");
        if (buf.compare(size, 2, "\r\n") != 0) fail("the reply from " + where() + " is not chunked as HTTP says");
        if (body.size() + size > kMaxBody) fail("the reply from " + where() + " is over 1 GiB");
        body.append(buf, 0, size);
        buf.erase(0, size + 2);
        if (size == 0) return body;  // (trailers are not used by the server)
      }
    }
    if (length < 0) {  // until the server closes the connection
      while (fill(buf, buf.size() + 65536))
        if (buf.size() > kMaxBody) fail("the reply from " + where() + " is over 1 GiB");
      disconnect();
      return std::move(buf);
    }
    if (!fill(buf, static_cast<size_t>(length))) fail("the reply from " + where() + " was cut short");
    buf.resize(static_cast<size_t>(length));  // one request at a time per connection: nothing follows the reply
    return std::move(buf);
  }

  // A header's count: digits only, at most kMaxBody; -1 where the header is absent.
  long long count(const std::string& name, const std::string& value) {
    if (value.empty() || value.size() > 10 || value.find_first_not_of("0123456789") != std::string::npos ||
        std::stoll(value) > static_cast<long long>(kMaxBody))
      fail("the reply from " + where() + " has " + name + ": " + value.substr(0, 40));
    return std::stoll(value);
  }

  // A JSON number that is a whole number in [lo, hi].
  static bool whole(const detail::Json* v, double lo, double hi) {
    return v != nullptr && v->kind == detail::Json::kNumber && v->number >= lo && v->number <= hi &&
           v->number == static_cast<double>(static_cast<long long>(v->number));
  }

  Image decode(const std::string& body, long long json_length) {
    if (json_length < 0 || static_cast<size_t>(json_length) > body.size())
      fail("the reply from " + where() + " has no binary image (Inference-Header-Content-Length missing)");
    detail::Json reply = detail::JsonParser(body.substr(0, static_cast<size_t>(json_length))).parse();
    const detail::Json* outputs = reply.get("outputs");
    size_t offset = static_cast<size_t>(json_length);
    const double left = static_cast<double>(body.size());
    if (outputs != nullptr) {
      for (const detail::Json& out : outputs->items) {  // binary outputs follow the header in this order
        const detail::Json *name = out.get("name"), *shape = out.get("shape"), *params = out.get("parameters");
        const detail::Json* size = params != nullptr ? params->get("binary_data_size") : nullptr;
        if (size == nullptr) continue;
        if (!whole(size, 0, left - static_cast<double>(offset)))
          fail("the reply from " + where() + " has binary data beyond its end");
        size_t bytes = static_cast<size_t>(size->number);
        if (name != nullptr && name->string == "image") {
          bool ok = shape != nullptr && shape->items.size() == 3 && whole(&shape->items[0], 1, 65536) &&
                    whole(&shape->items[1], 1, 65536) && whole(&shape->items[2], 3, 3);
          Image image;
          image.height = ok ? static_cast<int32_t>(shape->items[0].number) : 0;
          image.width = ok ? static_cast<int32_t>(shape->items[1].number) : 0;
          if (!ok || bytes != static_cast<size_t>(image.height) * static_cast<size_t>(image.width) * 3)
            fail("the reply from " + where() + " has an image of " + std::to_string(bytes) +
                 " bytes that is not [height, width, 3]");
          image.rgb.assign(body.begin() + static_cast<std::ptrdiff_t>(offset),
                           body.begin() + static_cast<std::ptrdiff_t>(offset + bytes));
          return image;
        }
        offset += bytes;
      }
    }
    fail("the reply from " + where() + " has no output 'image': " + body.substr(0, 200));
  }
};

}  // namespace sdturbo
