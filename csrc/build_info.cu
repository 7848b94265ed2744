// What nvcc compiled this extension for, reported by dysink_kernels._cuda.build_info().
#include "launchers.h"

#define DYSINK_STR2(...) #__VA_ARGS__
#define DYSINK_STR(...) DYSINK_STR2(__VA_ARGS__)

namespace dysink {

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return DYSINK_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace dysink
