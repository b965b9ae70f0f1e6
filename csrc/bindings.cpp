// The only file that includes pybind11: every kernel lives in plain C++ on raw buffers.
//
// The Python wrappers in pysynth.synth validate shapes, dtypes and values, make every array
// C-contiguous of the right dtype and allocate the outputs; these bindings only unpack buffers
// (.noconvert(): a silent copy of an output would lose the result) and release the GIL around the
// work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>

#include "build_info.hpp"
#include "composite.hpp"
#include "deconv.hpp"
#include "inpaint.hpp"
#include "raster.hpp"

namespace py = pybind11;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;

template <typename T>
const T* cptr(const Array<T>& a) {
  return a.data();
}

template <typename T>
T* mptr(Array<T>& a) {
  return a.mutable_data();
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
      "rasterize_labels",
      [](const Array<float>& xy, const Array<int64_t>& offsets, const Array<int32_t>& ids,
         Array<int32_t>& labels) {
        const float* pxy = cptr(xy);
        const int64_t* poff = cptr(offsets);
        const int32_t* pids = cptr(ids);
        int32_t* out = mptr(labels);
        const int64_t n = ids.shape(0), h = labels.shape(0), w = labels.shape(1);
        py::gil_scoped_release release;
        pysynth::rasterize_labels(pxy, poff, n, pids, out, h, w);
      },
      py::arg("xy").noconvert(), py::arg("offsets").noconvert(), py::arg("ids").noconvert(),
      py::arg("labels").noconvert(),
      "Paint polygons into labels (h, w) int32. Use pysynth.synth.raster.rasterize_polygons.");

  m.def(
      "rasterize_coverage",
      [](const Array<float>& xy, const Array<int64_t>& offsets, Array<float>& coverage) {
        const float* pxy = cptr(xy);
        const int64_t* poff = cptr(offsets);
        float* out = mptr(coverage);
        const int64_t n = offsets.shape(0) - 1, h = coverage.shape(0), w = coverage.shape(1);
        py::gil_scoped_release release;
        pysynth::rasterize_coverage(pxy, poff, n, out, h, w);
      },
      py::arg("xy").noconvert(), py::arg("offsets").noconvert(), py::arg("coverage").noconvert(),
      "4x4-supersampled coverage (h, w) float32 of the union of polygons. Use "
      "pysynth.synth.raster.rasterize_polygons.");

  m.def(
      "rgb_to_stains",
      [](const Array<uint8_t>& rgb, const Array<float>& stain_from_rgb, Array<float>& out) {
        const uint8_t* in = cptr(rgb);
        const float* mat = cptr(stain_from_rgb);
        float* o = mptr(out);
        const int64_t n = rgb.size() / 3;
        py::gil_scoped_release release;
        pysynth::rgb_to_stains(in, n, mat, o);
      },
      py::arg("rgb").noconvert(), py::arg("stain_from_rgb").noconvert(), py::arg("out").noconvert(),
      "Colour deconvolution of uint8 RGB. Use pysynth.synth.deconv.rgb_to_hed.");

  m.def(
      "stains_to_rgb",
      [](const Array<float>& stains, const Array<float>& rgb_from_stain, Array<uint8_t>& out) {
        const float* in = cptr(stains);
        const float* mat = cptr(rgb_from_stain);
        uint8_t* o = mptr(out);
        const int64_t n = stains.size() / 3;
        py::gil_scoped_release release;
        pysynth::stains_to_rgb(in, n, mat, o);
      },
      py::arg("stains").noconvert(), py::arg("rgb_from_stain").noconvert(),
      py::arg("out").noconvert(),
      "Stain densities back to uint8 RGB. Use pysynth.synth.deconv.hed_to_rgb.");

  m.def(
      "inpaint_push_pull",
      [](const Array<uint8_t>& image, const Array<uint8_t>& mask, const Array<int32_t>& offsets_yx,
         int64_t texture_levels, float texture, Array<uint8_t>& out) {
        const uint8_t* img = cptr(image);
        const uint8_t* msk = cptr(mask);
        const int32_t* off = cptr(offsets_yx);
        uint8_t* o = mptr(out);
        const int64_t h = image.shape(0), w = image.shape(1), n_off = offsets_yx.shape(0);
        py::gil_scoped_release release;
        pysynth::inpaint_push_pull(img, msk, h, w, off, n_off, texture_levels, texture, o);
      },
      py::arg("image").noconvert(), py::arg("mask").noconvert(), py::arg("offsets_yx").noconvert(),
      py::arg("texture_levels"), py::arg("texture"), py::arg("out").noconvert(),
      "Push-pull inpainting with texture transplant. Use pysynth.synth.inpaint.inpaint.");

  m.def(
      "composite",
      [](const Array<uint8_t>& fg, const Array<uint8_t>& bg, const Array<float>& mask,
         const std::optional<Array<float>>& sharpness, const Array<float>& k_sharp,
         const Array<float>& k_soft, Array<uint8_t>& out) {
        const uint8_t* a = cptr(fg);
        const uint8_t* b = cptr(bg);
        const float* msk = cptr(mask);
        const float* s = sharpness ? cptr(*sharpness) : nullptr;
        const float* ks = cptr(k_sharp);
        const float* kf = cptr(k_soft);
        uint8_t* o = mptr(out);
        const int64_t h = mask.shape(0), w = mask.shape(1);
        const int64_t rs = (k_sharp.shape(0) - 1) / 2, rf = (k_soft.shape(0) - 1) / 2;
        py::gil_scoped_release release;
        pysynth::composite(a, b, msk, s, ks, rs, kf, rf, o, h, w);
      },
      py::arg("fg").noconvert(), py::arg("bg").noconvert(), py::arg("mask").noconvert(),
      py::arg("sharpness").noconvert(), py::arg("k_sharp").noconvert(),
      py::arg("k_soft").noconvert(), py::arg("out").noconvert(),
      "Blurred-boundary compositing. Use pysynth.synth.composite.composite_nuclei.");
}
