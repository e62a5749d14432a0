// Header given to mx.fast.metal_kernel for every regla kernel (MLX puts its own
// utilities in front of it and writes the [[kernel]] signature after it).
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
using namespace metal;
