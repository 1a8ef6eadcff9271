/* Element conversion kernels: stored dtype -> float32, optionally followed by out = x*scale+offset.
 *
 * Every kernel reads element i before it writes element i, and a vector block is loaded whole
 * before it is stored. So a kernel may run in place with the stored bytes placed at the *tail* of
 * the float32 output slot (the slot is never smaller than the stored data for the widening casts),
 * which is how the reader converts without a per-batch temporary. Results are bit-identical to
 * numpy's astype(float32): the F16C path patches NaN lanes, which the instruction would quiet. */
#ifndef SF_CAST_H
#define SF_CAST_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum sf_cast {
    SF_CAST_COPY = 0,   /* output dtype == stored dtype: bytes are copied */
    SF_CAST_F16 = 1,
    SF_CAST_BF16 = 2,
    SF_CAST_F32 = 3,    /* float32 -> float32, only useful with an affine transform */
    SF_CAST_F64 = 4,
    SF_CAST_U8 = 5,     /* also bool */
    SF_CAST_I8 = 6,
    SF_CAST_U16 = 7,
    SF_CAST_I16 = 8,
    SF_CAST_U32 = 9,
    SF_CAST_I32 = 10,
    SF_CAST_U64 = 11,
    SF_CAST_I64 = 12,
    SF_CAST_COUNT
};

/* out[i] = x[i] * scale[p] + offset[p] with p = (i / inner) % period; NULL scale = no transform.
 * A scalar transform is period 1; a per-channel transform over a (C, H, W) field is period C,
 * inner H*W; over (H, W, C) it is period C, inner 1. */
typedef struct sf_affine {
    const float *scale;
    const float *offset;
    size_t inner;
    size_t period;
} sf_affine;

/* Size in bytes of one stored element of a cast kind (0 for COPY). */
size_t sf_cast_itemsize(int cast);

/* Converts n stored elements at src to float32 at dst (see the in-place rule above), then applies
 * the affine transform if any. `first` is the element index of dst[0] within the sample, so the
 * per-channel pattern stays in phase when a sample is converted in pieces. */
void sf_convert(int cast, float *dst, const void *src, size_t n, const sf_affine *affine,
                size_t first);

/* The same, storing the output with non-temporal (streaming) stores where the CPU has them, so a
 * batch much larger than the cache does not first read every output line into it. For outputs
 * that are not read again soon; same results, same in-place rule. */
void sf_convert_stream(int cast, float *dst, const void *src, size_t n, const sf_affine *affine,
                       size_t first);

/* 1 when the F16C vector path is in use on this CPU. */
int sf_cast_has_f16c(void);

/* allowed == 0 makes float16 conversions use the portable code even where F16C exists (for tests:
 * not synchronised with reads running in other threads). */
void sf_cast_allow_f16c(int allowed);

/* Elements per conversion block; a per-element (inner == 1) parameter tile must hold at least
 * period + SF_BLOCK entries. */
#define SF_BLOCK 256

/* Software half -> float bits, identical to numpy's npy_halfbits_to_floatbits. */
static inline uint32_t sf_half_to_float_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = h & 0x7c00u;
    if (exp == 0) {
        uint32_t sig = h & 0x03ffu;
        if (sig == 0)
            return sign;
        uint32_t shift = 0;
        sig <<= 1;
        while ((sig & 0x0400u) == 0) {
            sig <<= 1;
            shift++;
        }
        return sign + ((127u - 15u - shift) << 23) + ((sig & 0x03ffu) << 13);
    }
    if (exp == 0x7c00u)
        return sign + 0x7f800000u + ((uint32_t)(h & 0x03ffu) << 13);
    return sign + (((uint32_t)(h & 0x7fffu) + 0x1c000u) << 13);
}

#endif
