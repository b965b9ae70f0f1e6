// The only file that includes pybind11: every kernel lives in plain C++ on raw buffers.
#include <pybind11/pybind11.h>

#include "build_info.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "pysynth's compiled core (C++17). Private: use the functions of the pysynth package.";

  m.def(
      "build_info",
      [] {
        const pysynth::BuildInfo info = pysynth::build_info();
        py::dict d;
        d["version"] = info.version;
        d["compiler"] = info.compiler;
        d["cxx_standard"] = info.cxx_standard;
        d["debug"] = info.debug;
        return d;
      },
      "How the compiled core was built: version, compiler, C++ standard, debug flag.");
}
