// Random polygon nuclei drawn and placed in one pass: the shapes of method.md §2, with a counter-based
// random stream per candidate so that a slow reference can reproduce every vertex.
#pragma once

#include <cstdint>

namespace pysynth {

// splitmix64 step; the stream of candidate c starts at state = seed ^ (c * 0xD1B54A32D192ED03).
uint64_t splitmix64(uint64_t& state);

struct PolygonParams {
  int64_t vertices_min, vertices_max;  // vertex count, inclusive range
  double irregularity;                 // angular jitter as a fraction of 2π/N
  double spike_lo, spike_hi;           // radius spread range, fraction of the radius
  int64_t smooth_rounds;               // rounds of Chaikin corner cutting
};

// Candidate c: N = U{min..max} vertices at angular steps U(2π/N ± irregularity·2π/N) renormalised to 2π,
// rotated by U(0, 2π); spike = U(lo, hi); radii clamp(r_c + spike·r_c·Normal, 0, 2 r_c); Chaikin rounds;
// then mapped by the 2×2 matrix jac[4c..4c+4) (row-major) and moved to centres[2c..2c+2). Candidates are
// placed in order as by place_polygons. Returns the number accepted; stats as for place_polygons.
int64_t draw_nuclei(uint64_t seed, const double* centres, const double* radii, const double* jac, int64_t k,
                    const PolygonParams& params, double max_overlap, int64_t min_area, int64_t max_accept,
                    int32_t* labels, double* stats, int64_t h, int64_t w);

}  // namespace pysynth
