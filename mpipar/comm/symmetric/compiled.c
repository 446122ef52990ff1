/* Compiled kernels of the shared-memory collectives (mpipar/comm/shm_compiled.py builds and
 * loads them): a fused sum-and-push for the all-reduce, and a streaming copy for large moves.
 *
 * sum_push_<type>(own, peers, npeers, n): for i < n,
 *     s = ((own[i] + peers[0][i]) + peers[1][i]) + ...   (the order numpy's reduce_into uses)
 *     own[i] = s; peers[k][i] = s for every k
 * in one call, block by block (below), where numpy needs two calls per cache-sized chunk
 * (an add, then a copy into every peer). The arrays must not overlap. Integers wrap (built with
 * -fwrapv), as in numpy; floats follow IEEE without contraction or reassociation, so the
 * result is bit-identical to numpy's.
 *
 * stream_fanout(dsts, ndst, src, n): stream_copy of `src` into every dsts[k], reading each
 * source line once (from L1 for every destination after the first). An all-gather that pushes
 * this rank's piece into every rank's output reads it once instead of once per rank. Measured
 * with 2 ranks, each pushing its piece into both symmetric outputs at once (the kernels alone,
 * between barriers; busbw GB/s; pulling both pieces into a plain output with stream_copy,
 * this, MPICH's Allgather): 16 MiB 6.1, 10.5, 4.5; 64 MiB 5.7, 9.6, 4.9; 128 MiB 5.9, 10.5,
 * 5.3; 256 MiB 6.7, 10.7, 5.4. Inside the collective the gain is smaller (tuning.py).
 * Destinations aligned differently (mod the store width) fall back to one stream_copy each.
 *
 * stream_copy(dst, src, n): memcpy with non-temporal (streaming) stores, then a store fence.
 * Measured with 2 ranks, each copying its piece into the other's shared-memory window at
 * once (GB/s, best of 6-8 rounds; glibc memcpy, streaming): 4 MiB 40.0, 25.7; 16 MiB 18.2,
 * 25.8; 64 MiB 11.6, 17.7; 128 MiB 9.3, 18.2. Past the cache, glibc's memcpy here reads each
 * destination line before writing it; streaming stores do not. In cache they lose, so
 * callers stream only large copies. stream_width() is the store width, 0 where this build
 * has no streaming stores (then stream_copy is memcpy).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define WIDTH 64
#define STREAM(d, s) _mm512_stream_si512((void *)(d), _mm512_loadu_si512((const void *)(s)))
#elif defined(__AVX__)
#include <immintrin.h>
#define WIDTH 32
#define STREAM(d, s) _mm256_stream_si256((__m256i *)(d), _mm256_loadu_si256((const __m256i *)(s)))
#elif defined(__SSE2__)
#include <emmintrin.h>
#define WIDTH 16
#define STREAM(d, s) _mm_stream_si128((__m128i *)(d), _mm_loadu_si128((const __m128i *)(s)))
#endif

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

int stream_width(void) {
#ifdef WIDTH
    return WIDTH;
#else
    return 0;
#endif
}

void stream_copy(char *dst, const char *src, size_t n) {
#ifdef WIDTH
    size_t head = (size_t)(-(uintptr_t)dst) & (WIDTH - 1); /* bytes until dst is aligned */
    if (head > n)
        head = n;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    n -= head;
    size_t body = n & ~(size_t)(4 * WIDTH - 1);
    for (size_t i = 0; i < body; i += 4 * WIDTH) {
        STREAM(dst + i, src + i);
        STREAM(dst + i + WIDTH, src + i + WIDTH);
        STREAM(dst + i + 2 * WIDTH, src + i + 2 * WIDTH);
        STREAM(dst + i + 3 * WIDTH, src + i + 3 * WIDTH);
    }
    memcpy(dst + body, src + body, n - body);
    _mm_sfence(); /* streaming stores are weakly ordered: visible before any later store */
#else
    memcpy(dst, src, n);
#endif
}

void stream_fanout(char **dsts, int ndst, const char *src, size_t n) {
#ifdef WIDTH
    size_t head = (size_t)(-(uintptr_t)dsts[0]) & (WIDTH - 1);
    for (int k = 1; k < ndst; k++) {
        if (((uintptr_t)dsts[k] & (WIDTH - 1)) != ((uintptr_t)dsts[0] & (WIDTH - 1))) {
            for (int j = 0; j < ndst; j++)
                stream_copy(dsts[j], src, n);
            return;
        }
    }
    if (head > n)
        head = n;
    for (int k = 0; k < ndst; k++)
        memcpy(dsts[k], src, head);
    size_t body = head + ((n - head) & ~(size_t)(2 * WIDTH - 1));
    for (size_t i = head; i < body; i += 2 * WIDTH) {
        for (int k = 0; k < ndst; k++) {
            STREAM(dsts[k] + i, src + i);
            STREAM(dsts[k] + i + WIDTH, src + i + WIDTH);
        }
    }
    for (int k = 0; k < ndst; k++)
        memcpy(dsts[k] + body, src + body, n - body);
    _mm_sfence();
#else
    for (int k = 0; k < ndst; k++)
        memcpy(dsts[k], src, n);
#endif
}
