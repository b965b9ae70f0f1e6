// The only file that includes pybind11: every kernel lives in plain C++ on raw buffers.
//
// The Python wrappers in pysynth.synth validate shapes, dtypes and values, make every array
// C-contiguous of the right dtype and allocate the outputs; these bindings only unpack buffers
// (.noconvert(): a silent copy of an output would lose the result) and release the GIL around the
// work.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <type_traits>

#include "build_info.hpp"
#include "composite.hpp"
#include "contours.hpp"
#include "deconv.hpp"
#include "inpaint.hpp"
#include "labels.hpp"
#include "nuclei.hpp"
#include "paint.hpp"
#include "place.hpp"
#include "raster.hpp"
#include "upsample.hpp"
#include "watershed.hpp"

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

// A 2-D float32 view whose rows may be spaced apart (a crop of a larger image); columns must be
// adjacent.
pysynth::Plane plane(const py::array_t<float>& a, int64_t h, int64_t w) {
  if (a.ndim() != 2 || a.shape(0) != h || a.shape(1) != w || a.strides(1) != sizeof(float) ||
      a.strides(0) % static_cast<py::ssize_t>(sizeof(float)) != 0) {
    throw std::invalid_argument("plane: expected a float32 (h, w) view with adjacent columns");
  }
  return {a.data(), static_cast<int64_t>(a.strides(0) / sizeof(float))};
}

// The decoder join on float32 or bfloat16 (uint16) buffers: low (h, w, c1), skip and out (2h, 2w, .).
template <typename T>
void upsample_concat(const Array<T>& low, const Array<T>& skip, Array<T>& out, int threads) {
  if (low.ndim() != 3 || skip.ndim() != 3 || out.ndim() != 3 || skip.shape(0) != 2 * low.shape(0) ||
      skip.shape(1) != 2 * low.shape(1) || out.shape(0) != skip.shape(0) ||
      out.shape(1) != skip.shape(1) || out.shape(2) != low.shape(2) + skip.shape(2)) {
    throw std::invalid_argument(
        "upsample2x_concat: expected low (h, w, c1), skip (2h, 2w, c2), out (2h, 2w, c1 + c2)");
  }
  const int64_t h = low.shape(0), w = low.shape(1), c1 = low.shape(2), c2 = skip.shape(2);
  const T* pl = low.data();
  const T* ps = skip.data();
  T* po = out.mutable_data();
  py::gil_scoped_release release;
  if constexpr (std::is_same_v<T, float>) {
    pysynth::upsample2x_concat(pl, h, w, c1, ps, c2, po, threads);
  } else {
    pysynth::upsample2x_concat_bf16(pl, h, w, c1, ps, c2, po, threads);
  }
}

