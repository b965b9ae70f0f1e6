// Painting synthetic nuclei into a background by Beer-Lambert optics, in one pass over the patch.
#pragma once

#include <cstdint>

namespace pysynth {

// Optical-density look-up: OD(I) = -ln((I + 1) / 256), and back to 8 bits on a grid of 1/kOdSteps
// OD.
constexpr int kOdSteps = 512;
constexpr int kOdMax = 10;

// Per-pixel inputs that may be crops of larger images carry their own row stride (in elements).
struct Plane {
  const float* data;
  int64_t stride;
};

// out = 8-bit of exp(-(OD_bg + extra·stain + alpha·d·stain·nuclear_jitter) · global_jitter) per
// channel, with l = labels or, where 0, grown (the labels dilated, so the blurred edge takes its
// nucleus' density), alpha = (sharp + mix·(soft − sharp)) / 255 (the mask blurred by two widths,
// mixed by a smooth field), d = darkness[l] · (gain_lo + gain_span·gain) · (1 +
// contrast·(0.6·texture + 0.4·speckle)), thinned by clear_factor on interior pixels (region 2) of
// clear-chromatin nuclei where thin < thin_threshold, and raised by rim_gain on rim pixels (region
// 1). extra may be null. Images are h×w; background and out are RGB (3 bytes/pixel).
void paint_nuclei(const uint8_t* background, const float* extra, const int32_t* labels,
                  const uint16_t* grown, const uint8_t* region, const uint8_t* sharp,
                  const uint8_t* soft, Plane mix, const float* darkness, const uint8_t* clear,
                  Plane texture, Plane speckle, Plane gain, Plane thin, float gain_lo,
                  float gain_span, float thin_threshold, float clear_factor, float rim_gain,
                  float contrast, const float* stain, const float* nuclear_jitter,
                  const float* global_jitter, uint8_t* out, int64_t h, int64_t w);

}  // namespace pysynth
