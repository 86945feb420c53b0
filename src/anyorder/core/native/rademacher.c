/* Fused Rademacher axpy for anyorder's zeroth-order steps: w <- decay * w + alpha * z.
 *
 * z is the Rademacher direction of anyorder.core.rng: element e of a tensor whose key is K is
 * -1 if bit (e mod 64) of word_(e div 64) is set and +1 otherwise, where word_j is the SplitMix64
 * output mix64(K + (j + 1) * GAMMA). The words are computed here, on the fly, so a pass over the
 * weights draws and applies the direction without any buffer; rng.py computes the same words
 * with torch integer ops, and the tests check that both agree bit for bit.
 *
 * alpha * z is formed exactly by flipping alpha's sign bit, and decay * w is rounded before the
 * add (compiled with -ffp-contract=off), so the result equals torch's
 * w.mul_(decay).add_(z, alpha=alpha) to the bit. target_clones picks an AVX2 build at load time
 * where the CPU has it (variable shifts vectorise there) and a generic one elsewhere
 * (x86-64 Linux; other platforms get one generic build).
 */
#include <stdint.h>
#include <string.h>

#define GAMMA 0x9E3779B97F4A7C15ULL

/* Function multi-versioning needs ifunc support: x86-64 ELF with GCC or a recent Clang. */
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define DISPATCH __attribute__((target_clones("avx2", "default")))
#else
#define DISPATCH
#endif

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* One kernel per floating type, written once:
 *   apply_<S>(p, bits, m, ...): elements p[0..m) get the signs of bits 0..m-1 of `bits`;
 *   rademacher_axpy_<S>(w, n, key, first_word, decay, alpha): n elements starting at element
 *     64 * first_word of the direction keyed by `key`;
 *   rademacher_axpy_many_<S>: the same pass over many tensors in one call (a zeroth-order step's
 *     pass over a whole model): tensor t has ns[t] elements at ptrs[t], key
 *     mix64((prefix ^ indices[t]) + GAMMA) as in rng.py's _prefix, its own decay and alpha. */
#define DEFINE_KERNELS(S, REAL, UINT, SIGN_SHIFT)                                              \
    static inline void apply_##S(REAL *p, uint32_t bits, int m, REAL decay, UINT abits,       \
                                 int scale) {                                                 \
        for (int i = 0; i < m; i++) {                                                         \
            UINT s = abits ^ ((UINT)((bits >> i) & 1u) << SIGN_SHIFT);                        \
            REAL a;                                                                           \
            memcpy(&a, &s, sizeof a);                                                         \
            REAL x = scale ? p[i] * decay : p[i];                                             \
            p[i] = x + a;                                                                     \
        }                                                                                     \
    }                                                                                         \
                                                                                              \
    DISPATCH                                                                                  \
    void rademacher_axpy_##S(REAL *w, int64_t n, uint64_t key, int64_t first_word, REAL decay, \
                             REAL alpha) {                                                    \
        UINT abits;                                                                           \
        memcpy(&abits, &alpha, sizeof abits);                                                 \
        int scale = decay != (REAL)1;                                                         \
        int64_t full = n / 64;                                                                \
        for (int64_t j = 0; j < full; j++) {                                                  \
            uint64_t word = mix64(key + (uint64_t)(first_word + j + 1) * GAMMA);              \
            REAL *p = w + j * 64;                                                             \
            /* Two loops so that `scale` is a constant in each and both vectorise. */        \
            if (scale) {                                                                      \
                apply_##S(p, (uint32_t)word, 32, decay, abits, 1);                            \
                apply_##S(p + 32, (uint32_t)(word >> 32), 32, decay, abits, 1);               \
            } else {                                                                          \
                apply_##S(p, (uint32_t)word, 32, decay, abits, 0);                            \
                apply_##S(p + 32, (uint32_t)(word >> 32), 32, decay, abits, 0);               \
            }                                                                                 \
        }                                                                                     \
        int64_t rest = n - full * 64;                                                         \
        if (rest > 0) {                                                                       \
            uint64_t word = mix64(key + (uint64_t)(first_word + full + 1) * GAMMA);           \
            REAL *p = w + full * 64;                                                          \
            apply_##S(p, (uint32_t)word, rest < 32 ? (int)rest : 32, decay, abits, scale);    \
            if (rest > 32)                                                                    \
                apply_##S(p + 32, (uint32_t)(word >> 32), (int)rest - 32, decay, abits, scale); \
        }                                                                                     \
    }                                                                                         \
                                                                                              \
    void rademacher_axpy_many_##S(int64_t count, REAL **ptrs, const int64_t *ns,              \
                                  uint64_t prefix, const int64_t *indices, const REAL *decays, \
                                  const REAL *alphas) {                                       \
        for (int64_t t = 0; t < count; t++) {                                                 \
            uint64_t key = mix64((prefix ^ (uint64_t)indices[t]) + GAMMA);                    \
            rademacher_axpy_##S(ptrs[t], ns[t], key, 0, decays[t], alphas[t]);                \
        }                                                                                     \
    }

