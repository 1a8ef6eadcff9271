# Keyed permutations of [0, n) (included by _core.pyx): shardfeed.order.Permutation's Feistel
# network, run by ext/permutation.c.

cdef class FeistelPermutation:
    """The permutation of ``order.Permutation`` above its table size: ``rounds`` is a sequence of
    ``(add, mul, modulus)`` per round (moduli alternating ``a`` and ``b``, an even count),
    ``b`` the size of the right half (positions are ``left * b + right``)."""

    cdef sf_permutation perm

    def __cinit__(self, unsigned long long n, unsigned long long b, rounds):
        rounds = list(rounds)
        if not 0 < len(rounds) <= SF_PERMUTATION_MAX_ROUNDS or len(rounds) % 2:
            raise ValueError(f"a Feistel permutation takes an even number of rounds up to "
                             f"{SF_PERMUTATION_MAX_ROUNDS}, got {len(rounds)}")
        if b == 0 or n == 0:
            raise ValueError("a Feistel permutation needs n > 0 and b > 0")
        self.perm.n, self.perm.b, self.perm.rounds = n, b, len(rounds)
        for r, (add, mul, modulus) in enumerate(rounds):
            if int(modulus) == 0:
                raise ValueError("a round's modulus must be > 0")
            self.perm.add[r], self.perm.mul[r], self.perm.modulus[r] = int(add), int(mul), int(modulus)

    def apply(self, positions):
        """The elements at ``positions`` (an integer array, each in ``[0, n)``: not checked) as a
        new int64 array of the same shape; the GIL is released while it runs."""
        cdef int64_t[::1] flat = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
        out = np.empty(flat.shape[0], dtype=np.int64)
        cdef int64_t[::1] result = out
        cdef size_t count = <size_t>flat.shape[0]
        if count:
            with nogil:
                sf_permute(&self.perm, &flat[0], &result[0], count)
        return out.reshape(np.shape(positions))
