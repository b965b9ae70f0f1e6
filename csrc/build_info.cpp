#include "build_info.hpp"

#ifndef PYSYNTH_VERSION
#define PYSYNTH_VERSION "unknown"
#endif

namespace pysynth {

BuildInfo build_info() {
  BuildInfo info;
  info.version = PYSYNTH_VERSION;
#if defined(__clang__)
  info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info.compiler = "msvc " + std::to_string(_MSC_VER);
#else
  info.compiler = "unknown";
#endif
  info.cxx_standard = static_cast<int>(__cplusplus / 100 % 100);
#ifdef NDEBUG
  info.debug = false;
#else
  info.debug = true;
#endif
  return info;
}

}  // namespace pysynth
