/* Element conversion kernels: stored dtype -> float32, float16 or bfloat16, optionally through
 * out = x*scale+offset computed in float32.
 *
 * Every kernel reads element i before it writes element i, and a vector block is loaded whole
 * before it is stored. So a kernel may run in place with the stored bytes placed at the *tail* of
 * the output slot when the stored element is not wider than the output element (back to front:
 * the stored bytes end where the output ends, so a block's output never reaches stored bytes not
 * yet read), which is how the reader converts without a per-batch temporary. Results are
 * bit-identical to numpy, rounding to nearest even: float32 and float16 outputs to astype (the
 * F16C paths patch NaN lanes, which the instructions would quiet), bfloat16 to ml_dtypes' astype.
 * Integer and float64 sources round once to a 16-bit output (float64 -> float16 directly, as
 * numpy does). With a transform, the float32 result x*scale+offset (float32 math, no FMA) is
 * rounded to the 16-bit output: numpy's (x.astype(float32) * scale + offset).astype(out). */
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

/* Output element kinds. A conversion id ("cast") is the stored kind above in the low four bits and
 * the output kind shifted by SF_CAST_OUT_SHIFT: SF_CAST_I64 | SF_OUT_F16 << SF_CAST_OUT_SHIFT reads
 * int64 as float16. An id of the stored kind alone is the float32 output of earlier versions. */
enum sf_out {
    SF_OUT_F32 = 0,
    SF_OUT_F16 = 1,
    SF_OUT_BF16 = 2,
    SF_OUT_COUNT
};
#define SF_CAST_OUT_SHIFT 4

static inline int sf_cast_stored(int cast) { return cast & ((1 << SF_CAST_OUT_SHIFT) - 1); }
static inline int sf_cast_out(int cast) { return cast >> SF_CAST_OUT_SHIFT; }

/* 1 for SF_CAST_COPY and every stored kind with every output kind, else 0. */
int sf_cast_valid(int cast);

/* out[i] = x[i] * scale[p] + offset[p] with p = (i / inner) % period; NULL scale = no transform.
 * A scalar transform is period 1; a per-channel transform over a (C, H, W) field is period C,
 * inner H*W; over (H, W, C) it is period C, inner 1. */
typedef struct sf_affine {
    const float *scale;
    const float *offset;
    size_t inner;
    size_t period;
} sf_affine;

/* Size in bytes of one stored element of a conversion (0 for COPY). */
size_t sf_cast_itemsize(int cast);

/* Size in bytes of one output element of a conversion: 4 or 2 (0 for COPY). */
size_t sf_cast_out_itemsize(int cast);

/* Converts n stored elements at src to the output kind at dst (see the in-place rule above),
 * through the affine transform if any. `first` is the element index of dst[0] within the sample,
 * so the per-channel pattern stays in phase when a sample is converted in pieces.
 * Returns 1 when some element of an integer source was not converted exactly (its value is not
 * one of the output dtype, or with a transform not one of float32: int64 16777217 as float32),
 * else 0; float sources always return 0 (narrowing a float is a choice of precision). */
int sf_convert(int cast, void *dst, const void *src, size_t n, const sf_affine *affine,
               size_t first);

/* The same, storing the output with non-temporal (streaming) stores where the CPU has them, so a
 * batch much larger than the cache does not first read every output line into it. For outputs
 * that are not read again soon; same results, same in-place rule. */
int sf_convert_stream(int cast, void *dst, const void *src, size_t n, const sf_affine *affine,
                      size_t first);

/* Converted output of a batch from this size on is written with non-temporal stores: it does not
 * fit in the cache anyway, and not reading every output line into the cache first makes the
 * conversion up to ~1.7x faster (benchmarks/RESULTS.md). Smaller batches stay in the cache, where
 * the caller reads them next. */
#define SF_STREAM_MIN_BYTES ((size_t)16 << 20)

