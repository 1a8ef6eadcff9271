/* The Feistel network of shardfeed.order.Permutation in C: the same arithmetic as the numpy
 * expression it replaces (uint64 wrap-around, then reductions), so every epoch order stays what
 * it was. numpy ran it as some fifty passes over the positions, two integer divisions per round
 * among them: ~57 ns a position on the AMD EPYC VM, a third of a page-cached 128-byte read. */
#include "permutation.h"

#define SF_MIX UINT64_C(0xBF58476D1CE4E5B9) /* splitmix64's multiplier */

/* value % divisor for value < 2^32, by Lemire's multiply-shift with magic = UINT64_MAX / divisor + 1
 * (divisor < 2^32; the plain division otherwise, or without 128-bit integers). */
static inline uint64_t mod_small(uint64_t value, uint64_t magic, uint64_t divisor)
{
#if defined(__SIZEOF_INT128__)
    if (divisor >> 32 == 0)
        return (uint64_t)(((unsigned __int128)(magic * value) * divisor) >> 64);
#else
    (void)magic;
#endif
    return value % divisor;
}

/* One round on (left, right): (right, (left + F(right)) mod m), left < m (left is in Z_m). The final
 * reduction is a masked subtraction, not a branch: taken half the time at random, a branch was
 * mispredicted about three times a position (38 ns a position for a new key, 15 ns without). */
#define SF_ROUND(perm, magic, r, left, right)                                                       \
    do {                                                                                            \
        uint64_t h_ = ((right) + (perm)->add[r]) * (perm)->mul[r];                                  \
        h_ ^= h_ >> 29;                                                                             \
        h_ *= SF_MIX;                                                                               \
        h_ >>= 32;                                                                                  \
        h_ = mod_small(h_, (magic)[r], (perm)->modulus[r]) + (left);                                \
        h_ -= (perm)->modulus[r] & (UINT64_C(0) - (uint64_t)(h_ >= (perm)->modulus[r]));           \
        (left) = (right);                                                                           \
        (right) = h_;                                                                               \
    } while (0)

/* One pass of the network on x in [0, a * b). */
static inline uint64_t encrypt(const sf_permutation *perm, const uint64_t *magic, uint64_t x)
{
    uint64_t left = x / perm->b, right = x % perm->b;
    for (int r = 0; r < perm->rounds; r++)
        SF_ROUND(perm, magic, r, left, right);
    return left * perm->b + right; /* an even number of rounds: Z_a x Z_b again */
}

/* Cycle walking: re-encrypts a value in [n, a * b) until it falls below n. */
static uint64_t walk(const sf_permutation *perm, const uint64_t *magic, uint64_t x)
{
    while (x >= perm->n)
        x = encrypt(perm, magic, x);
    return x;
}

/* position / b: for a position and b below 2^32, by Lemire's multiply-shift (the quotient is the high
 * word of magic_b * position, magic_b = UINT64_MAX / b + 1), where a 64-bit division costs tens of cycles. */
static inline uint64_t split_left(int64_t position, uint64_t b, uint64_t magic_b, int small)
{
#if defined(__SIZEOF_INT128__)
    if (small)
        return (uint64_t)(((unsigned __int128)magic_b * (uint64_t)position) >> 64);
#else
    (void)magic_b;
    (void)small;
#endif
    return (uint64_t)position / b;
}

#define SF_LANES 8 /* positions encrypted side by side: their rounds' long dependency chains overlap */

void sf_permute(const sf_permutation *perm, const int64_t *positions, int64_t *out, size_t count)
{
    uint64_t magic[SF_PERMUTATION_MAX_ROUNDS];
    for (int r = 0; r < perm->rounds; r++)
        magic[r] = UINT64_MAX / perm->modulus[r] + 1; /* (0 for a modulus of 1: every value -> 0) */
    const uint64_t b = perm->b;
    const uint64_t magic_b = UINT64_MAX / b + 1;
    const int small = perm->n <= (UINT64_C(1) << 32) && b > 1 && b >> 32 == 0; /* magic_b is 0 for b = 1 */
    size_t i = 0;
    for (; i + SF_LANES <= count; i += SF_LANES) {
        uint64_t left[SF_LANES], right[SF_LANES];
        for (int k = 0; k < SF_LANES; k++) {
            left[k] = split_left(positions[i + k], b, magic_b, small);
            right[k] = (uint64_t)positions[i + k] - left[k] * b;
        }
        for (int r = 0; r < perm->rounds; r++)
            for (int k = 0; k < SF_LANES; k++)
                SF_ROUND(perm, magic, r, left[k], right[k]);
        for (int k = 0; k < SF_LANES; k++)
            out[i + k] = (int64_t)walk(perm, magic, left[k] * b + right[k]);
    }
    for (; i < count; i++)
        out[i] = (int64_t)walk(perm, magic, encrypt(perm, magic, (uint64_t)positions[i]));
}
