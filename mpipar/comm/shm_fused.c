/* Fused kernel of the shared-memory all-reduce (mpipar/comm/shm_fused.py builds and loads it).
 *
 * sum_push_<type>(own, peers, npeers, n): for i < n,
 *     s = ((own[i] + peers[0][i]) + peers[1][i]) + ...   (the order numpy's reduce_into uses)
 *     own[i] = s; peers[k][i] = s for every k
 * in one call, block by block (below), where numpy needs two calls per cache-sized chunk
 * (an add, then a copy into every peer). The arrays must not overlap. Integers wrap (built with
 * -fwrapv), as in numpy; floats follow IEEE without contraction or reassociation, so the
 * result is bit-identical to numpy's.
 */
#include <stddef.h>
#include <stdint.h>

/* Blocks of 8 KiB: each is summed into `own`, then copied from L1 into every peer. Measured
 * with 2 ranks (one rank's slice of a float32 all-reduce, ms): a single loop that stores both
 * outputs per element ran 16 MiB 0.605, 128 MiB 9.80, 256 MiB 26.1; 4 KiB blocks 0.450, 9.71,
 * 22.1; 32 KiB blocks 0.540, 10.2, 19.9; numpy's two calls per 512 KiB chunk 0.686, 11.1, 22.5;
 * the in-place pass over the whole tensor (the ceiling) 0.561, 9.64, 19.2. 8 KiB lies between
 * the two block sizes. */
#define BLOCK_BYTES 8192

#define SUM_PUSH(name, T)                                                              \
    void name(T *own, T **peers, int npeers, size_t n) {                               \
        const size_t block = BLOCK_BYTES / sizeof(T);                                  \
        for (size_t b = 0; b < n; b += block) {                                        \
            size_t m = n - b < block ? n - b : block;                                  \
            T *restrict o = own + b;                                                   \
            for (int k = 0; k < npeers; k++) {                                         \
                const T *restrict p = peers[k] + b;                                    \
                for (size_t i = 0; i < m; i++) o[i] = o[i] + p[i];                     \
            }                                                                          \
            for (int k = 0; k < npeers; k++) {                                         \
                T *restrict p = peers[k] + b;                                          \
                for (size_t i = 0; i < m; i++) p[i] = o[i];                            \
            }                                                                          \
        }                                                                              \
    }

SUM_PUSH(sum_push_float32, float)
SUM_PUSH(sum_push_float64, double)
SUM_PUSH(sum_push_int32, int32_t)
SUM_PUSH(sum_push_int64, int64_t)