/* 1 when a batch of n records (n > 0) whose converted fields take `converted_bytes` of output per
 * record is converted by sf_convert_stream, else 0: the reads' choice (records.c), also what the
 * benchmarks' copy ceiling uses (_core.output_streamed). */
static inline int sf_output_streamed(size_t converted_bytes, size_t n)
{
    return converted_bytes >= (SF_STREAM_MIN_BYTES - 1) / n + 1; /* n * converted_bytes >= MIN, no overflow */
}

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

/* Float -> half bits, rounding to nearest even: numpy's npy_floatbits_to_halfbits (a NaN keeps
 * its sign and the top of its payload, and stays a NaN; it is not quieted). */
static inline uint16_t sf_float_to_half_bits(uint32_t f)
{
    uint16_t sign = (uint16_t)((f & 0x80000000u) >> 16);
    uint32_t exp = f & 0x7f800000u, sig;
    if (exp >= 0x47800000u) {
        if (exp == 0x7f800000u && (f & 0x007fffffu)) {
            uint16_t nan = (uint16_t)(0x7c00u + ((f & 0x007fffffu) >> 13));
            return (uint16_t)(sign + (nan == 0x7c00u ? 0x7c01u : nan));
        }
        return (uint16_t)(sign + 0x7c00u); /* infinity, or overflow to it */
    }
    if (exp <= 0x38000000u) {
        if (exp < 0x33000000u)
            return sign; /* below half the smallest subnormal: signed zero */
        exp >>= 23;
        sig = 0x00800000u + (f & 0x007fffffu);
        sig >>= (113 - exp);
        /* ties to even; the bits shifted out above still count as "more than a tie" */
        if ((sig & 0x00003fffu) != 0x00001000u || (f & 0x000007ffu))
            sig += 0x00001000u;
        return (uint16_t)(sign + (sig >> 13));
    }
    sig = f & 0x007fffffu;
    if ((sig & 0x00003fffu) != 0x00001000u)
        sig += 0x00001000u;
    return (uint16_t)(sign + ((exp - 0x38000000u) >> 13) + (sig >> 13)); /* a carry may make inf */
}

/* Double -> half bits in one rounding: numpy's npy_doublebits_to_halfbits. */
static inline uint16_t sf_double_to_half_bits(uint64_t d)
{
    uint16_t sign = (uint16_t)((d & 0x8000000000000000ull) >> 48);
    uint64_t exp = d & 0x7ff0000000000000ull, sig;
    if (exp >= 0x40f0000000000000ull) {
        if (exp == 0x7ff0000000000000ull && (d & 0x000fffffffffffffull)) {
            uint16_t nan = (uint16_t)(0x7c00u + ((d & 0x000fffffffffffffull) >> 42));
            return (uint16_t)(sign + (nan == 0x7c00u ? 0x7c01u : nan));
        }
        return (uint16_t)(sign + 0x7c00u);
    }
    if (exp <= 0x3f00000000000000ull) {
        if (exp < 0x3e60000000000000ull)
            return sign;
        exp >>= 52;
        sig = 0x0010000000000000ull + (d & 0x000fffffffffffffull);
        sig <<= (exp - 998);
        if ((sig & 0x003fffffffffffffull) != 0x0010000000000000ull)
            sig += 0x0010000000000000ull;
        return (uint16_t)(sign + (sig >> 53));
    }
    sig = d & 0x000fffffffffffffull;
    if ((sig & 0x000007ffffffffffull) != 0x0000020000000000ull)
        sig += 0x0000020000000000ull;
    return (uint16_t)(sign + ((exp - 0x3f00000000000000ull) >> 42) + (sig >> 42));
}

/* Float -> bfloat16 bits, rounding to nearest even; a NaN becomes the quiet NaN of its sign,
 * without payload (ml_dtypes 0.7, after Eigen). */
static inline uint16_t sf_float_to_bf16_bits(uint32_t f)
{
    if ((f & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)(((f >> 16) & 0x8000u) | 0x7fc0u);
    return (uint16_t)((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
}

#endif
