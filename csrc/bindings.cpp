// The only file that includes pybind11: every kernel lives in plain C++ on raw buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>

#include "build_info.hpp"
#include "paint.hpp"
#include "place.hpp"

namespace py = pybind11;

namespace {

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

// A 2-D float32 view whose rows may be spaced apart (a crop of a larger image); columns must be adjacent.
pysynth::Plane plane(const py::array_t<float>& a, int64_t h, int64_t w) {
  if (a.ndim() != 2 || a.shape(0) != h || a.shape(1) != w || a.strides(1) != sizeof(float) ||
      a.strides(0) % static_cast<py::ssize_t>(sizeof(float)) != 0) {
    throw std::invalid_argument("plane: expected a float32 (h, w) view with adjacent columns");
  }
  return {a.data(), static_cast<int64_t>(a.strides(0) / sizeof(float))};
}

}  // namespace

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

  m.def(
      "place_polygons",
      [](const carray<double>& xy, const carray<int64_t>& offsets, double max_overlap, int64_t min_area,
         int64_t max_accept, carray<int32_t>& labels, carray<double>& stats) {
        const int64_t h = labels.shape(0), w = labels.shape(1);
        const int64_t n = offsets.shape(0) - 1;
        const double* pxy = xy.data();
        const int64_t* poff = offsets.data();
        int32_t* plab = labels.mutable_data();
        double* pst = stats.mutable_data();
        py::gil_scoped_release release;
        return pysynth::place_polygons(pxy, poff, n, max_overlap, min_area, max_accept, plab, pst, h, w);
      },
      py::arg("xy").noconvert(), py::arg("offsets").noconvert(), py::arg("max_overlap"), py::arg("min_area"),
      py::arg("max_accept"), py::arg("labels").noconvert(), py::arg("stats").noconvert(),
      "Place polygon candidates in order into int32 labels (see pysynth.synth.place).");

  m.def(
      "paint_nuclei",
      [](const carray<uint8_t>& background, const std::optional<carray<float>>& extra,
         const carray<int32_t>& label_ext, const carray<uint8_t>& region, const carray<float>& alpha,
         const carray<float>& darkness, const carray<uint8_t>& clear, const py::array_t<float>& texture,
         const py::array_t<float>& speckle, const py::array_t<float>& gain, const py::array_t<float>& thin,
         float thin_threshold, float clear_factor, float rim_gain, float contrast, const carray<float>& stain,
         const carray<float>& nuclear_jitter, const carray<float>& global_jitter, carray<uint8_t>& out) {
        const int64_t h = out.shape(0), w = out.shape(1);
        const pysynth::Plane tex = plane(texture, h, w), spk = plane(speckle, h, w), gn = plane(gain, h, w),
                             th = plane(thin, h, w);
        const float* pextra = extra ? extra->data() : nullptr;
        const uint8_t* pbg = background.data();
        const int32_t* plab = label_ext.data();
        const uint8_t* preg = region.data();
        const float* palpha = alpha.data();
        const float* pdark = darkness.data();
        const uint8_t* pclear = clear.data();
        const float* pstain = stain.data();
        const float* pnj = nuclear_jitter.data();
        const float* pgj = global_jitter.data();
        uint8_t* pout = out.mutable_data();
        py::gil_scoped_release release;
        pysynth::paint_nuclei(pbg, pextra, plab, preg, palpha, pdark, pclear, tex, spk, gn, th, thin_threshold,
                              clear_factor, rim_gain, contrast, pstain, pnj, pgj, pout, h, w);
      },
      py::arg("background").noconvert(), py::arg("extra").noconvert(), py::arg("label_ext").noconvert(),
      py::arg("region").noconvert(), py::arg("alpha").noconvert(), py::arg("darkness").noconvert(),
      py::arg("clear").noconvert(), py::arg("texture").noconvert(), py::arg("speckle").noconvert(),
      py::arg("gain").noconvert(), py::arg("thin").noconvert(), py::arg("thin_threshold"),
      py::arg("clear_factor"), py::arg("rim_gain"), py::arg("contrast"), py::arg("stain").noconvert(),
      py::arg("nuclear_jitter").noconvert(), py::arg("global_jitter").noconvert(), py::arg("out").noconvert(),
      "Paint nuclei into a background in one pass (see pysynth.synth.paint).");
}
