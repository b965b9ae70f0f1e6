// Colour deconvolution (Ruifrok & Johnston): RGB <-> stain optical densities, as scikit-image
// defines it.
#pragma once

#include <cstdint>

namespace pysynth {

// hed[p, k] = max(0, sum_c od(rgb[p, c]) * stain_from_rgb[c, k]) with od(v) = log(max(v / 255,
// 1e-6)) / log(1e-6), for n pixels of interleaved uint8 RGB. stain_from_rgb is a row-major 3x3
// matrix.
void rgb_to_stains(const uint8_t* rgb, int64_t n, const float* stain_from_rgb, float* out);

// rgb[p, c] = round(255 * clip(exp(log(1e-6) * sum_k stains[p, k] * rgb_from_stain[k, c]), 0, 1)).
void stains_to_rgb(const float* stains, int64_t n, const float* rgb_from_stain, uint8_t* out);

}  // namespace pysynth
