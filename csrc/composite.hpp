// Compositing nuclei into background with a boundary blur whose sharpness varies from pixel to
// pixel.
#pragma once

#include <cstdint>

namespace pysynth {

// out = round(fg * m + bg * (1 - m)) per channel, m = clip(s * (mask * k_sharp) + (1 - s) * (mask *
// k_soft), 0, 1), with s = clip(sharpness, 0, 1) (sharpness == nullptr: s = 1) and * a separable
// convolution with the symmetric kernels k (2 * r + 1 taps each, reflect-101 borders as
// cv2.BORDER_DEFAULT). fg, bg, out: (h, w, 3).
void composite(const uint8_t* fg, const uint8_t* bg, const float* mask, const float* sharpness,
               const float* k_sharp, int64_t r_sharp, const float* k_soft, int64_t r_soft,
               uint8_t* out, int64_t h, int64_t w);

}  // namespace pysynth
