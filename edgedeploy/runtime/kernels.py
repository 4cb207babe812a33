"""CUDA C++ sources compiled at run time with NVRTC (kept as strings so they ship inside the wheel)."""

# One thread per output pixel: letterbox (or plain resize) + BGR->RGB + /255 + (x-mean)/std + HWC->NCHW,
# written straight into the engine's input buffer. The bilinear sampling mirrors cv2.INTER_LINEAR
# (half-pixel centres, edge clamp, scale = src/dst size) and rounds to uint8 like OpenCV does, so the result
# matches the CPU reference `edgedeploy.data.preprocess.to_input_tensor` within 1/255 before normalisation.
# Gray (1 channel) and BGRA (4 channels) frames are read directly: gray is replicated, alpha ignored.
# Input conventions: `bgr` != 0 keeps the frame's BGR order (YOLOX, ShuffleNet); the pixel scale is folded into
# the mean/inv-std arguments on the host ((p/255 - m/(255 s)) * 255 s/std == (p s - m)/std).
PREPROCESS_SOURCE = r"""
// No #include: NVRTC then needs no CUDA headers on the machine. FP16 is stored as its 16-bit pattern,
// converted with the PTX instruction cvt.rn.f16.f32 (round to nearest even, as __float2half_rn does).
typedef unsigned short half_bits;

template <typename T> __device__ __forceinline__ T cast_out(float v);
template <> __device__ __forceinline__ float cast_out<float>(float v) { return v; }
template <> __device__ __forceinline__ half_bits cast_out<half_bits>(float v) {
#ifdef __CUDA_ARCH__
    half_bits h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
#else  // compiled for the host (tests/emulated runs this source on the CPU): the shim header provides it
    return __float2half_rn_bits(v);
#endif
}

template <typename T>
__device__ void preprocess(
    const unsigned char* __restrict__ src, int src_h, int src_w, int src_pitch, int src_c,
    T* __restrict__ dst, int dst_h, int dst_w,
    int new_h, int new_w, int pad_x, int pad_y, float pad_value,
    float m0, float m1, float m2, float is0, float is1, float is2, int bgr)
{
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int b = blockIdx.z;  // batch index: one frame per z-slice
    if (x >= dst_w || y >= dst_h) return;
    const unsigned char* img = src + (size_t)b * src_h * src_pitch;
    float rgb[3];
    int ix = x - pad_x, iy = y - pad_y;
    if (ix < 0 || iy < 0 || ix >= new_w || iy >= new_h) {
        rgb[0] = rgb[1] = rgb[2] = pad_value;
    } else if (new_w == src_w && new_h == src_h) {
        const unsigned char* p = img + iy * src_pitch + ix * src_c;
        if (src_c == 1) { rgb[0] = rgb[1] = rgb[2] = p[0]; }
        else if (bgr) { rgb[0] = p[0]; rgb[1] = p[1]; rgb[2] = p[2]; }
        else { rgb[0] = p[2]; rgb[1] = p[1]; rgb[2] = p[0]; }
    } else {
        float sx = (ix + 0.5f) * ((float)src_w / new_w) - 0.5f;
        float sy = (iy + 0.5f) * ((float)src_h / new_h) - 0.5f;
        int x0 = (int)floorf(sx), y0 = (int)floorf(sy);
        float fx = sx - x0, fy = sy - y0;
        if (x0 < 0) { x0 = 0; fx = 0.f; }
        if (y0 < 0) { y0 = 0; fy = 0.f; }
        int x1 = min(x0 + 1, src_w - 1), y1 = min(y0 + 1, src_h - 1);
        if (x0 >= src_w - 1) { x0 = src_w - 1; fx = 0.f; }
        if (y0 >= src_h - 1) { y0 = src_h - 1; fy = 0.f; }
        const unsigned char* r0 = img + y0 * src_pitch;
        const unsigned char* r1 = img + y1 * src_pitch;
        for (int c = 0; c < 3; ++c) {
            int sc = src_c == 1 ? 0 : (bgr ? c : 2 - c);  // BGR(A) -> RGB unless the model takes BGR
            float top = r0[x0 * src_c + sc] * (1.f - fx) + r0[x1 * src_c + sc] * fx;
            float bot = r1[x0 * src_c + sc] * (1.f - fx) + r1[x1 * src_c + sc] * fx;
            rgb[c] = floorf(top * (1.f - fy) + bot * fy + 0.5f);  // OpenCV rounds to uint8
        }
    }
    size_t plane = (size_t)dst_h * dst_w;
    T* out = dst + (size_t)b * 3 * plane + (size_t)y * dst_w + x;
    out[0]         = cast_out<T>((rgb[0] * (1.f / 255.f) - m0) * is0);
    out[plane]     = cast_out<T>((rgb[1] * (1.f / 255.f) - m1) * is1);
    out[2 * plane] = cast_out<T>((rgb[2] * (1.f / 255.f) - m2) * is2);
}

#define PREPROCESS_ENTRY(NAME, T)                                                                          \
extern "C" __global__ void NAME(                                                                          \
    const unsigned char* src, int src_h, int src_w, int src_pitch, int src_c, T* dst, int dst_h, int dst_w, \
    int new_h, int new_w, int pad_x, int pad_y, float pad_value,                                           \
    float m0, float m1, float m2, float is0, float is1, float is2, int bgr) {                              \
    preprocess<T>(src, src_h, src_w, src_pitch, src_c, dst, dst_h, dst_w, new_h, new_w, pad_x, pad_y,      \
                  pad_value, m0, m1, m2, is0, is1, is2, bgr);                                              \
}

PREPROCESS_ENTRY(preprocess_f32, float)
PREPROCESS_ENTRY(preprocess_f16, half_bits)
"""

PREPROCESS_ENTRIES = ("preprocess_f32", "preprocess_f16")
