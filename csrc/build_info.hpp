// Facts about how the compiled core was built, for bug reports and `pysynth --version`.
#pragma once

#include <string>

namespace pysynth {

struct BuildInfo {
  std::string version;
  std::string compiler;
  int cxx_standard;
  bool debug;
};

BuildInfo build_info();

}  // namespace pysynth
