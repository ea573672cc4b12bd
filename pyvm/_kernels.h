/* Page kernels shared by pyvm's Cython modules (_fastpath, _pagestream, _xbzrle).
 *
 * Pages are 4 KiB (x86 TARGET_PAGE_SIZE); migration stream words are big-endian
 * (QEMU's qemu_put_be64).
 */
#ifndef PYVM_KERNELS_H
#define PYVM_KERNELS_H

#include <stdint.h>
#include <string.h>

/* 1 if the page is all zero.  OR-reduce in 8 lanes so the compiler vectorises. */
static inline int pyvm_page_is_zero(const uint8_t *p) {
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (int i = 0; i < 512; i += 8)
        acc |= w[i] | w[i+1] | w[i+2] | w[i+3] | w[i+4] | w[i+5] | w[i+6] | w[i+7];
    return acc == 0;
}

/* The same answer, but stops at the first non-zero 128-byte stretch (data pages
   usually differ from zero in their first cache lines). */
static inline int pyvm_page_is_zero_early(const uint8_t *p) {
    const uint64_t *w = (const uint64_t *)p;
    for (int i = 0; i < 512; i += 16) {
        uint64_t acc = 0;
        for (int j = 0; j < 16; j++)
            acc |= w[i + j];
        if (acc)
            return 0;
    }
    return 1;
}

/* A big-endian 64-bit word at any alignment (migration stream records). */
static inline uint64_t pyvm_load_be64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return __builtin_bswap64(v);
}

/* One 4 KiB page into guest RAM with non-temporal stores: the destination lines are
   not read first (no read-for-ownership) and do not evict the cache, which makes
   loading a migration stream's pages about twice as fast as memcpy into cold RAM.
   Callers issue pyvm_store_fence() before anyone else may read the page. */
#if defined(__SSE2__)
#include <emmintrin.h>
static inline void pyvm_copy_page(uint8_t *d, const uint8_t *s) {
    if (((uintptr_t)d & 15) != 0) { memcpy(d, s, 4096); return; }
    for (int i = 0; i < 4096; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
}
static inline void pyvm_store_fence(void) { _mm_sfence(); }
#else
static inline void pyvm_copy_page(uint8_t *d, const uint8_t *s) { memcpy(d, s, 4096); }
static inline void pyvm_store_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif

static inline void pyvm_store_be64(uint8_t *p, uint64_t v) {
    v = __builtin_bswap64(v);
    memcpy(p, &v, 8);
}

/* One RAM record header (migration/ram.c save_page_header): the page's offset in its
   block with the RAM_SAVE_FLAG_* bits in the low bits, then the block's counted name when
   the record starts a run (namelen > 0); a record without a name carries
   RAM_SAVE_FLAG_CONTINUE (0x20) instead.  Returns the bytes written: 8, or 9 + namelen. */
static inline int pyvm_put_page_header(uint8_t *o, uint64_t index, uint64_t flags,
                                       const uint8_t *name, int namelen) {
    if (namelen == 0) {
        pyvm_store_be64(o, (index << 12) | flags | 0x20);
        return 8;
    }
    pyvm_store_be64(o, (index << 12) | flags);
    o[8] = (uint8_t)namelen;
    memcpy(o + 9, name, (size_t)namelen);
    return 9 + namelen;
}

#endif /* PYVM_KERNELS_H */
