// Scalar CPU AdamW chunk: the portable path (any CPU) and the reference the SIMD paths must match bit for bit.
#define INTERLEAF_CHUNK_ENTRY adam_chunk_scalar
#include "cpu_adam_simd.h"
