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

static inline void apply_f32(float *p, uint32_t bits, int m, float decay, uint32_t abits,
                             int scale) {
    for (int i = 0; i < m; i++) {
        uint32_t s = abits ^ (((bits >> i) & 1u) << 31);
        float a;
        memcpy(&a, &s, sizeof a);
        float x = scale ? p[i] * decay : p[i];
        p[i] = x + a;
    }
}

static inline void apply_f64(double *p, uint32_t bits, int m, double decay, uint64_t abits,
                             int scale) {
    for (int i = 0; i < m; i++) {
        uint64_t s = abits ^ ((uint64_t)((bits >> i) & 1u) << 63);
        double a;
        memcpy(&a, &s, sizeof a);
        double x = scale ? p[i] * decay : p[i];
        p[i] = x + a;
    }
}

/* n elements starting at element 64 * first_word of the tensor's direction. */
DISPATCH
void rademacher_axpy_f32(float *w, int64_t n, uint64_t key, int64_t first_word, float decay,
                         float alpha) {
    uint32_t abits;
    memcpy(&abits, &alpha, sizeof abits);
    int scale = decay != 1.0f;
    int64_t full = n / 64;
    for (int64_t j = 0; j < full; j++) {
        uint64_t word = mix64(key + (uint64_t)(first_word + j + 1) * GAMMA);
        float *p = w + j * 64;
        if (scale) {
            apply_f32(p, (uint32_t)word, 32, decay, abits, 1);
            apply_f32(p + 32, (uint32_t)(word >> 32), 32, decay, abits, 1);
        } else {
            apply_f32(p, (uint32_t)word, 32, decay, abits, 0);
            apply_f32(p + 32, (uint32_t)(word >> 32), 32, decay, abits, 0);
        }
    }
    int64_t rest = n - full * 64;
    if (rest > 0) {
        uint64_t word = mix64(key + (uint64_t)(first_word + full + 1) * GAMMA);
        float *p = w + full * 64;
        apply_f32(p, (uint32_t)word, rest < 32 ? (int)rest : 32, decay, abits, scale);
        if (rest > 32) apply_f32(p + 32, (uint32_t)(word >> 32), (int)rest - 32, decay, abits, scale);
    }
}

DISPATCH
void rademacher_axpy_f64(double *w, int64_t n, uint64_t key, int64_t first_word, double decay,
                         double alpha) {
    uint64_t abits;
    memcpy(&abits, &alpha, sizeof abits);
    int scale = decay != 1.0;
    int64_t full = n / 64;
    for (int64_t j = 0; j < full; j++) {
        uint64_t word = mix64(key + (uint64_t)(first_word + j + 1) * GAMMA);
        double *p = w + j * 64;
        if (scale) {
            apply_f64(p, (uint32_t)word, 32, decay, abits, 1);
            apply_f64(p + 32, (uint32_t)(word >> 32), 32, decay, abits, 1);
        } else {
            apply_f64(p, (uint32_t)word, 32, decay, abits, 0);
            apply_f64(p + 32, (uint32_t)(word >> 32), 32, decay, abits, 0);
        }
    }
    int64_t rest = n - full * 64;
    if (rest > 0) {
        uint64_t word = mix64(key + (uint64_t)(first_word + full + 1) * GAMMA);
        double *p = w + full * 64;
        apply_f64(p, (uint32_t)word, rest < 32 ? (int)rest : 32, decay, abits, scale);
        if (rest > 32) apply_f64(p + 32, (uint32_t)(word >> 32), (int)rest - 32, decay, abits, scale);
    }
}

/* The same pass over many tensors in one call (a zeroth-order step's pass over a whole model):
 * tensor t has ns[t] elements at ptrs[t], key mix64((prefix ^ indices[t]) + GAMMA) as in rng.py's
 * _prefix, and its own decay and alpha. */
void rademacher_axpy_many_f32(int64_t count, float **ptrs, const int64_t *ns, uint64_t prefix,
                              const int64_t *indices, const float *decays, const float *alphas) {
    for (int64_t t = 0; t < count; t++) {
        uint64_t key = mix64((prefix ^ (uint64_t)indices[t]) + GAMMA);
        rademacher_axpy_f32(ptrs[t], ns[t], key, 0, decays[t], alphas[t]);
    }
}

void rademacher_axpy_many_f64(int64_t count, double **ptrs, const int64_t *ns, uint64_t prefix,
                              const int64_t *indices, const double *decays, const double *alphas) {
    for (int64_t t = 0; t < count; t++) {
        uint64_t key = mix64((prefix ^ (uint64_t)indices[t]) + GAMMA);
        rademacher_axpy_f64(ptrs[t], ns[t], key, 0, decays[t], alphas[t]);
    }
}