// The encoder's 2x2 max pooling: in (H, W, c) with H, W even, out (H/2, W/2, c).
template <typename T>
void max_pool(const Array<T>& in, Array<T>& out, int threads) {
  if (in.ndim() != 3 || out.ndim() != 3 || in.shape(0) % 2 || in.shape(1) % 2 ||
      out.shape(0) * 2 != in.shape(0) || out.shape(1) * 2 != in.shape(1) ||
      out.shape(2) != in.shape(2)) {
    throw std::invalid_argument("max_pool2x2: expected in (H, W, c) with H, W even and out (H/2, W/2, c)");
  }
  const int64_t H = in.shape(0), W = in.shape(1), c = in.shape(2);
  const T* pi = in.data();
  T* po = out.mutable_data();
  py::gil_scoped_release release;
  if constexpr (std::is_same_v<T, float>) {
    pysynth::max_pool2x2(pi, H, W, c, po, threads);
  } else {
    pysynth::max_pool2x2_bf16(pi, H, W, c, po, threads);
  }
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

  m.def(
      "place_polygons",
      [](const Array<double>& xy, const Array<int64_t>& offsets, double max_overlap,
         int64_t min_area, int64_t max_accept, Array<int32_t>& labels, Array<double>& stats) {
        const int64_t h = labels.shape(0), w = labels.shape(1);
        const int64_t n = offsets.shape(0) - 1;
        const double* pxy = xy.data();
        const int64_t* poff = offsets.data();
        int32_t* plab = labels.mutable_data();
        double* pst = stats.mutable_data();
        py::gil_scoped_release release;
        return pysynth::place_polygons(pxy, poff, n, max_overlap, min_area, max_accept, plab, pst,
                                       h, w);
      },
      py::arg("xy").noconvert(), py::arg("offsets").noconvert(), py::arg("max_overlap"),
      py::arg("min_area"), py::arg("max_accept"), py::arg("labels").noconvert(),
      py::arg("stats").noconvert(),
      "Place polygon candidates in order into int32 labels (see pysynth.synth.place).");

  m.def(
      "paint_nuclei",
      [](const Array<uint8_t>& background, const std::optional<Array<float>>& extra,
         const Array<int32_t>& labels, const Array<uint16_t>& grown, const Array<uint8_t>& region,
         const Array<uint8_t>& sharp, const Array<uint8_t>& soft, const py::array_t<float>& mix,
         const Array<float>& darkness, const Array<uint8_t>& clear,
         const py::array_t<float>& texture, const py::array_t<float>& speckle,
         const py::array_t<float>& gain, const py::array_t<float>& thin, float gain_lo,
         float gain_span, float thin_threshold, float clear_factor, float rim_gain, float contrast,
         const Array<float>& stain, const Array<float>& nuclear_jitter,
         const Array<float>& global_jitter, Array<uint8_t>& out) {
        const int64_t h = out.shape(0), w = out.shape(1);
        const pysynth::Plane mx = plane(mix, h, w), tex = plane(texture, h, w),
                             spk = plane(speckle, h, w), gn = plane(gain, h, w),
                             th = plane(thin, h, w);
        const float* pextra = extra ? extra->data() : nullptr;
        const uint8_t* pbg = background.data();
        const int32_t* plab = labels.data();
        const uint16_t* pgrown = grown.data();
        const uint8_t* preg = region.data();
        const uint8_t* psharp = sharp.data();
        const uint8_t* psoft = soft.data();
        const float* pdark = darkness.data();
        const uint8_t* pclear = clear.data();
        const float* pstain = stain.data();
        const float* pnj = nuclear_jitter.data();
        const float* pgj = global_jitter.data();
        uint8_t* pout = out.mutable_data();
        py::gil_scoped_release release;
        pysynth::paint_nuclei(pbg, pextra, plab, pgrown, preg, psharp, psoft, mx, pdark, pclear,
                              tex, spk, gn, th, gain_lo, gain_span, thin_threshold, clear_factor,
                              rim_gain, contrast, pstain, pnj, pgj, pout, h, w);
      },
      py::arg("background").noconvert(), py::arg("extra").noconvert(),
      py::arg("labels").noconvert(), py::arg("grown").noconvert(), py::arg("region").noconvert(),
      py::arg("sharp").noconvert(), py::arg("soft").noconvert(), py::arg("mix").noconvert(),
      py::arg("darkness").noconvert(), py::arg("clear").noconvert(), py::arg("texture").noconvert(),
      py::arg("speckle").noconvert(), py::arg("gain").noconvert(), py::arg("thin").noconvert(),
      py::arg("gain_lo"), py::arg("gain_span"), py::arg("thin_threshold"), py::arg("clear_factor"),
      py::arg("rim_gain"), py::arg("contrast"), py::arg("stain").noconvert(),
      py::arg("nuclear_jitter").noconvert(), py::arg("global_jitter").noconvert(),
      py::arg("out").noconvert(),
      "Paint nuclei into a background in one pass (see pysynth.synth.paint).");

  m.def(
      "draw_nuclei",
      [](uint64_t seed, int64_t k, const py::array_t<uint8_t>& tissue,
         const Array<double>& homography, int64_t vertices_min, int64_t vertices_max,
         double irregularity, double spike_lo, double spike_hi, int64_t smooth_rounds,
         double radius_lo, double radius_hi, double size_factor, double margin, double max_overlap,
         int64_t min_area, int64_t max_accept, Array<int32_t>& labels, Array<double>& stats) {
        const int64_t h = labels.shape(0), w = labels.shape(1);
        if (tissue.ndim() != 2 || tissue.shape(0) != h || tissue.shape(1) != w ||
            tissue.strides(1) != 1) {
          throw std::invalid_argument(
              "draw_nuclei: tissue must be a uint8 (h, w) view with adjacent columns");
        }
        const pysynth::PolygonParams params{vertices_min, vertices_max,  irregularity, spike_lo,
                                            spike_hi,     smooth_rounds, radius_lo,    radius_hi,
                                            size_factor,  margin};
        const uint8_t* pt = tissue.data();
        const int64_t stride = tissue.strides(0);
        const double* ph = homography.data();
        int32_t* plab = labels.mutable_data();
        double* pst = stats.mutable_data();
        py::gil_scoped_release release;
        return pysynth::draw_nuclei(seed, k, pt, stride, ph, params, max_overlap, min_area,
                                    max_accept, plab, pst, h, w);
      },
      py::arg("seed"), py::arg("k"), py::arg("tissue").noconvert(),
      py::arg("homography").noconvert(), py::arg("vertices_min"), py::arg("vertices_max"),
      py::arg("irregularity"), py::arg("spike_lo"), py::arg("spike_hi"), py::arg("smooth_rounds"),
      py::arg("radius_lo"), py::arg("radius_hi"), py::arg("size_factor"), py::arg("margin"),
      py::arg("max_overlap"), py::arg("min_area"), py::arg("max_accept"),
      py::arg("labels").noconvert(), py::arg("stats").noconvert(),
      "Draw random polygon nuclei and place them in one pass (see "
      "pysynth.synth.place.draw_nuclei).");

  m.def(
      "watershed",
      [](const Array<float>& elevation, const Array<uint8_t>& mask, Array<int32_t>& labels,
         int connectivity) {
        const int64_t h = labels.shape(0), w = labels.shape(1);
        const float* pe = elevation.data();
        const uint8_t* pm = mask.data();
        int32_t* pl = labels.mutable_data();
        py::gil_scoped_release release;
        pysynth::watershed(pe, pm, pl, h, w, connectivity);
      },
      py::arg("elevation").noconvert(), py::arg("mask").noconvert(), py::arg("labels").noconvert(),
      py::arg("connectivity"), "Marker-controlled watershed in place (see pysynth.instances).");

  m.def(
      "trace_contours",
      [](const Array<int32_t>& labels, int32_t n_labels) {
        const int64_t h = labels.shape(0), w = labels.shape(1);
        std::vector<int32_t> xy;
        std::vector<int64_t> offsets;
        {
          const int32_t* pl = labels.data();
          py::gil_scoped_release release;
          pysynth::trace_contours(pl, h, w, n_labels, xy, offsets);
        }
        py::array_t<int32_t> xy_out(
            {static_cast<py::ssize_t>(xy.size() / 2), static_cast<py::ssize_t>(2)});
        std::copy(xy.begin(), xy.end(), xy_out.mutable_data());
        py::array_t<int64_t> off_out(static_cast<py::ssize_t>(offsets.size()));
        std::copy(offsets.begin(), offsets.end(), off_out.mutable_data());
        return py::make_tuple(xy_out, off_out);
      },
      py::arg("labels").noconvert(), py::arg("n_labels"),
      "Outer boundary of each label as a polygon along pixel edges (see "
      "pysynth.instances.trace_contours).");

  m.def("upsample2x_concat", &upsample_concat<float>, py::arg("low").noconvert(),
        py::arg("skip").noconvert(), py::arg("out").noconvert(), py::arg("threads"),
        "Bilinear 2x upsampling of low concatenated with skip, channels last, float32 (see "
        "pysynth.models.unet.upsample_concat).");
  m.def("upsample2x_concat_bf16", &upsample_concat<uint16_t>, py::arg("low").noconvert(),
        py::arg("skip").noconvert(), py::arg("out").noconvert(), py::arg("threads"),
        "The same on bfloat16 values held as uint16 (see pysynth.models.unet.upsample_concat).");
  m.def("max_pool2x2", &max_pool<float>, py::arg("input").noconvert(), py::arg("out").noconvert(),
        py::arg("threads"),
        "2x2 max pooling without indices, channels last, float32 (see pysynth.models.unet.max_pool).");
  m.def("max_pool2x2_bf16", &max_pool<uint16_t>, py::arg("input").noconvert(),
        py::arg("out").noconvert(), py::arg("threads"),
        "The same on bfloat16 values held as uint16 (see pysynth.models.unet.max_pool).");

  m.def(
      "label_moments",
      [](const Array<int32_t>& labels, int64_t n) {
        if (labels.ndim() != 2 || n < 0) {
          throw std::invalid_argument("label_moments: expected (h, w) int32 labels and n >= 0");
        }
        const int64_t h = labels.shape(0), w = labels.shape(1);
        Array<int64_t> count(n + 1), first(n + 1);
        Array<double> sum_y(n + 1), sum_x(n + 1);
        const int32_t* pl = labels.data();
        int64_t* pc = count.mutable_data();
        int64_t* pf = first.mutable_data();
        double* py_ = sum_y.mutable_data();
        double* px = sum_x.mutable_data();
        {
          py::gil_scoped_release release;
          pysynth::label_moments(pl, h, w, n, pc, py_, px, pf);
        }
        return py::make_tuple(count, sum_y, sum_x, first);
      },
      py::arg("labels").noconvert(), py::arg("n"),
      "Per label: pixel count, sums of rows and columns, first raster index (see "
      "pysynth.instances.label_moments).");

  m.def(
      "label_reduce",
      [](const Array<int32_t>& labels, const Array<float>& values, int64_t n) {
        if (labels.ndim() != 2 || values.ndim() != 2 || labels.shape(0) != values.shape(0) ||
            labels.shape(1) != values.shape(1) || n < 0) {
          throw std::invalid_argument("label_reduce: expected labels and values of one (h, w) shape");
        }
        Array<int64_t> count(n + 1);
        Array<double> sum(n + 1), max(n + 1);
        const int32_t* pl = labels.data();
        const float* pv = values.data();
        int64_t* pc = count.mutable_data();
        double* ps = sum.mutable_data();
        double* pm = max.mutable_data();
        const int64_t size = labels.size();
        {
          py::gil_scoped_release release;
          pysynth::label_reduce(pl, pv, size, n, pc, ps, pm);
        }
        return py::make_tuple(count, sum, max);
      },
      py::arg("labels").noconvert(), py::arg("values").noconvert(), py::arg("n"),
      "Per label: pixel count, sum and maximum of values over its pixels (see "
      "pysynth.instances.label_reduce).");
}
