// The one dtype-code table of slim_ops._C, shared by every op's C++ (CUDA and CPU) code. The Python side
// (slim_ops/_ext.py) holds the same table and checks it against the `dtype_codes` the extension exports
// (bindings.cpp) when it loads the extension.
#pragma once

namespace slim_ops {

enum DTypeCode : int {
  kDTypeF32 = 0,   // torch.float32
  kDTypeF16 = 1,   // torch.float16
  kDTypeBF16 = 2,  // torch.bfloat16
};

}  // namespace slim_ops