DEFINE_KERNELS(f32, float, uint32_t, 31)
DEFINE_KERNELS(f64, double, uint64_t, 63)

/* Exact-restore guard (anyorder.estimators.restore): the first move of a query, w <- w + alpha1 z,
 * fused with what an exact restore needs, computed while the original element w0 is at hand:
 *   key(x): x's bit pattern made monotone in its value (negative patterns: magnitude bits
 *           flipped), so one ulp is one key step across zero too;
 *   codes:  the low two bits of key(w0), 16 bytes per 64-element block, byte j holding elements
 *           j, j+16, j+32, j+48 (bits 0-1, 2-3, 4-5, 6-7) so that packing vectorises; written
 *           only if `codes` is not NULL;
 *   escapes: elements for which the restore from a = w0 + alpha1 z (and, if `two`, from
 *           b = a + alpha2 z) is more than one key step off key(w0); their index and w0 are
 *           written to esc/vals.
 * The restore from a state s carrying the displacement d z is r = s - z d in the weights' type
 * (d is a float32 number for float32 weights, so this equals restore.py's float64 difference
 * rounded to float32: the exact difference of two floats needs at most 53 bits unless their
 * exponents are over 29 apart, where both give the larger operand), then the key nearest key(r)
 * with the saved low bits. These are the operations of the torch path in restore.py, bit for
 * bit (tested). The guard stops after the 64-element block at which fewer than 64
 * escape slots would remain, and returns the number of elements it processed (*found: escapes). */
