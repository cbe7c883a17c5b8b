// Built with this capability's compiler flags by setup.py (see linear_impl.h).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512 1
#include "linear_impl.h"
