/* The Feistel network of shardfeed.order.Permutation, position by position (see permutation.c). */
#ifndef SF_PERMUTATION_H
#define SF_PERMUTATION_H

#include <stddef.h>
#include <stdint.h>

#define SF_PERMUTATION_MAX_ROUNDS 16

/* One keyed permutation of [0, n) over Z_a x Z_b (a * b >= n): round r maps (left, right) to
 * (right, (left + F_r(right)) mod modulus[r]), F_r(v) = splitmix((v + add[r]) * mul[r]) >> 32. */
typedef struct sf_permutation {
    uint64_t n, b;
    int rounds;
    uint64_t add[SF_PERMUTATION_MAX_ROUNDS], mul[SF_PERMUTATION_MAX_ROUNDS], modulus[SF_PERMUTATION_MAX_ROUNDS];
} sf_permutation;

/* out[i] = the element at positions[i] (each in [0, n)); out may be positions. */
void sf_permute(const sf_permutation *perm, const int64_t *positions, int64_t *out, size_t count);

#endif