#define DEFINE_GUARD(S, REAL, UINT, SINT, BITS)                                                 \
    static inline UINT okey_##S(UINT u) { return u ^ (((UINT)0 - (u >> (BITS - 1))) >> 1); }    \
                                                                                                 \
    static inline UINT bits_##S(REAL x) {                                                        \
        UINT u;                                                                                  \
        memcpy(&u, &x, sizeof u);                                                                \
        return u;                                                                                \
    }                                                                                            \
                                                                                                 \
    static inline REAL real_##S(UINT u) {                                                        \
        REAL x;                                                                                  \
        memcpy(&x, &u, sizeof x);                                                                \
        return x;                                                                                \
    }                                                                                            \
                                                                                                 \
    /* Elements p[0..m) with signs from bits 0..m-1 of `bits` (sb: the sign bit to flip); a   \
     * straight-line body (no branches, one width) so that it vectorises. flag[i] is 1 where a \
     * restore would be more than one key step off (differences wrap as torch's int ops). */   \
    static inline UINT guard_core_##S(REAL *p, UINT bits, int m, UINT a1, UINT a2, UINT d1,     \
                                      UINT d2, int two, REAL *orig, UINT *flag, uint8_t *low) { \
        UINT any = 0;                                                                            \
        for (int i = 0; i < m; i++) {                                                            \
            UINT sb = ((bits >> i) & 1u) << (BITS - 1);                                          \
            REAL x = p[i];                                                                       \
            UINT k0 = okey_##S(bits_##S(x));                                                     \
            REAL a = x + real_##S(a1 ^ sb);                                                      \
            orig[i] = x;                                                                         \
            low[i] = (uint8_t)(k0 & 3u);                                                         \
            p[i] = a;                                                                            \
            UINT f = (UINT)(okey_##S(bits_##S(a - real_##S(d1 ^ sb))) - k0 + 1u) > 2u;           \
            if (two) {                                                                           \
                REAL b = a + real_##S(a2 ^ sb);                                                  \
                f |= (UINT)(okey_##S(bits_##S(b - real_##S(d2 ^ sb))) - k0 + 1u) > 2u;           \
            }                                                                                    \
            flag[i] = f;                                                                         \
            any |= f;                                                                            \
        }                                                                                        \
        return any;                                                                              \
    }                                                                                            \
                                                                                                 \
    DISPATCH                                                                                     \
    int64_t rademacher_guard_##S(REAL *w, int64_t n, uint64_t key, int64_t first_word,          \
                                 REAL alpha1, REAL alpha2, int two, REAL d1, REAL d2,            \
                                 uint8_t *codes, int64_t *esc, REAL *vals, int64_t cap,          \
                                 int64_t *found) {                                               \
        UINT a1 = bits_##S(alpha1), a2 = bits_##S(alpha2), e1 = bits_##S(d1), e2 = bits_##S(d2); \
        int64_t count = 0, base = 0;                                                             \
        REAL orig[64];                                                                           \
        UINT flag[64];                                                                           \
        uint8_t low[64];                                                                         \
        const int half = BITS < 64 ? 32 : 64; /* sign bits per core call: lanes of one width */ \
        for (; base < n && count + 64 <= cap; base += 64) {                                      \
            uint64_t word = mix64(key + (uint64_t)(first_word + base / 64 + 1) * GAMMA);         \
            int m = n - base < 64 ? (int)(n - base) : 64;                                        \
            REAL *p = w + base;                                                                  \
            UINT any = 0;                                                                        \
            for (int h = 0; h < m; h += half) {                                                  \
                int mh = m - h < half ? m - h : half;                                            \
                UINT bits = (UINT)(word >> h);                                                   \
                any |= two ? guard_core_##S(p + h, bits, mh, a1, a2, e1, e2, 1, orig + h,        \
                                            flag + h, low + h)                                   \
                           : guard_core_##S(p + h, bits, mh, a1, a2, e1, e2, 0, orig + h,        \
                                            flag + h, low + h);                                  \
            }                                                                                    \
            if (any) {                                                                           \
                uint64_t mask = 0;                                                               \
                for (int i = 0; i < m; i++)                                                      \
                    mask |= (uint64_t)(flag[i] & 1u) << i;                                       \
                while (mask) {                                                                   \
                    int i = __builtin_ctzll(mask);                                               \
                    esc[count] = base + i;                                                       \
                    vals[count] = orig[i];                                                       \
                    count++;                                                                     \
                    mask &= mask - 1;                                                            \
                }                                                                                \
            }                                                                                    \
            if (codes) { /* byte j of the block: elements j, j+16, j+32, j+48 */                 \
                for (int i = m; i < 64; i++)                                                     \
                    low[i] = 0;                                                                  \
                uint8_t *c = codes + (base >> 2);                                                \
                for (int j = 0; j < 16; j++)                                                     \
                    c[j] = (uint8_t)(low[j] | (low[j + 16] << 2) | (low[j + 32] << 4) |          \
                                     (low[j + 48] << 6));                                        \
            }                                                                                    \
        }                                                                                        \
        *found = count;                                                                          \
        return base < n ? base : n;                                                              \
    }                                                                                            \
                                                                                                 \
    static inline void unguard_core_##S(REAL *p, UINT bits, int m, UINT d, const uint8_t *low) { \
        for (int i = 0; i < m; i++) {                                                            \
            UINT sb = ((bits >> i) & 1u) << (BITS - 1);                                          \
            UINT k = okey_##S(bits_##S(p[i] - real_##S(d ^ sb)));                                \
            k += (((UINT)low[i] - k + 1u) & 3u) - 1u;                                            \
            p[i] = real_##S(okey_##S(k));                                                        \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    DISPATCH                                                                                     \
    void rademacher_unguard_##S(REAL *w, int64_t n, uint64_t key, REAL d,                       \
                                const uint8_t *codes) {                                          \
        UINT e = bits_##S(d);                                                                    \
        uint8_t low[64];                                                                         \
        const int half = BITS < 64 ? 32 : 64;                                                    \
        for (int64_t base = 0; base < n; base += 64) {                                           \
            uint64_t word = mix64(key + (uint64_t)(base / 64 + 1) * GAMMA);                      \
            int m = n - base < 64 ? (int)(n - base) : 64;                                        \
            const uint8_t *c = codes + (base >> 2);                                              \
            for (int r = 0; r < 4; r++)                                                          \
                for (int j = 0; j < 16; j++)                                                     \
                    low[16 * r + j] = (uint8_t)((c[j] >> (2 * r)) & 3u);                         \
            for (int h = 0; h < m; h += half) {                                                  \
                int mh = m - h < half ? m - h : half;                                            \
                unguard_core_##S(w + base + h, (UINT)(word >> h), mh, e, low + h);               \
            }                                                                                    \
        }                                                                                        \
    }

DEFINE_GUARD(f32, float, uint32_t, int32_t, 32)
DEFINE_GUARD(f64, double, uint64_t, int64_t, 64)
