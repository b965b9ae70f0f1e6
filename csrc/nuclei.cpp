#include "nuclei.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

#include "place.hpp"

namespace pysynth {

uint64_t splitmix64(uint64_t& state) {
  state += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

namespace {

constexpr double kTwoPi = 6.283185307179586;

inline double uniform(uint64_t& state) {  // [0, 1) with 53 random bits
  return static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;
}

inline double normal(uint64_t& state) {  // Box-Muller, one value per pair of uniforms
  const double u1 = 1.0 - uniform(state);
  const double u2 = uniform(state);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

void make_polygon(uint64_t& state, double radius, const PolygonParams& p, std::vector<double>& xy,
                  std::vector<double>& tmp, std::vector<double>& angles) {
  const int64_t span = p.vertices_max - p.vertices_min + 1;
  const int64_t n =
      p.vertices_min + std::min<int64_t>(span - 1, static_cast<int64_t>(uniform(state) * span));
  const double step = kTwoPi / static_cast<double>(n);
  const double delta = p.irregularity * step;
  angles.resize(static_cast<size_t>(n));
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    angles[i] = (step - delta) + uniform(state) * (2.0 * delta);
    total += angles[i];
  }
  const double phase = uniform(state) * kTwoPi;
  const double spike = p.spike_lo + uniform(state) * (p.spike_hi - p.spike_lo);
  xy.resize(static_cast<size_t>(2 * n));
  double cum = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += angles[i] * (kTwoPi / total);
    const double r = std::clamp(radius + spike * radius * normal(state), 0.0, 2.0 * radius);
    xy[2 * i] = r * std::cos(cum + phase);
    xy[2 * i + 1] = r * std::sin(cum + phase);
  }
  for (int64_t round = 0; round < p.smooth_rounds; ++round) {
    const size_t m = xy.size() / 2;
    tmp.resize(4 * m);
    for (size_t i = 0; i < m; ++i) {
      const size_t k = (i + 1 == m) ? 0 : i + 1;
      for (int d = 0; d < 2; ++d) {
        tmp[4 * i + d] = 0.75 * xy[2 * i + d] + 0.25 * xy[2 * k + d];
        tmp[4 * i + 2 + d] = 0.25 * xy[2 * i + d] + 0.75 * xy[2 * k + d];
      }
    }
    xy.swap(tmp);
  }
}

}  // namespace

int64_t draw_nuclei(uint64_t seed, int64_t k, const uint8_t* tissue, int64_t tissue_stride,
                    const double* h3, const PolygonParams& params, double max_overlap,
                    int64_t min_area, int64_t max_accept, int32_t* labels, double* stats, int64_t h,
                    int64_t w) {
  std::vector<double> xy, tmp, angles;
  xy.reserve(256);
  tmp.reserve(256);
  angles.reserve(32);
  int64_t accepted = 0;
  for (int64_t c = 0; c < k && accepted < max_accept; ++c) {
    uint64_t state = seed ^ (static_cast<uint64_t>(c) * 0xD1B54A32D192ED03ULL);
    const double cx =
        -params.margin + uniform(state) * (static_cast<double>(w) + 2.0 * params.margin);
    const double cy =
        -params.margin + uniform(state) * (static_cast<double>(h) + 2.0 * params.margin);
    const int64_t ti = std::clamp<int64_t>(static_cast<int64_t>(cy), 0, h - 1);
    const int64_t tj = std::clamp<int64_t>(static_cast<int64_t>(cx), 0, w - 1);
    if (tissue[ti * tissue_stride + tj] == 0) continue;
    const double radius =
        (params.radius_lo + uniform(state) * (params.radius_hi - params.radius_lo)) *
        params.size_factor;
    make_polygon(state, radius, params, xy, tmp, angles);
    // Jacobian of the homography at the centre.
    const double den = h3[6] * cx + h3[7] * cy + h3[8];
    const double u = (h3[0] * cx + h3[1] * cy + h3[2]) / den;
    const double v = (h3[3] * cx + h3[4] * cy + h3[5]) / den;
    const double m00 = (h3[0] - u * h3[6]) / den, m01 = (h3[1] - u * h3[7]) / den;
    const double m10 = (h3[3] - v * h3[6]) / den, m11 = (h3[4] - v * h3[7]) / den;
    const size_t n = xy.size() / 2;
    for (size_t i = 0; i < n; ++i) {
      const double x = xy[2 * i], y = xy[2 * i + 1];
      xy[2 * i] = m00 * x + m01 * y + cx;
      xy[2 * i + 1] = m10 * x + m11 * y + cy;
    }
    const int32_t label = static_cast<int32_t>(accepted + 1);
    if (place_one(xy.data(), static_cast<int64_t>(n), max_overlap, min_area, label, labels,
                  stats + 3 * accepted, h, w)) {
      ++accepted;
    }
  }
  return accepted;
}

}  // namespace pysynth
