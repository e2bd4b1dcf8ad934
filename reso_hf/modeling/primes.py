"""Prime numbers for the prime token code (SPEC §3.1) and the tokenizer's prime map (SPEC §4).

Token id ``i`` is assigned the ``i``-th prime ``p_i`` with ``p_0 = 2``. Pure Python, no
dependencies, because this file is copied into every checkpoint (``trust_remote_code``).
"""

import math
from functools import lru_cache


def _upper_bound_of_nth_prime(n: int) -> int:
    # Rosser's theorem: p_n < n (ln n + ln ln n) for n >= 6 (1-based n).
    if n < 6:
        return 15
    return int(n * (math.log(n) + math.log(math.log(n)))) + 1


@lru_cache(maxsize=8)
def first_primes(count: int) -> tuple:
    """The first ``count`` primes, ``(2, 3, 5, ...)``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count == 0:
        return ()
    limit = _upper_bound_of_nth_prime(count)
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for p in range(2, math.isqrt(limit) + 1):
        if sieve[p]:
            sieve[p * p :: p] = bytearray(len(range(p * p, limit + 1, p)))
    primes = [i for i, is_prime in enumerate(sieve) if is_prime]
    return tuple(primes[:count])


def factorize_over(n: int, primes) -> dict:
    """Factorise ``n`` over a known finite set of primes, as ``{prime: multiplicity}``.

    Raises ``ValueError`` when ``n`` has a factor outside ``primes`` (it is then not a product
    of those primes). Cost is one modulo per candidate prime plus one division per factor.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    factors = {}
    for p in primes:
        if n == 1:
            break
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
    if n != 1:
        raise ValueError(f"n has a prime factor outside the given primes (cofactor {n})")
    return factors
