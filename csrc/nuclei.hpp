// Random polygon nuclei drawn and placed in one pass: the shapes of method.md §2, with a
// counter-based random stream per candidate so that a slow reference can reproduce every vertex.
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
  double radius_lo, radius_hi;         // mean radius range (before the size factor)
  double size_factor;                  // per-patch scale of radii
  double margin;  // centres fall in [-margin, w + margin) × [-margin, h + margin)
};

// Candidate c draws, in this order from its own stream: centre x, y (uniform over the patch and
// margin; a centre outside tissue (tissue[i*tissue_stride + j] == 0 at the clamped, truncated
// position) ends the candidate), radius r = U(radius_lo, radius_hi)·size_factor, N = U{min..max}
// vertices at angular steps U(2π/N ± irregularity·2π/N) renormalised to 2π, a rotation U(0, 2π),
// spike = U(lo, hi), and per vertex a radius clamp(r + spike·r·Normal, 0, 2r); then Chaikin rounds,
// the Jacobian of the homography h (3×3, row-major) at the centre, and the move to the centre.
// Candidates are placed in order as by place_polygons. Returns the number accepted; stats as for
// place_polygons.
int64_t draw_nuclei(uint64_t seed, int64_t k, const uint8_t* tissue, int64_t tissue_stride,
                    const double* h3, const PolygonParams& params, double max_overlap,
                    int64_t min_area, int64_t max_accept, int32_t* labels, double* stats, int64_t h,
                    int64_t w);

}  // namespace pysynth
