#include "paint.hpp"

#include <algorithm>
#include <array>
#include <cmath>

namespace pysynth {

namespace {

struct Tables {
  std::array<float, 256> od;                      // 8-bit level -> optical density
  std::array<uint8_t, kOdSteps * kOdMax + 1> u8;  // OD on a 1/kOdSteps grid -> 8-bit level
  Tables() {
    for (int i = 0; i < 256; ++i) od[i] = static_cast<float>(-std::log((i + 1.0) / 256.0));
    for (size_t k = 0; k < u8.size(); ++k) {
      const double v = std::exp(-static_cast<double>(k) / kOdSteps) * 256.0 - 1.0;
      u8[k] = static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L));
    }
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline uint8_t to_u8(float od, const Tables& t) {
  const float k = std::clamp(od * static_cast<float>(kOdSteps) + 0.5f, 0.0f,
                             static_cast<float>(kOdSteps * kOdMax));
  return t.u8[static_cast<size_t>(k)];
}

}  // namespace

void paint_nuclei(const uint8_t* background, const float* extra, const int32_t* labels,
                  const uint16_t* grown, const uint8_t* region, const uint8_t* sharp,
                  const uint8_t* soft, Plane mix, const float* darkness, const uint8_t* clear,
                  Plane texture, Plane speckle, Plane gain, Plane thin, float gain_lo,
                  float gain_span, float thin_threshold, float clear_factor, float rim_gain,
                  float contrast, const float* stain, const float* nuclear_jitter,
                  const float* global_jitter, uint8_t* out, int64_t h, int64_t w) {
  const Tables& t = tables();
  float nuc[3], glob[3];
  for (int c = 0; c < 3; ++c) {
    nuc[c] = stain[c] * nuclear_jitter[c];
    glob[c] = global_jitter[c];
  }
  // Pixels with nothing painted on them only need their background level mapped through the jitter.
  uint8_t plain[3][256];
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) plain[c][v] = to_u8(t.od[v] * glob[c], t);
  }
  for (int64_t i = 0; i < h; ++i) {
    const float* tex = texture.data + i * texture.stride;
    const float* spk = speckle.data + i * speckle.stride;
    const float* gn = gain.data + i * gain.stride;
    const float* th = thin.data + i * thin.stride;
    const float* mx = mix.data + i * mix.stride;
    for (int64_t j = 0; j < w; ++j) {
      const int64_t p = i * w + j;
      const uint8_t* bg = background + 3 * p;
      uint8_t* o = out + 3 * p;
      const int32_t l = labels[p] > 0 ? labels[p] : static_cast<int32_t>(grown[p]);
      if ((extra == nullptr || extra[p] == 0.0f) && (l == 0 || (sharp[p] == 0 && soft[p] == 0))) {
        o[0] = plain[0][bg[0]];
        o[1] = plain[1][bg[1]];
        o[2] = plain[2][bg[2]];
        continue;
      }
      float od[3] = {t.od[bg[0]], t.od[bg[1]], t.od[bg[2]]};
      if (extra != nullptr) {
        const float e = extra[p];
        for (int c = 0; c < 3; ++c) od[c] += e * stain[c];
      }
      const float s0 = static_cast<float>(sharp[p]);
      const float a = (s0 + mx[j] * (static_cast<float>(soft[p]) - s0)) * (1.0f / 255.0f);
      if (l > 0 && a > 0.0f) {
        float d = darkness[l] * (gain_lo + gain_span * gn[j]) *
                  (1.0f + contrast * (0.6f * tex[j] + 0.4f * spk[j]));
        const uint8_t r = region[p];
        if (r == 2 && clear[l] && th[j] < thin_threshold) d *= clear_factor;
        if (r == 1) d *= rim_gain;
        d = std::max(d, 0.0f) * a;
        for (int c = 0; c < 3; ++c) od[c] += d * nuc[c];
      }
      for (int c = 0; c < 3; ++c) o[c] = to_u8(od[c] * glob[c], t);
    }
  }
}

}  // namespace pysynth
