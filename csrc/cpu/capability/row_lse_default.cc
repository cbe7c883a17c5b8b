// Built with this capability's compiler flags by setup.py (see row_lse_impl.h).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT 1
#include "row_lse_impl.h"
